"""`relay serve [--config F] [--demo]`: the command ops run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog
import uvloop
from pydantic import SecretStr

from relay.app import run
from relay.cluster.handoff_client import run_handoff
from relay.config import ConfigError, Settings, load_settings
from relay.core.headers import header_block_end
from relay.inbound.auth import print_password_hash
from relay.ops import privacy, queue_verbs
from relay.ops.config_warnings import config_warnings, effective_config, serve_refusals, strict_warnings
from relay.ops.doctor import doctor
from relay.ops.hardening import forbid_core_dumps
from relay.ops.healthcheck import healthcheck
from relay.ops.logs import configure_logging
from relay.ops.metrics import relay_version
from relay.outcomes.demo import demo_outcomes
from relay.outcomes.trace import trace_command
from relay.store.rekey import check_keys
from relay.store.sealing import MissingKeyError, new_key, sealer_for
from relay.store.spool import Spool, SpoolLocked
from relay.testing.standin import InfobipStandIn, StandInMessage

log = structlog.get_logger("relay.cli")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory() -> LoopFactory | None:
    """`relay serve`'s event loop from RELAY_EVENT_LOOP: uvloop (faster per message; issue 18) unless it says
    `asyncio` (None: asyncio's own), the way to rule uvloop out if a problem is ever suspected there."""
    choice = os.environ.get("RELAY_EVENT_LOOP", "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise ConfigError(f"RELAY_EVENT_LOOP: {choice!r} is not an event loop (uvloop, the default, or asyncio)")
    return uvloop.new_event_loop if choice == "uvloop" else None


def _run_serving(main: Callable[[], Coroutine[Any, Any, None]], factory: LoopFactory | None) -> None:
    """Run the relay on the chosen loop, after saying which it is (relay_event_loop)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        on_uvloop = isinstance(runner.get_loop(), uvloop.Loop)
        version = metadata.version("uvloop") if on_uvloop else platform.python_version()
        log.info("relay_event_loop", loop="uvloop" if on_uvloop else "asyncio", version=version)
        runner.run(main())


def _print_message(message: StandInMessage) -> None:
    head = message.data[: header_block_end(message.data)].decode("utf-8", "replace").rstrip()
    security = ("TLS" if message.tls else "NO TLS") + (f", AUTH as {message.auth_user}" if message.auth_user else "")
    print(
        f"\n=== [demo stand-in for Infobip] accepted message {message.infobip_id} "
        f"on connection {message.connection} ({security}) ===\n"
        f"MAIL FROM:<{message.mail_from}>  RCPT TO: {', '.join(message.rcpt_tos)}\n"
        f"{head}\n"
        f"[{len(message.data)} bytes in all; nothing left this machine]\n",
        flush=True,
    )


Pinned = dict[str, dict[str, Any]]  # section -> key -> value


def _demo_pins(standin: InfobipStandIn, spool: Path) -> Pinned:
    """What --demo puts over the config: the stand-in as Infobip, loopback listeners, a throwaway spool."""
    return {
        "upstream": {
            "host": "127.0.0.1",
            "port": standin.port,
            "tls": "starttls",
            "ca_file": standin.ca_file,
            "username": SecretStr(standin.username),
            "password": SecretStr(standin.password),
        },
        "listen": {"host": "127.0.0.1"},
        "http": {"host": "127.0.0.1", "port": 0},  # never exposed, never clashes
        "spool": {"path": spool},
    }


def _pinned(settings: Settings, pins: Pinned) -> Settings:
    """`settings` with the pinned keys put over it: at start, and again over the file each SIGHUP re-reads."""
    return settings.model_copy(
        update={section: getattr(settings, section).model_copy(update=keys) for section, keys in pins.items()}
    )


async def _demo(settings: Settings, config: Path | None) -> None:
    standin = InfobipStandIn(on_message=_print_message)
    await standin.start()
    spool_dir = tempfile.TemporaryDirectory(prefix="relay-demo-spool-")
    pins = _demo_pins(standin, Path(spool_dir.name))
    settings, sink = await demo_outcomes(_pinned(settings, pins), standin)  # reports and bounces: the whole loop
    pins |= {section: dict(getattr(settings, section)) for section in ("reports", "bounces")}  # as demo_outcomes made
    port = settings.listen.port
    print(
        "\n" + "!" * 78 + "\n"
        "DEMO MODE: the upstream is a local stand-in for Infobip's SMTP API on "
        f"127.0.0.1:{standin.port}.\nNothing leaves this machine. Each accepted message is printed below.\n"
        f"Spool (deleted on exit): {spool_dir.name}\n"
        f"Send one from another terminal:\n"
        f"  swaks --server 127.0.0.1:{port} --from app@example.com --to someone@example.org\n" + "!" * 78 + "\n",
        flush=True,
    )
    try:
        await run(settings, config=config, overrides=lambda new: _pinned(new, pins))
    finally:
        await sink.stop()
        await standin.stop()
        spool_dir.cleanup()


def _queue(args: argparse.Namespace, settings: Settings) -> int:
    privacy.configure(settings)  # privacy.redact: `queue list` shows addresses as keyed hashes
    spool = Spool(settings.spool.path, sealer_for(settings.spool))
    if not spool.queue.is_dir():
        print(f"relay: no spool at {spool.path} (spool.path)", file=sys.stderr)
        return 1
    if args.verb == "handoff":  # relay/cluster: scale-in
        return run_handoff(spool, args.to, settings.listen, args.timeout)
    status = queue_verbs.run(spool, args.verb, args, settings)
    if args.verb == "rekey" and status == 0:
        status = queue_verbs.rekey_history(settings)
    return status


def _parser() -> argparse.ArgumentParser:
    """Every verb and flag, as `relay --help` shows them."""
    parser = argparse.ArgumentParser(prog="relay", description="SMTP relay in front of Infobip's SMTP API")
    parser.add_argument("--version", action="version", version=f"relay {relay_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, help="TOML config file (see config.example.toml)")
    serve.add_argument(
        "--demo", action="store_true", help="relay to a built-in local stand-in for Infobip (nothing leaves)"
    )
    commands.add_parser("keygen", help="print a new spool encryption key (one line of base64) for a key file")
    commands.add_parser("hash-password", help="print a password's scrypt hash (read from stdin) for password_hash")
    check = commands.add_parser("check-config", help="validate the config, show it (secrets masked), warn")
    check.add_argument("--config", type=Path, help="TOML config file")
    check.add_argument(
        "--strict",
        action="store_true",
        help="also try the spool path, CA file, certificate and credential files; exit 1 on any warning",
    )
    health = commands.add_parser("healthcheck", help="ask this relay's /healthz at the configured http port")
    health.add_argument("--config", type=Path, help="TOML config file")
    doctor_cmd = commands.add_parser("doctor", help="check each step to Infobip: DNS, TCP, TLS, AUTH, MAIL FROM")
    doctor_cmd.add_argument("--config", type=Path, help="TOML config file")
    doctor_cmd.add_argument("--from", dest="sender", help="sender to try in MAIL FROM (a verified domain)")
    doctor_cmd.add_argument("--send-test", metavar="TO", help="also send one real test message to TO")
    doctor_cmd.add_argument("--profile", help="check only this [[profiles]] name (default: [upstream] and every one)")
    trace = commands.add_parser("trace", help="what happened to a message: attempts, reports, bounces")
    trace.add_argument("--config", type=Path, help="TOML config file (for reports.history_path)")
    trace.add_argument("--json", action="store_true", help="one JSON object per message, one per line")
    trace.add_argument("--reveal", action="store_true", help="with privacy.redact: show addresses, not their hashes")
    trace.add_argument("query", help="a queue id, an Infobip id, a <Message-ID> (with its brackets) or an address")
    queue = commands.add_parser("queue", help="inspect and act on the spool (running or stopped relay)")
    queue.add_argument("--config", type=Path, help="TOML config file (for spool.path)")
    verbs = queue.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="what is waiting, since when, and why")
    listing.add_argument("--dead", action="store_true", help="list the dead-letter area instead")
    listing.add_argument("--json", action="store_true", help="one JSON array of objects, for scripts")
    listing.add_argument("--sender", help="only this envelope sender (a@b.example), or domain (@b.example)")
    listing.add_argument(
        "--older-than", metavar="AGE", help="only messages received at least AGE ago (90s, 30m, 2h, 1d)"
    )
    flushing = verbs.add_parser("flush", help="retry now: everything, or the ids given")
    flushing.add_argument("ids", nargs="*", metavar="ID")
    deleting = verbs.add_parser("delete", help="remove messages for good, from queue/ and dead/")
    deleting.add_argument("ids", nargs="*", metavar="ID")
    deleting.add_argument("--all-dead", action="store_true", help="every dead letter (nothing still waiting)")
    verbs.add_parser("requeue", help="move dead-lettered messages back to the queue").add_argument("ids", nargs="+")
    verbs.add_parser("rekey", help="seal everything waiting under the current key (relay stopped)")
    handoff = verbs.add_parser("handoff", help="send every waiting message to another relay over SMTP (scale-in)")
    handoff.add_argument("--to", required=True, metavar="HOST:PORT", help="the other relay's SMTP listener")
    handoff.add_argument("--timeout", type=float, default=240.0, help="seconds to keep trying (default 240)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":  # needs no config
        return _hash_password()
    if args.command == "keygen":  # needs no config; only the key goes to stdout
        print(new_key())
        return 0

    try:
        settings = load_settings(args.config)
        if args.command == "doctor":
            settings.upstream.require_credentials()
        if args.command == "serve" and not args.demo and (refused := serve_refusals(settings)):
            raise ConfigError("; ".join(refused))
        factory = loop_factory() if args.command == "serve" else None
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "queue":
        return _queue(args, settings)
    if args.command == "trace":
        return _trace(settings, args)
    if args.command == "check-config":
        return _check_config(settings, strict=args.strict)
    if args.command == "healthcheck":
        status, line = healthcheck(settings)
        print(f"relay healthcheck: {line}", file=sys.stdout if status == 0 else sys.stderr)
        return status
    if args.command == "doctor":
        domains = settings.policy.allowed_sender_domains
        sender = args.sender or f"postmaster@{domains[0] if domains else settings.listen.hostname}"
        return _doctor_profiles(settings, sender, args)
    return _serve(args, settings, factory)


def _doctor_profiles(settings: Settings, sender: str, args: argparse.Namespace) -> int:
    """`relay doctor` for [upstream] and every [[profiles]] account in turn, or only `--profile NAME`."""
    paths = {"default": settings} | {
        p.name: settings.model_copy(update={"upstream": p.upstream(settings.upstream)}) for p in settings.profiles
    }
    if args.profile is not None and args.profile not in paths:
        print(f"relay doctor: no profile {args.profile!r}; known: {', '.join(paths)}", file=sys.stderr)
        return 2
    status = 0
    for name, profile_settings in paths.items():
        if args.profile in (None, name):
            if len(paths) > 1:
                print(f"-- profile {name}", flush=True)
            say = lambda line: print(line, flush=True)  # noqa: E731
            status = max(status, asyncio.run(doctor(profile_settings, sender, args.send_test, say)))
    return status


def _trace(settings: Settings, args: argparse.Namespace) -> int:
    """`relay trace`; with privacy.redact its output shows addresses as keyed hashes unless --reveal."""
    privacy.configure(settings)
    hasher = None if args.reveal else privacy.hasher()
    if hasher is None:
        return trace_command(settings, args.query, as_lines=args.json)
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        status = trace_command(settings, args.query, as_lines=args.json)
    print(hasher.text(shown.getvalue()), end="")
    return status


def _hash_password() -> int:
    """`relay hash-password`, with input that is not text said in one line (it was a traceback)."""
    try:
        return print_password_hash()
    except UnicodeError:
        print("relay: hash-password: the password is not valid UTF-8 text; type it again", file=sys.stderr)
        return 1


def _check_config(settings: Settings, *, strict: bool) -> int:
    """0 for a valid config (with warnings unless --strict); --strict: 1 on any warning. What `serve` would
    refuse (secrets missing here; with --strict, also an address it cannot listen on) is a warning."""
    print(effective_config(settings))
    refused = serve_refusals(settings) if strict else settings.missing_secrets()
    warnings = [f"`relay serve` refuses this config here: {problem}" for problem in refused]
    warnings += config_warnings(settings) + (strict_warnings(settings) if strict else [])
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    for item in settings.hipaa_violations():  # in any mode; with privacy.mode = "hipaa" the config is refused
        print(f'HIPAA: privacy.mode = "hipaa" would refuse this: {item}', file=sys.stderr)
    if strict and warnings:
        print(f"config NOT OK with --strict: {len(warnings)} warning(s)", file=sys.stderr)
        return 1
    print(f"config OK{f' with {len(warnings)} warning(s)' if warnings else ''}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace, settings: Settings, factory: LoopFactory | None) -> int:
    forbid_core_dumps()  # the password and messages in memory: no core file, no debugger
    if not args.demo and settings.spool.enabled:
        spool = Spool(settings.spool.path, sealer_for(settings.spool))
        try:
            check_keys(spool)  # records sealed with a key we were not given: stop before anything is created
        except MissingKeyError as exc:
            print(f"relay: config error: {exc}", file=sys.stderr)
            return 2
        try:
            spool.create()
            problem = spool.writable()
        except OSError as exc:
            problem = str(exc.strerror or exc)
        if problem != "ok":
            print(f"relay: config error: spool.path: cannot use {settings.spool.path}: {problem}", file=sys.stderr)
            return 2
    configure_logging(settings.log)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            serving = (
                (lambda: _demo(settings, args.config)) if args.demo else (lambda: run(settings, config=args.config))
            )
            _run_serving(serving, factory)
    except SpoolLocked as exc:
        print(f"relay: cannot start: {exc}", file=sys.stderr)
        return 2
    except MissingKeyError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken: one line, not a traceback
        print(f"relay: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
