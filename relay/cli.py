"""`relay serve [--config F] [--demo]`: the command ops run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from pydantic import SecretStr

from relay.app import run
from relay.config import ConfigError, Settings, load_settings
from relay.headers import header_block_end
from relay.logs import configure_logging
from relay.standin import InfobipStandIn, StandInMessage


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


async def _demo(settings: Settings) -> None:
    standin = InfobipStandIn(on_message=_print_message)
    await standin.start()
    upstream = settings.upstream.model_copy(
        update={
            "host": "127.0.0.1",
            "port": standin.port,
            "tls": "starttls",
            "ca_file": standin.ca_file,
            "username": SecretStr(standin.username),
            "password": SecretStr(standin.password),
        }
    )
    listen = settings.listen.model_copy(update={"host": "127.0.0.1"})
    settings = settings.model_copy(update={"upstream": upstream, "listen": listen})
    port = listen.port
    print(
        "\n" + "!" * 78 + "\n"
        "DEMO MODE: the upstream is a local stand-in for Infobip's SMTP API on "
        f"127.0.0.1:{standin.port}.\nNothing leaves this machine. Each accepted message is printed below.\n"
        f"Send one from another terminal:\n"
        f"  swaks --server 127.0.0.1:{port} --from app@example.com --to someone@example.org\n" + "!" * 78 + "\n",
        flush=True,
    )
    try:
        await run(settings)
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="SMTP relay in front of Infobip's SMTP API")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, help="TOML config file (see config.example.toml)")
    serve.add_argument(
        "--demo", action="store_true", help="relay to a built-in local stand-in for Infobip (nothing leaves)"
    )
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.config)
        if not args.demo:
            settings.upstream.require_credentials()
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(settings) if args.demo else run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
