"""The `tokenrelay` command: arguments only; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from tokenrelay import __version__
from tokenrelay.config import ConfigError, load_config, parse_listen, workers_error


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
    serve.add_argument(
        "--busy-poll",
        action="store_true",
        help="pin each worker to a core and keep it awake while clients are connected (lower latency, a core busy)",
    )

    check = commands.add_parser("check", help="validate a config file; print every error with its key path")
    check.add_argument("file", metavar="FILE")

    usage = commands.add_parser(
        "usage", help="tokens, cost and latency from the ledger, as a table (daemon not needed)"
    )
    usage.add_argument("--db", metavar="PATH", help="the ledger (default: $TOKENRELAY_DB or the user's data dir)")
    usage.add_argument("--since", metavar="WHEN", help="from: 30m, 1h, 7d, 2026-11-01 or an ISO datetime")
    usage.add_argument("--until", metavar="WHEN", help="up to (same forms as --since)")
    usage.add_argument("--by", metavar="GROUPS", help="group by route,deployment,model,key,run,tag,minute,hour,day")
    usage.add_argument("--run", metavar="ID", help="only this run (grouped by route,deployment unless --by)")
    usage.add_argument("--route", metavar="NAME", help="only this route")
    usage.add_argument("--requests", action="store_true", help="the last requests (the request log) instead")
    usage.add_argument("--limit", type=int, default=50, metavar="N", help="with --requests: how many (default 50)")
    _format_flags(usage)

    runs = commands.add_parser("runs", help="recent agent runs with their totals, newest first")
    runs.add_argument("--db", metavar="PATH", help="the ledger (default: $TOKENRELAY_DB or the user's data dir)")
    runs.add_argument("--since", metavar="WHEN", help="runs started from: 1h, 7d, 2026-11-01...")
    runs.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs (default 50)")
    _format_flags(runs)

    env = commands.add_parser(
        "env", help='shell exports pointing the openai/anthropic SDKs here: eval "$(tokenrelay env)"'
    )
    env.add_argument("--run", metavar="ID", help="meter everything under this run id (run-scoped base URLs)")
    env.add_argument(
        "--route-default", metavar="ROUTE", help="also export TOKENRELAY_ROUTE/OPENAI_MODEL/ANTHROPIC_MODEL"
    )
    _daemon_flags(env)

    run = commands.add_parser(
        "run",
        help="run a command pointed at a fresh run; print what it cost when it ends",
        description="Starts COMMAND with OPENAI_BASE_URL/ANTHROPIC_BASE_URL (and keys) pointed at a fresh run of "
        "the daemon, passes its exit code through, and prints the run's summary to stderr when it ends.",
    )
    run.add_argument("--name", metavar="NAME", help="the run's name (default: the command's name); id = NAME-xxxxxx")
    run.add_argument(
        "--budget-usd", type=float, metavar="X", help="refuse the run's requests (429) once X USD is spent"
    )
    run.add_argument(
        "--route-default", metavar="ROUTE", help="export TOKENRELAY_ROUTE/OPENAI_MODEL/ANTHROPIC_MODEL=ROUTE"
    )
    run.add_argument("--ephemeral", action="store_true", help="start a private daemon for the command's lifetime")
    run.add_argument("--db", metavar="PATH", help="with --ephemeral: the private daemon's ledger")
    run.add_argument("--config", metavar="FILE", help="with --ephemeral: the private daemon's config")
    run.add_argument("--json", action="store_true", help="print the summary as one line of JSON (on stderr)")
    run.add_argument("--summary-file", metavar="FILE", help="also write the summary as JSON to FILE")
    _daemon_flags(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
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


def _format_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", dest="format", action="store_const", const="json", help="JSON (the query result)")
    group.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV, one row per group")
    parser.set_defaults(format="table")


def _daemon_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", metavar="URL", help="the daemon (default: $TOKENRELAY_URL or http://127.0.0.1:4141)")
    parser.add_argument("--key", metavar="KEY", help="client key for the SDKs (default: $TOKENRELAY_KEY)")


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
    if args.workers is not None:
        if (why := workers_error(args.workers)) is not None:
            _print_config_errors(ConfigError([f"--workers: {why}"]))
            return 1
        config = replace(config, workers=args.workers)
    if args.log_level:
        config = replace(config, log_level=args.log_level)
    if args.busy_poll:
        config = replace(config, busy_poll=True)
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
    if args.command == "usage":
        from tokenrelay.usage_cli import usage_command

        return usage_command(
            args.db, args.since, args.until, args.by, args.run, args.route, args.format, args.requests, args.limit
        )
    if args.command == "runs":
        from tokenrelay.usage_cli import runs_command

        return runs_command(args.db, args.since, args.format, args.limit)
    if args.command == "env":
        from tokenrelay.run_cli import env_command

        return env_command(args.url, args.run, args.key, args.route_default, sys.stdout)
    if args.command == "run":
        from tokenrelay.run_cli import RunOptions, run_command

        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        options = RunOptions(
            cmd, args.name, args.budget_usd, args.route_default, args.ephemeral, args.json, args.url, args.key,
            args.db, args.config, args.summary_file,
        )  # fmt: skip
        return run_command(options)
    _parser().print_help()
    return 2
