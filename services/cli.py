"""The ``callvault`` command: one entry point for every daemon and for the one-machine lab.

    callvault sip-server          --config FILE
    callvault resource-manager    --config FILE
    callvault mcp                 --config FILE --name mcp1
    callvault recording-processor --config FILE
    callvault web-services        --config FILE
    callvault crypto-server       --config FILE [--set crypto_server.port=8091]
    callvault lab [--var DIR] [--fresh]       # everything on loopback, in the foreground
    callvault check-config --config FILE
    callvault rewrap --config FILE --tenant T [--add-cert PEM_OR_KEY_ID ...] [--profile]
                     [--drop-key KEY_ID ...] [--since DATE] [--dry-run]   # after a key rotation

Each daemon runs under uvloop. SIGINT or SIGTERM cancels it, which makes it shut down gracefully
(stop accepting, finish or flush what is in flight); a second signal forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from services import config as config_mod

DAEMONS: dict[str, str] = {
    "sip-server": "services.sip_server.daemon",
    "resource-manager": "services.resource_manager.daemon",
    "mcp": "services.mcp.daemon",
    "recording-processor": "services.recording_processor.daemon",
    "web-services": "services.web_services.daemon",
    "crypto-server": "services.crypto_server.daemon",
}

READY_MARK = "callvault: ready"
log = logging.getLogger("callvault")


def _parse_sets(values: list[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise config_mod.ConfigError(f"--set {item!r}: expected section.field=value")
        overrides[key.strip()] = value.strip()
    return overrides


def _setup_logging(level: str, label: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {label} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _supervise(
    run: Callable[..., Awaitable[None]], cfg: config_mod.ClusterConfig, name: str | None, label: str
) -> None:
    """Run one daemon until it returns or a signal cancels it; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: %s received, shutting down (again to force)", label, signal.Signals(signum).name)
            inner.cancel()
        else:
            log.warning("%s: second signal, exiting now", label)
            os._exit(130)

    def ready() -> None:
        log.info("%s ready", label)
        print(f"{READY_MARK} {label}", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    inner = asyncio.ensure_future(run(cfg, name=name, ready=ready))
    try:
        await inner
    except asyncio.CancelledError:
        if task.cancelling():  # cancelled from outside, not by our signal handler
            raise
    log.info("%s stopped", label)


def _run_daemon(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, f"{args.command}{'[' + args.name + ']' if args.name else ''}")
    try:
        cfg = config_mod.load(args.config, overrides=_parse_sets(args.set))
        if args.command == "mcp":
            if not args.name:
                raise config_mod.ConfigError("mcp needs --name (one of the [[mcp]] entries)")
            cfg.mcp_named(args.name)
    except config_mod.ConfigError as exc:
        print(f"callvault: configuration error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(DAEMONS[args.command])
    label = args.command + (f"[{args.name}]" if args.name else "")
    import uvloop

    try:
        uvloop.run(_supervise(module.run, cfg, args.name, label))
    except KeyboardInterrupt:
        return 130
    except config_mod.ConfigError as exc:  # found while starting (e.g. an unsafe keystore)
        print(f"callvault: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config, overrides=_parse_sets(args.set))
    except config_mod.ConfigError as exc:
        print(f"callvault: configuration error: {exc}", file=sys.stderr)
        return 2
    print(f"ok: {len(cfg.tenants)} tenant(s), {len(cfg.mcp)} MCP(s)")
    return 0


def _run_lab(args: argparse.Namespace) -> int:
    from services import lab

    _setup_logging(args.log_level, "lab")
    return lab.main(var_dir=args.var, fresh=args.fresh)


def _run_rewrap(args: argparse.Namespace) -> int:
    from services import rewrap

    _setup_logging(args.log_level, "rewrap")
    try:
        args.overrides = _parse_sets(args.set)
    except config_mod.ConfigError as exc:
        print(f"callvault: configuration error: {exc}", file=sys.stderr)
        return 2
    return rewrap.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callvault", description="SIP call-recording stack")
    parser.add_argument("--log-level", default=os.environ.get("CALLVAULT_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)
    for command in DAEMONS:
        p = sub.add_parser(command, help=f"run the {command} daemon")
        p.add_argument("--config", required=True, help="cluster configuration file (TOML)")
        p.add_argument(
            "--name",
            help="which instance: an [[mcp]] entry (mcp), a [[resource_manager.instances]] entry (resource-manager)",
        )
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
        p.set_defaults(func=_run_daemon)
    p = sub.add_parser("lab", help="run the whole stack on loopback in the foreground")
    p.add_argument("--var", default="var", help="state directory (config, recordings, logs)")
    p.add_argument("--fresh", action="store_true", help="discard the existing lab configuration")
    p.set_defaults(func=_run_lab)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.set_defaults(func=_check_config)
    p = sub.add_parser(
        "rewrap",
        help="re-wrap a tenant's encrypted recordings for new certificates / drop retired keys",
        description="Wrap each encrypted recording's data key for the added certificates and/or remove the "
        "wrapped keys of retired key ids, without re-encrypting the audio (docs/CRYPTO.md). Exit status: "
        "0 every recording done, 1 some failed (listed), 2 bad input.",
    )
    p.add_argument("--config", required=True, help="cluster configuration file (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--tenant", required=True, help="the tenant whose recordings are re-wrapped")
    p.add_argument(
        "--add-cert",
        action="append",
        default=[],
        metavar="PEM_OR_KEY_ID",
        help="wrap for this certificate: a PEM file, or a key id of the tenant's profile or keystore",
    )
    p.add_argument(
        "--profile", action="store_true", help="wrap for every certificate of the tenant's profile"
    )
    p.add_argument(
        "--drop-key",
        action="append",
        default=[],
        metavar="KEY_ID",
        help="remove this key id's wrapped key (refused where no other held key would remain)",
    )
    p.add_argument("--since", help="only recordings that started at or after this date / ISO timestamp")
    p.add_argument("--dry-run", action="store_true", help="read headers and report; change nothing")
    p.add_argument("--work-dir", help="temporary space for S3 objects being rewritten (default: TMPDIR)")
    p.add_argument("--json", action="store_true", help="also print the counts and failures as JSON")
    p.set_defaults(func=_run_rewrap)
    return parser


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    if getattr(args, "log_level", None) is None:
        args.log_level = "info"
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
