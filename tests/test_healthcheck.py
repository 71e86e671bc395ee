"""`relay healthcheck` (the image's HEALTHCHECK): asks /healthz where the config (file and environment)
says the HTTP server is, so a moved port or an http.host of 0.0.0.0 still works (issue 13)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from relay.cli import main as relay_main
from relay.config import load_settings
from relay.ops.healthcheck import health_url
from tests.conftest import free_port
from tests.test_metrics import ROOT, Running
from tests.test_metrics import running as running  # the fixture

pytestmark = pytest.mark.slow  # real relay processes: seconds each; .ci/run runs them


async def healthcheck(config: Path, **env: str) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELAY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "healthcheck",
        "--config",
        str(config),
        env=base | env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_healthcheck_asks_the_configured_port_and_fails_when_nothing_answers(running: Running) -> None:
    code, out, err = await healthcheck(running.config)
    assert code == 0, err
    assert out.strip() == f"relay healthcheck: http://127.0.0.1:{running.http_port}/healthz: alive"
    elsewhere = free_port()
    code, out, err = await healthcheck(running.config, RELAY_HTTP__PORT=str(elsewhere))
    assert code == 1 and out == ""
    assert err.startswith(f"relay healthcheck: http://127.0.0.1:{elsewhere}/healthz: ")
    assert await running.process.stop() == 0


def test_a_wildcard_bind_is_asked_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("RELAY_")]:
        monkeypatch.delenv(name)
    for host, url in [
        ("0.0.0.0", "http://127.0.0.1:9090/healthz"),
        ("::", "http://[::1]:9090/healthz"),
        ("10.1.2.3", "http://10.1.2.3:9090/healthz"),
        ("relay.internal", "http://relay.internal:9090/healthz"),
    ]:
        monkeypatch.setenv("RELAY_HTTP__HOST", host)
        assert health_url(load_settings(None)) == url


@pytest.mark.parametrize(
    ("section", "why"),
    [("enabled = false", "http.enabled = false"), ("port = 0", "http.port = 0")],
)
def test_healthcheck_says_why_it_cannot_ask(
    tmp_path: Path, section: str, why: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.upper().startswith("RELAY_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "relay.toml"
    config.write_text(f"[http]\n{section}\n")
    assert relay_main(["healthcheck", "--config", str(config)]) == 1
    assert capsys.readouterr().err.startswith(f"relay healthcheck: {why}")
