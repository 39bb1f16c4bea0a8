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
    _keys_parser(commands)
    return parser


def _keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke client keys (stored as salted hashes)")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    db_help = "the ledger database holding the keys (default: the daemon's default ledger)"
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="a unique name for the key (shown in /usage as key_name)")
    create.add_argument("--routes", metavar="A,B", help="the only routes this key may use (default: all)")
    create.add_argument("--budget-usd", type=float, metavar="X", help="USD the key may spend per period")
    create.add_argument("--period", choices=("day", "month"), help="budget period, UTC (default month)")
    create.add_argument("--tpm", type=int, metavar="N", help="tokens per minute (input + output)")
    create.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    create.add_argument("--expires", metavar="WHEN", help="30d, 12h, 2w, 2026-12-31 (local midnight) or ISO time")
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    create.add_argument("--db", metavar="PATH", help=db_help)
    listing = actions.add_parser("list", help="list keys with limits, spend this period and status")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.add_argument("--db", metavar="PATH", help=db_help)
    revoke = actions.add_parser("revoke", help="revoke a key by name or id")
    revoke.add_argument("key", metavar="NAME|ID")
    revoke.add_argument("--db", metavar="PATH", help=db_help)


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


def _keys(args: argparse.Namespace) -> int:
    from tokenrelay import keys

    if args.keys_command == "create":
        return keys.cli_create(
            args.db, args.name, args.routes, args.budget_usd, args.period, args.tpm, args.rpm, args.expires, args.json
        )
    if args.keys_command == "list":
        return keys.cli_list(args.db, args.json)
    return keys.cli_revoke(args.db, args.key)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokenrelay` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args)
    if args.command == "keys":
        return _keys(args)
    _parser().print_help()
    return 2
