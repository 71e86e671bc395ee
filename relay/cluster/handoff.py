"""The running relay's side of `relay queue handoff`: it polls its spool for a request and hands every
waiting message to the other relay. Each message is taken out of its lane's queue (and marked busy, as a
worker's is) before it is sent, so no worker can send it to Infobip too; one a worker holds now is
handed off when its attempt ends, if it is still waiting. The other relay's 250 deletes our copy; any
other reply puts it back in its queue (a partial acceptance: with only the refused recipients)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

import structlog

from relay.cluster.handoff_client import REQUEST, HandoffClient, Summary, own_listener, result_path, write_json
from relay.config import ListenSettings
from relay.delivery.lane import Lane
from relay.delivery.queue import Job
from relay.delivery.scheduler import Delivery
from relay.store.spool import EntryState

log = structlog.get_logger("relay.cluster")
POLL = 0.2  # seconds between looks for a request (the preStop hook waits on it)


class HandoffService:
    def __init__(self, delivery: Delivery, listen: ListenSettings) -> None:
        self.delivery = delivery
        self.listen = listen
        self.hostname = listen.hostname
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="handoff-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        request = self.delivery.spool.path / REQUEST
        while True:
            await asyncio.sleep(POLL)
            try:
                asked = json.loads(await asyncio.to_thread(request.read_text, encoding="utf-8"))
                request.unlink()
            except (FileNotFoundError, ValueError):
                continue
            result = await self._answer(str(asked["to"]), float(asked["deadline"]))
            await asyncio.to_thread(write_json, result_path(self.delivery.spool, str(asked["id"])), result)

    async def _answer(self, target: str, deadline: float) -> dict[str, object]:
        """The result file's contents; an error, before anything moves, for a --to that is this relay
        itself (the command checks its config too; this is the listener actually in use)."""
        try:
            refusal = await asyncio.to_thread(own_listener, target, self.listen)
        except ValueError as exc:
            refusal = str(exc)
        if refusal is not None:
            log.error("handoff_refused", to=target, reason=refusal)
            return {"error": refusal}
        summary = await self.hand_off(target, deadline)
        return {**summary.as_dict(), "left": self.delivery.depth}

    async def hand_off(self, target: str, deadline: float) -> Summary:
        """Until nothing waits here, or `deadline` (epoch seconds): pass after pass over every lane."""
        log.info("handoff_started", to=target, queued=self.delivery.depth)
        client, summary = HandoffClient(target, self.hostname), Summary()
        try:
            while time.time() < deadline:
                summary.kept.clear()
                sent = await self._pass(client, summary)
                if not summary.kept and not self._in_flight():
                    break
                if sent == 0:  # only messages a worker holds, or the other relay said 4xx: a moment
                    await asyncio.sleep(0.05 if not summary.kept else 1.0)
        finally:
            await client.close()
        log.info("handoff_finished", to=target, sent=summary.sent, kept=len(summary.kept), left=self.delivery.depth)
        return summary

    def _in_flight(self) -> bool:
        return any(lane.queue.busy or lane.queue.jobs or lane.queue.unloaded for lane in self.delivery.lanes.values())

    async def _pass(self, client: HandoffClient, summary: Summary) -> int:
        sent = 0
        for lane in list(self.delivery.lanes.values()):
            for queue_id in list(lane.queue.jobs):
                job = lane.queue.jobs.get(queue_id)
                if job is None or job.first is not None:  # its first attempt is still being settled
                    continue
                lane.queue.withdraw(queue_id)
                lane.queue.busy.add(queue_id)
                try:
                    sent += await self._one(client, lane, job, summary)
                finally:
                    lane.queue.busy.discard(queue_id)
        return sent

    async def _one(self, client: HandoffClient, lane: Lane, job: Job, summary: Summary) -> int:
        data = await self._bytes(lane, job)
        if data is None:  # deleted by `relay queue delete`
            return 0
        pending = job.recipients if job.recipients is not None else job.envelope.recipients
        taken, reply = await client.send(job.envelope.mail_from, pending, data)
        if taken >= set(pending):
            if job.in_journal:
                lane.journal.done(job.queue_id)
            else:
                await asyncio.to_thread(lane.spool.remove, job.queue_id)
            summary.sent += 1
            log.info("message_handed_off", queue_id=job.queue_id, reply=reply)
            return 1
        summary.kept[job.queue_id] = reply
        left = tuple(r for r in pending if r not in taken)
        if taken and not job.in_journal:  # a restart must not send to those the other relay took
            state = EntryState(job.attempts, job.due, list(left), reply, held=job.held)
            await asyncio.to_thread(lane.spool.write_state, job.queue_id, state)
        lane.shared.route(job).schedule(dataclasses.replace(job, recipients=left))
        return 1 if taken else 0

    async def _bytes(self, lane: Lane, job: Job) -> bytes | None:
        if job.message is not None:
            return job.message.as_bytes()
        if job.in_journal and job.record is not None:
            return await asyncio.to_thread(lane.journal.read, job.record)
        with contextlib.suppress(FileNotFoundError):
            _, data = await asyncio.to_thread(lane.spool.read, job.queue_id)
            return data
        return None
