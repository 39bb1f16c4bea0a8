"""The `tokenrelay` command: arguments only; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from tokenrelay import __version__
from tokenrelay.config import ConfigError, load_config, parse_listen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrelay",
        description="A local streaming proxy for LLM agent fleets: relay, balance and meter every token.",
    )
    parser.add_argument("--version", action="version", version=f"tokenrelay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon (default: 127.0.0.1:4141, routes from the environment)")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (default: none; routes from provider keys)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:4141)")
    serve.add_argument("--db", metavar="PATH", help="usage ledger (SQLite; default under the user's data dir)")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the port (default 1)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level (default info)")

    check = commands.add_parser("check", help="validate a config file; print every error with its key path")
    check.add_argument("file", metavar="FILE")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _print_config_errors(error: ConfigError) -> None:
    print(f"tokenrelay: the configuration has {len(error.errors)} error(s):", file=sys.stderr)
    for line in error.errors:
        print(f"  {line}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from tokenrelay.app import run

    try:
        config = load_config(args.config)
        if args.listen:
            host, port = parse_listen(args.listen)
            config = replace(config, host=host, port=port)
    except (ConfigError, ValueError) as exc:
        _print_config_errors(exc if isinstance(exc, ConfigError) else ConfigError([f"--listen: {exc}"]))
        return 1
    if args.db:
        config = replace(config, db=args.db)
    if args.workers:
        config = replace(config, workers=args.workers)
    if args.log_level:
        config = replace(config, log_level=args.log_level)
    _setup_logging(config.log_level)
    return run(config)


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        _print_config_errors(exc)
        return 1
    deployments = sum(len(r.deployments) for r in config.routes.values())
    print(f"{args.file}: ok ({len(config.routes)} routes, {deployments} deployments)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokenrelay` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args)
    _parser().print_help()
    return 2
