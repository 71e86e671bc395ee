"""What every scenario runs against: the stand-in and the delay proxies as child processes, the targets
(ceiling, relay, Postfix) started behind them, and the shape of a scenario.

Processes: the Infobip stand-in (bench.upstream) and one delay proxy per RTT (bench.proxy) run on their
own for the whole run; a relay runs as `python -m relay serve --config <generated toml>` (bench.relayproc),
Postfix as its own master (bench.postfix); the load client runs in the bench's own process (bench.load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import postfix as postfix_mod
from bench.common import PYTHON, ROOT, Child, child_env, git_info, label, log
from bench.load import Tls
from bench.relayproc import RelayProcess

Results = dict[str, Any]
Verdict = dict[str, Any]


def verdict(target: str, met: bool | None, figures: str) -> Verdict:
    """One line of the targets table: met True, False, or None when it could not be judged."""
    return {"target": target, "met": met, "figures": figures}


def _none(*_: Any) -> list[Any]:
    return []


@dataclass(frozen=True)
class Scenario:
    """One benchmark. `run` measures and puts its figures in `results[name]`; the others only read the
    results (so `python -m bench.report` can render a JSON written earlier)."""

    name: str
    run: Callable[[Harness, Results], Awaitable[None]]
    title: str = ""  # the heading of its section in bench.report's Markdown
    summary: Callable[[Results], list[str]] = _none  # console lines after the run
    markdown: Callable[[Results], list[str]] = _none  # bench.report's section
    targets: Callable[[Results, argparse.Namespace], list[Verdict]] = _none


class Control:
    """The bench's side of the stand-in's control port (see bench.upstream)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _ask(self, command: str) -> dict[str, Any]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        self._writer.write(command.encode() + b"\n")
        return json.loads(await self._reader.readline())  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        return await self._ask("stats")

    async def reset(self) -> None:
        await self._ask("reset")

    async def add_account(self, user: str, password: str) -> None:
        """Another login the stand-in accepts (one Infobip account per profile)."""
        await self._ask(f"account {user} {password}")

    async def wait_for(
        self, count: int, timeout: float, *, idle_timeout: float | None = None, key: str = "messages"
    ) -> dict[str, Any]:
        """Poll until `count` messages (or recipients) have arrived, the deadline passes, or nothing
        arrived for `idle_timeout` seconds."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            stats = await self.stats()
            now = time.monotonic()
            if stats[key] >= count or now > deadline:
                return stats
            if stats[key] != last_count:
                last_count, last_change = stats[key], now
            elif idle_timeout is not None and now - last_change > idle_timeout:
                return stats
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class Target:
    """One config, running and listening on `port`."""

    config: str
    port: int
    pid: int | None = None  # the process whose RSS we measure (tree for Postfix)
    tls: Tls | None = None
    ib_headers: bool = False  # the ceiling client sends the headers the relay would add
    stop: Callable[[], Awaitable[Any]] | None = None
    upstream_port: int | None = None  # the proxy port the target sends to (for CPU accounting)
    notes: dict[str, Any] = field(default_factory=dict)
    relay: RelayProcess | None = None

    def cpu_times(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds so far: the relay process (all its threads); for Postfix the whole
        tree, its master's own time, what it has reaped of its exited children (smtpd, cleanup, smtp...,
        which the master waits for) and its live children's, so a difference over a phase counts every
        Postfix process's CPU in that phase (#18: CPU per message against Postfix's)."""
        if self.pid is None:
            return None
        import psutil

        try:
            top = psutil.Process(self.pid)
            times = top.cpu_times()
            if self.relay is not None:
                return float(times.user), float(times.system)
            if not self.config.startswith("postfix"):
                return None
            user = times.user + times.children_user
            system = times.system + times.children_system
            for child in top.children():
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    user, system = user + c.user, system + c.system
        except psutil.Error:
            return None
        return float(user), float(system)


def experiments(extra: str) -> dict[str, str]:
    """The experiments after a relay config's '+': 'uvloop+log=warning' -> {'uvloop': '', 'log': 'warning'}."""
    found = dict(item.partition("=")[::2] for item in extra.split("+") if item)
    unknown = set(found) - {"uvloop", "switch", "log", "src", "sync_wait"}
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {sorted(unknown)}: uvloop, switch=SECONDS, log=LEVEL, src=DIR, sync_wait=SECONDS"
        )
    return found


