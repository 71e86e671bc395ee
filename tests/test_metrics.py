"""What /metrics exports, scraped from a running relay: the families the README lists, the ones the alert
rules and the Grafana dashboard query, the standard process metrics, reload counters, build info."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.cli import main as relay_main
from relay.ops.metrics import relay_version
from relay.testing.standin import InfobipStandIn
from tests import helpers
from tests.conftest import StartRelay, free_port, message
from tests.helpers import sample, send_one
from tests.test_ops import RelayProcess, wait_listening

pytestmark = pytest.mark.slow  # real relay processes scraped: seconds each; .ci/run runs them

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "relay-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "relay-dashboard.json"
SENDER = "billing@erp.example.com"
_NAME = re.compile(r"\b((?:relay|process|python)_[a-zA-Z0-9_]+)")


def write_config(path: Path, standin: InfobipStandIn, *, port: int, http_port: int, spool: Path) -> Path:
    return helpers.write_config(
        path,
        standin,
        port=port,
        spool={"enabled": True, "path": str(spool), "sync_wait": 2.0},
        http={"enabled": True, "port": http_port},
    )


class Running:
    def __init__(self, process: RelayProcess, config: Path, http_port: int) -> None:
        self.process = process
        self.config = config
        self.http_port = http_port

    async def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            return await response.text()


@pytest.fixture
async def running(standin: InfobipStandIn, tmp_path: Path) -> AsyncIterator[Running]:
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path / "relay.toml", standin, port=port, http_port=http_port, spool=tmp_path / "spool")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    await wait_listening(port, process)
    relay = RelayProcess(process, port)
    yield Running(relay, config, http_port)
    if process.returncode is None:
        process.kill()
        await process.wait()


def exported_names(text: str) -> set[str]:
    """Every sample name a scrape can show, including those of labelled families with no child yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
    return names


def queried_names() -> dict[str, set[str]]:
    """Metric names in every alert expression and every dashboard query (and template variable)."""
    rules = yaml.safe_load(RULES.read_text())
    from_rules = {
        name for group in rules["groups"] for rule in group["rules"] for name in _NAME.findall(str(rule["expr"]))
    }
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [str(v.get("definition", "")) for v in dashboard["templating"]["list"]]
    return {"rules": from_rules, "dashboard": {name for e in expressions for name in _NAME.findall(e)}}


async def test_the_alerts_and_the_dashboard_query_only_what_a_running_relay_exports(running: Running) -> None:
    assert (await send_one(running.process.port, SENDER, ["a@example.org"], message())).startswith("250")
    exported = exported_names(await running.scrape())
    for where, names in queried_names().items():
        assert names, where
        assert names <= exported, f"{where} queries metrics the relay does not export: {sorted(names - exported)}"
    assert await running.process.stop() == 0


async def test_every_relay_family_is_in_the_readme(running: Running) -> None:
    families = {f.name for f in text_string_to_metric_families(await running.scrape()) if f.name.startswith("relay_")}
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in families if name not in readme and f"{name}_total" not in readme)
    assert not missing, f"exported but not in the README: {missing}"


async def test_build_info_process_metrics_reloads_and_spool_disk_are_there_from_the_start(running: Running) -> None:
    text = await running.scrape()
    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert f'relay_build_info{{python="{python}",version="{relay_version()}"}} 1.0' in text
    assert relay_version() == "0.1.0"  # pyproject.toml's
    assert sample(text, "process_resident_memory_bytes") > 10_000_000
    assert sample(text, "process_open_fds") > 3
    assert sample(text, "process_cpu_seconds_total") > 0
    assert 'relay_config_reloads_total{result="success"} 0.0' in text
    assert 'relay_config_reloads_total{result="failure"} 0.0' in text
    assert sample(text, "relay_config_last_reload_successful") == 1.0
    free, size = sample(text, "relay_spool_free_bytes"), sample(text, "relay_spool_size_bytes")
    assert 0 < free <= size


async def test_reloads_are_counted_and_restart_needed_for_compares_with_what_runs(running: Running) -> None:
    relay, config = running.process, running.config
    original = config.read_text()
    other_port = free_port()

    async def reload(event: str) -> dict[str, object]:
        relay.log_lines.clear()
        relay.process.send_signal(signal.SIGHUP)
        return await relay.wait_for_log(event)

    config.write_text(original.replace(f"port = {relay.port}\n", f"port = {other_port}\n", 1))
    assert (await reload("config_reloaded"))["restart_needed_for"] == ["listen.port"]
    config.write_text(original.replace('hostname = "relay.test"', 'hostname = "relay2.test"'))  # port back
    assert (await reload("config_reloaded"))["restart_needed_for"] is None
    config.write_text(original.replace(f"port = {relay.port}\n", f"port = {other_port}\n", 1) + "[listen]\nx = 1\n")
    await reload("config_reload_failed")
    text = await running.scrape()
    assert 'relay_config_reloads_total{result="success"} 2.0' in text
    assert 'relay_config_reloads_total{result="failure"} 1.0' in text
    assert sample(text, "relay_config_last_reload_successful") == 0.0
    config.write_text(original.replace(f"port = {relay.port}\n", f"port = {other_port}\n", 1))
    assert (await reload("config_reloaded"))["restart_needed_for"] == ["listen.port"]  # still pending
    assert sample(await running.scrape(), "relay_config_last_reload_successful") == 1.0
    assert await relay.stop() == 0


async def test_version_flag_and_the_listening_line_say_the_version(running: Running) -> None:
    listening = await running.process.wait_for_log("relay_listening")
    assert listening["version"] == relay_version()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--version", stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, _ = await process.communicate()
    assert process.returncode == 0 and out.decode().strip() == f"relay {relay_version()}"
    assert await running.process.stop() == 0


async def test_spool_depth_and_oldest_age_drop_when_queue_delete_removes_a_message(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`relay queue delete` on a running relay: the gauges count what is on disk, not what the scheduler
    still has in memory until the deleted message comes due (a minute later here)."""
    spool = tmp_path / "spool"
    relay = await start_relay(spool={"enabled": True, "path": str(spool), "sync_wait": 2.0, "retry_initial": 60})
    standin.behaviour.data_replies.extend(["451 4.3.0 Try later"] * 2)
    first = await send_one(relay.port, SENDER, ["a@example.org"], message())
    second = await send_one(relay.port, SENDER, ["b@example.org"], message())
    assert "Infobip deferred it" in first and "Infobip deferred it" in second, (first, second)
    ids = [re.search(r"Queued as ([0-9a-f]+)", reply).group(1) for reply in (first, second)]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{relay.http.port}/metrics"

    async def scrape() -> str:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.text()

    text = await scrape()
    assert sample(text, "relay_spool_depth") == 2.0
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{spool}"\n')
    assert relay_main(["queue", "--config", str(config), "delete", ids[0]]) == 0
    assert sample(await scrape(), "relay_spool_depth") == 1.0
    assert relay_main(["queue", "--config", str(config), "delete", ids[1]]) == 0
    text = await scrape()
    assert sample(text, "relay_spool_depth") == 0.0
    assert sample(text, "relay_spool_oldest_age_seconds") == 0.0