class Harness:
    """The stand-in (started once), a delay proxy per RTT (started when first needed), and the targets."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.upstream: dict[str, Any] = {}
        self.control: Control | None = None
        self._children: list[Child] = []
        self._proxies: dict[float, int] = {}
        self.proxy_pids: dict[int, int] = {}  # proxy port -> pid
        self.postfix_skip: str | None = None

    def _flags(self) -> list[str]:
        return [] if self.args.harness_uvloop else ["--no-uvloop"]

    async def start(self) -> None:
        standin = Child([PYTHON, "-m", "bench.upstream", *self._flags()], self.workdir / "standin.log", child_env())
        self._children.append(standin)
        self.upstream = await standin.start()
        self.upstream["pid"] = standin.pid
        self.control = Control(self.upstream["control"])
        if "postfix" in self.args.configs:
            self.postfix_skip = postfix_mod.available()

    async def proxy(self, rtt: float) -> int:
        if rtt not in self._proxies:
            argv = [PYTHON, "-m", "bench.proxy", "--target-port", str(self.upstream["port"]), "--rtt-ms", str(rtt)]
            child = Child([*argv, *self._flags()], self.workdir / f"proxy-{rtt:g}ms.log", child_env())
            self._children.append(child)
            self._proxies[rtt] = (await child.start())["port"]
            self.proxy_pids[self._proxies[rtt]] = child.pid
        return self._proxies[rtt]

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()
        for child in reversed(self._children):
            await child.stop()

    def skipped(self) -> dict[str, str]:
        """The row of a config that did not start."""
        return {"skipped": self.postfix_skip or "could not start"}

    async def target(self, config: str, rtt: float, name: str) -> Target | None:
        """Start what `config` names behind the proxy for `rtt`; None when it cannot run (Postfix)."""
        port = await self.proxy(rtt)
        base, _, extra = config.partition("+")
        if base == "ceiling":
            tls = Tls(self.upstream["ca_file"], self.upstream["username"], self.upstream["password"], "localhost")
            return Target(config, port, tls=tls, ib_headers=True)
        if base in ("relay_off", "relay_on"):
            return await self._relay(config, port, name, base == "relay_on", experiments(extra))
        if base == "postfix":
            return await self._postfix(config, port, name)
        raise ValueError(f"unknown config {config!r}")

    async def _relay(self, config: str, port: int, name: str, spool: bool, exp: dict[str, str]) -> Target:
        relay = RelayProcess(
            self.workdir,
            name,
            upstream_port=port,
            upstream=self.upstream,
            spool=spool,
            pool_size=self.args.pool_size,
            uvloop="uvloop" in exp,
            switch_interval=float(exp["switch"]) if "switch" in exp else None,
            log_level=exp.get("log", "info"),
            profile=self.args.profile if name.startswith("profile") else None,
            source=Path(exp["src"]).resolve() if "src" in exp else ROOT,
            overrides={"spool": {"sync_wait": float(exp["sync_wait"])}} if "sync_wait" in exp else None,
        )
        if not (relay.source / "relay" / "__main__.py").is_file():
            raise ValueError(f"src={relay.source}: no relay/ package there")
        await relay.start()
        notes: dict[str, Any] = {"startup_seconds": round(relay.startup_seconds, 3)}
        if "src" in exp:
            notes |= {"src": str(relay.source), "src_git": git_info(relay.source)}
        return Target(config, relay.port, pid=relay.pid, stop=relay.stop, relay=relay, upstream_port=port, notes=notes)

    async def _postfix(self, config: str, port: int, name: str) -> Target | None:
        if self.postfix_skip is not None:
            return None
        instance = postfix_mod.Postfix(self.workdir, name, upstream_port=port, upstream=self.upstream)
        try:
            await instance.start()
        except Exception as exc:
            self.postfix_skip = f"Postfix could not run: {exc}"
            with contextlib.suppress(Exception):
                await instance.stop()
            return None
        return Target(config, instance.port, pid=instance.pid, stop=instance.stop, upstream_port=port)


async def stop_target(target: Target | None) -> None:
    if target is not None and target.stop is not None:
        code = await target.stop()
        if target.relay is not None and code not in (0, None):
            log(f"   note: relay exited with {code}; see {target.relay.log_path}")


async def start_targets(harness: Harness, rtt: float, prefix: str) -> dict[str, Target | None]:
    """Every config's process at once (idle ones cost nothing), so measurements can be interleaved."""
    targets: dict[str, Target | None] = {}
    for config in harness.args.configs:
        try:
            targets[config] = await harness.target(config, rtt, f"{prefix}-{config}")
        except Exception as exc:
            log(f"   {label(config)}: cannot start: {type(exc).__name__}: {exc}")
            targets[config] = None
        if targets[config] is None and config.startswith("postfix"):
            log(f"   {label(config)}: SKIPPED ({harness.postfix_skip})")
    return targets


async def stop_targets(targets: dict[str, Target | None]) -> None:
    for target in targets.values():
        with contextlib.suppress(Exception):
            await stop_target(target)
