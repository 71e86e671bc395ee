"""The PostgreSQL history (`[reports] history_url`) against a real server: every behaviour the SQLite
history's tests check (imported from tests/test_outcomes_history.py, so they run here with this module's
`store` fixture), then what only several replicas on one database can show."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import structlog
from prometheus_client import CollectorRegistry
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.config import Settings
from relay.outcomes.decide import Report
from relay.outcomes.history import Applied, Attempted
from relay.outcomes.metrics import OutcomeMetrics
from relay.outcomes.postgres import PRUNE_LOCK, SCHEMA_LOCK, SENDING_STALE, PostgresHistory
from relay.outcomes.service import Outcomes, open_store
from relay.outcomes.trace import trace_command
from relay.outcomes.writer import History, HistoryFailing
from tests.cluster_services import PostgresServer, postgres_server
from tests.helpers import until
from tests.test_outcomes_history import (
    T0,
    infobip,
    received,
    test_a_batch_of_any_size_with_an_address_twice_is_written_whole,
    test_a_failed_bounce_comes_back_when_due_and_a_sent_one_never,
    test_a_text_utf8_cannot_carry_is_stored_with_question_marks,
    test_an_attempt_in_the_batch_of_its_message_or_a_later_one_or_a_message_noted_twice_reads_the_same,
    test_an_attempt_then_reports_set_each_recipients_status_once,
    test_an_outcome_recorded_under_a_stale_claim_changes_nothing,
    test_dead_after_250_queues_a_bounce_and_handed_back_does_not,
    test_delay_warnings_once_per_message,
    test_meta_keeps_the_first_value,
    test_pending_and_unknown_reports_change_nothing,
    test_prune_forgets_old_messages_but_keeps_those_with_a_bounce_to_send,
    test_recipients_of_one_message_share_one_bounce_until_it_is_handed_out,
    test_tracking_events_are_recorded_once_per_event_id_and_only_for_our_recipients,
)

RCPTS = ("a@example.org", "b@example.org")
pytestmark = pytest.mark.slow  # a real server: initdb and start take a few seconds

__all__ = [
    "postgres_server",
    "test_a_batch_of_any_size_with_an_address_twice_is_written_whole",
    "test_a_failed_bounce_comes_back_when_due_and_a_sent_one_never",
    "test_a_text_utf8_cannot_carry_is_stored_with_question_marks",
    "test_an_attempt_in_the_batch_of_its_message_or_a_later_one_or_a_message_noted_twice_reads_the_same",
    "test_an_attempt_then_reports_set_each_recipients_status_once",
    "test_an_outcome_recorded_under_a_stale_claim_changes_nothing",
    "test_dead_after_250_queues_a_bounce_and_handed_back_does_not",
    "test_delay_warnings_once_per_message",
    "test_meta_keeps_the_first_value",
    "test_pending_and_unknown_reports_change_nothing",
    "test_prune_forgets_old_messages_but_keeps_those_with_a_bounce_to_send",
    "test_recipients_of_one_message_share_one_bounce_until_it_is_handed_out",
    "test_tracking_events_are_recorded_once_per_event_id_and_only_for_our_recipients",
]


@pytest.fixture
def url(postgres_server: PostgresServer) -> str:
    return postgres_server.database()


@pytest.fixture
def store(url: str) -> Iterator[PostgresHistory]:
    history = PostgresHistory(url)
    yield history
    history.close()


def test_two_replicas_on_one_database_see_each_others_messages(url: str) -> None:
    a, b = PostgresHistory(url), PostgresHistory(url)
    a.write([received("qa", "x@example.org"), Attempted("qa", T0, 1, ("x@example.org",), ("ib-a",))], True)
    b.write([received("qb", "x@example.org")], True)
    for replica in (a, b):
        assert sorted(t.queue_id for t in replica.lookup("x@example.org", 5)) == ["qa", "qb"]
        assert [t.queue_id for t in replica.lookup("ib-a", 5)] == ["qa"]
    assert a.meta("instance", "from-a") == b.meta("instance", "from-b") == "from-a"
    a.close()
    b.close()


def test_replicas_starting_at_once_both_create_the_schema(url: str) -> None:
    opened: list[PostgresHistory] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def replica() -> None:
        start.wait()
        try:
            opened.append(PostgresHistory(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(opened) == 4
    opened[0].write([received("q1")], False)
    assert [t.queue_id for t in opened[3].lookup("q1", 5)] == ["q1"]
    for store in opened:
        store.close()


def test_only_one_replica_holds_the_report_poller_lease(url: str) -> None:
    a, b = PostgresHistory(url), PostgresHistory(url)
    assert a.poll_lease("replica-a", 60) and a.poll_lease("replica-a", 60)  # taken, then renewed
    assert not b.poll_lease("replica-b", 60)
    assert a.poll_lease("replica-a", -1)  # renewed as already expired: the holder died, say
    assert b.poll_lease("replica-b", 60) and not a.poll_lease("replica-a", 60)
    a.close()
    b.close()


def test_a_report_and_a_bounce_go_to_one_replica_only(url: str) -> None:
    a, b = PostgresHistory(url), PostgresHistory(url)
    dead = {"a@example.org": ("failed", "550 5.1.1 No such user")}
    a.write([received("q1"), Attempted("q1", T0, 1, ("b@example.org",), ("ib1",), dead=dead, bounce=True)], True)
    [bounce] = a.due_bounces(T0, 10)
    assert b.due_bounces(T0, 10) == []  # claimed by a
    assert len(b.due_bounces(T0 + SENDING_STALE + 1, 10)) == 1  # a died mid-send: offered again, later

    first = a.apply_reports([infobip("b@example.org", "DELIVERED")], "pushed", T0 + 5, True)
    second = b.apply_reports([infobip("b@example.org", "DELIVERED")], "pulled", T0 + 6, True)
    assert (len(first.outcomes), second.duplicates) == (1, 1) and bounce.queue_id == "q1"
    a.close()
    b.close()


def test_two_replicas_taking_overlapping_pages_at_once_count_each_report_once(url: str) -> None:
    """One replica's page in one order, the other's in the reverse, at the same moment (a push and a pull
    of the same reports): each waits for the other's locks instead of deadlocking, and each report counts
    once."""
    a, b = PostgresHistory(url), PostgresHistory(url)
    ids = [f"ib{i}" for i in range(100)]
    a.write([change for i in ids for change in (received(f"q{i}"), Attempted(f"q{i}", T0, 1, RCPTS, (i,)))], False)
    page = [infobip(to, "DELIVERED", i) for i in ids for to in RCPTS]
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def apply(name: str, store: PostgresHistory, reports: list[Report]) -> None:
        start.wait()
        try:
            results[name] = store.apply_reports(reports, name, T0 + 5, False)
        except Exception as exc:  # a deadlock: PostgreSQL aborts one of the two transactions
            results[name] = exc

    threads = [
        threading.Thread(target=apply, args=("pushed", a, page)),
        threading.Thread(target=apply, args=("pulled", b, page[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    applied = [results["pushed"], results["pulled"]]
    assert all(isinstance(r, Applied) for r in applied), applied
    assert sum(len(r.outcomes) for r in applied) == 200  # type: ignore[union-attr]
    assert sum(r.duplicates for r in applied) == 200  # type: ignore[union-attr]
    [trace] = a.lookup("qib7", 1)
    assert [r.status for r in trace.recipients] == ["delivered", "delivered"]
    a.close()
    b.close()


def test_reports_wait_only_for_the_recipients_they_report_on(url: str) -> None:
    """Another replica's history write holds a message's other recipients (in its own order) while a page of
    reports is applied: the page locks only the recipients it reports on, so neither waits for the other in
    a circle (a deadlock would lose a page Infobip hands out once)."""
    store = PostgresHistory(url)
    taken = [Attempted(q, T0, 1, ("a@example.org",), (f"ib-{q}",)) for q in ("q1", "q2")]
    store.write([received("q1"), received("q2"), *taken], False)
    page = [infobip("a@example.org", "DELIVERED", f"ib-{q}") for q in ("q1", "q2")]
    results: list[Applied] = []
    applying = threading.Thread(target=lambda: results.append(store.apply_reports(page, "pulled", T0 + 5, False)))
    other = "UPDATE recipients SET at = 1 WHERE queue_id = %s AND address_key = 'b@example.org'"
    with psycopg.connect(url) as writer:  # the other replica's write, its transaction open
        writer.execute(other, ("q2",))
        applying.start()
        applying.join(5)  # done without waiting for the writer's row
        assert not applying.is_alive() and len(results[0].outcomes) == 2
        writer.execute(other, ("q1",))
        writer.commit()
    store.close()


async def test_writes_through_the_history_thread_and_a_failed_write_is_reported(url: str) -> None:
    errors: list[int] = []
    store = PostgresHistory(url)
    history = History(store, bounces_on=True, on_error=lambda: errors.append(1))
    history.start()
    notes = [history.note(received(f"q{i}")) for i in range(50)]
    notes.append(history.note(Attempted("q49", T0, 1, ("a@example.org",), ("ib49",))))
    assert await notes[-1] and all(n.done() for n in notes)
    [trace] = await history.call(store.lookup, "ib49", 5)
    assert trace.queue_id == "q49"
    await history.call(store.conn.execute, "SET default_transaction_read_only = on")  # every write fails now
    assert await history.note(received("q-late")) is False and errors == [1]
    await history.close()
    assert asyncio.get_running_loop().is_running()


async def test_a_write_that_fails_in_passing_is_tried_again_and_a_stop_gives_up_on_it(url: str) -> None:
    """A held lock (or a server away) fails the write after history_timeout; the batch is tried again, the
    notes behind it wait, and all are written once the failure passes: nothing lost, no bounce twice. A stop
    while it still fails waits CLOSE_WAIT, then says what it loses."""
    errors: list[int] = []
    store = PostgresHistory(url, timeout=0.2)
    history = History(store, bounces_on=True, on_error=lambda: errors.append(1))
    history.start()
    assert await history.note(received("q1"))
    dead = Attempted("q1", T0, 2, dead={"a@example.org": ("failed", "550 5.1.1 no such user")}, bounce=True)
    with structlog.testing.capture_logs() as logs:
        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE recipients IN ACCESS EXCLUSIVE MODE")
            first = history.note(dead)
            await until(lambda: len(errors) >= 2)  # failed, and failed again on its first retry
            later = history.note(received("q2"))
            assert not first.done() and not later.done()
            with pytest.raises(HistoryFailing):  # what must follow the notes fails now, not when the lock goes
                await history.call(store.lookup, "q1", 5)
        assert await first and await later
    assert [e["changes"] for e in logs if e["event"] == "history_write_recovered"] == [1]
    failed = [e for e in logs if e["event"] == "history_write_failed"]
    assert len(failed) >= 2 and failed[0]["retry_in"] == 0.25 and failed[0]["error_type"] == "QueryCanceled"
    assert [(b.queue_id, [r.address for r in b.recipients]) for b in store.due_bounces(T0 + 60, 10)] == [
        ("q1", ["a@example.org"])
    ]
    assert [t.queue_id for t in store.lookup("q2", 5)] == ["q2"]
    with psycopg.connect(url) as locker, structlog.testing.capture_logs() as logs:
        locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        history.note(received("q3"))
        history.note(received("q4"))
        await history.close()
    assert [e["changes"] for e in logs if e["event"] == "history_notes_lost"] == [2]


HISTORY_SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'relay-history'"


def test_failures_that_may_pass_are_told_from_those_that_never_will(url: str) -> None:
    store = PostgresHistory(url)
    with pytest.raises(psycopg.Error) as refused:
        store.conn.execute("SELECT 1/0")
    with pytest.raises(psycopg.OperationalError) as too_many:  # the client's own refusal: the connection is fine
        store.conn.execute("SELECT " + ", ".join(["%s"] * 70000), [1] * 70000)
    with pytest.raises(psycopg.OperationalError) as too_big:  # a value past an index's limit: 54000
        store.write([Attempted("q1", T0, 1, ("a@example.org",), (secrets.token_urlsafe(9000),))], False)
    assert [store.passing(e.value) for e in (refused, too_many, too_big)] == [False, False, False]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'relay-history'")
    with pytest.raises(psycopg.Error) as lost:
        store.write([received("q-lost")], False)
    store.write([received("q2")], False)  # on a new connection: the error still says it was lost
    assert store.passing(lost.value)
    store.conn.execute("SET idle_session_timeout = '100ms'")  # a managed server's: it ends the session, 57P05
    with psycopg.connect(url, autocommit=True) as admin:  # the event itself: the server has ended the session
        deadline = time.monotonic() + 5
        while admin.execute(HISTORY_SESSIONS).fetchone()[0]:
            assert time.monotonic() < deadline, "the server kept the idle session"
            time.sleep(0.02)
    with pytest.raises(psycopg.Error) as idle:
        store.write([received("q-idle")], False)
    assert store.passing(idle.value)
    store.close()


async def test_a_write_still_failing_after_retry_for_is_dropped_and_the_next_goes_through(url: str) -> None:
    store = PostgresHistory(url, timeout=0.2)
    history = History(store, bounces_on=True, on_error=lambda: None, retry_for=0.5)
    history.start()
    with psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(5):  # tried for ever, it would wait for the lock
                assert await history.note(received("q-dropped")) is False
        assert [e["retry_in"] for e in logs if e["event"] == "history_write_failed"][-1] is None
    assert await history.note(received("q1"))
    assert store.lookup("q-dropped", 5) == [] and [t.queue_id for t in store.lookup("q1", 5)] == ["q1"]
    await history.close()


def test_a_reconnect_does_not_wait_for_the_schema_lock_and_pruning_has_no_time_limit(url: str) -> None:
    """The schema lock held by a replica converting a big history (or a stuck one) must not hold a reconnect;
    a prune with much to catch up must not be cut short by history_timeout."""
    store = PostgresHistory(url, timeout=0.3)
    assert store.meta("instance", "from-before") == "from-before"
    store.write([received("q-old")], False)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'relay-history'")
        with admin.transaction():
            admin.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            with pytest.raises(psycopg.OperationalError):
                store.write([received("q-lost")], False)  # found the connection gone
            writing = threading.Thread(target=store.write, args=([received("q1")], False))
            writing.start()
            writing.join(5)
            assert not writing.is_alive()  # reconnected without the lock
    with psycopg.connect(url, autocommit=True) as admin:  # the database came back empty (a restore, say)
        admin.execute("DROP TABLE meta, messages, recipients, infobip_ids, events, bounces, report_lease")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'relay-history'")
    with pytest.raises(psycopg.OperationalError):
        store.write([received("q-lost")], False)
    store.write([received("q-old"), received("q1")], False)  # its tables made again on the reconnect
    assert store.meta("instance", "new") == "from-before"  # the bulk ids and push URLs out there stay ours
    with psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        pruned: list[int] = []
        pruning = threading.Thread(target=lambda: pruned.append(store.prune(T0 + 1)))
        pruning.start()
        pruning.join(1.0)  # over three times history_timeout, waiting for the lock
        assert pruning.is_alive()
    pruning.join(5)
    assert pruned == [2] and store.lookup("q1", 5) == []
    store.close()


class Forwarder:
    """TCP to the server through threads of ours, that can be cut like a network gone (no reply, no code)."""

    def __init__(self, url: str) -> None:
        self.target = int(conninfo_to_dict(url)["port"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(url, host="127.0.0.1", port=str(self.listener.getsockname()[1]))
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def cut(self) -> None:
        for sock in (self.listener, *self.sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_connection_lost_without_a_code_and_a_server_not_reached_count_as_passing(url: str) -> None:
    """No SQLSTATE comes with a network gone or a server down: the store says, when it happens, that the
    connection was lost, so the writer tries again rather than dropping the batch."""
    network = Forwarder(url)
    store = PostgresHistory(network.url)
    store.write([received("q1")], False)
    network.cut()
    with pytest.raises(psycopg.OperationalError) as lost:
        store.write([received("q2")], False)
    with pytest.raises(psycopg.OperationalError) as refused:  # the reconnect finds nobody listening
        store.write([received("q2")], False)
    assert (lost.value.sqlstate, refused.value.sqlstate) == (None, None)
    assert store.passing(lost.value) and store.passing(refused.value)
    store.close()


def test_the_url_is_a_secret_and_must_be_postgresql() -> None:
    settings = Settings.model_validate({"reports": {"history_url": "postgresql://relay:s3cret@db/relay"}})
    assert "s3cret" not in repr(settings.reports) and "s3cret" not in str(settings.reports.history_url)
    with pytest.raises(ValueError, match="history_url"):
        Settings.model_validate({"reports": {"history_url": "mysql://db/relay"}})


def test_relay_trace_reads_the_shared_history(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = PostgresHistory(url)
    store.write([received("q-elsewhere")], False)  # written by another replica
    store.close()
    settings = Settings.model_validate({"reports": {"history_url": url}})
    assert trace_command(settings, "q-elsewhere", as_lines=True) == 0
    assert json.loads(capsys.readouterr().out)["queue_id"] == "q-elsewhere"


async def test_two_relays_on_one_history_only_one_polls_for_reports(url: str) -> None:
    settings = Settings.model_validate({"reports": {"enabled": True, "api_key": "k", "history_url": url}})
    relays = [Outcomes(settings, OutcomeMetrics(CollectorRegistry())) for _ in range(2)]
    for relay in relays:
        await relay.start()
    try:
        assert isinstance(relays[0].store, PostgresHistory)
        await relays[1].history.call(  # type: ignore[union-attr]
            relays[1].store.write,  # type: ignore[union-attr]
            [received("q1"), Attempted("q1", T0, 1, ("a@example.org",), ("ib1",))],
            False,
        )
        assert relays[0].instance == relays[1].instance  # one bulk id per hour for the cluster
        assert await relays[0]._pending(T0) == ["relay-x-1"]
        assert await relays[1]._pending(T0) == []  # the other replica holds the lease
    finally:
        for relay in relays:
            await relay.stop()


def test_a_broken_connection_fails_one_call_and_the_next_reconnects(url: str) -> None:
    store = PostgresHistory(url)
    with psycopg.connect(url, autocommit=True) as admin:  # the server restarted, or a proxy dropped us
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'relay-history' AND datname = current_database()"
        )
    with pytest.raises(psycopg.OperationalError):
        store.write([received("q-lost")], False)
    store.write([received("q1")], False)
    assert [t.queue_id for t in store.lookup("q1", 5)] == ["q1"]
    store.close()


def test_a_statement_held_up_fails_after_history_timeout_and_the_next_goes_through(url: str) -> None:
    """A write that waits on a lock another client holds (a VACUUM FULL, a migration, a stuck session) fails
    after reports.history_timeout, as any failed write does, instead of blocking the history's thread for ever."""
    store = PostgresHistory(url, timeout=0.5)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            store.write([received("q-held")], False)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    with psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        writing = threading.Thread(target=write)
        writing.start()
        writing.join(10)  # held for ever without the timeout: the lock is released only below
        assert not writing.is_alive()
    writing.join()
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
    store.write([received("q1")], False)  # the same connection, still usable
    assert [t.queue_id for t in store.lookup("q1", 5)] == ["q1"] and store.lookup("q-held", 5) == []
    store.close()


def test_the_connection_has_the_timeouts_and_keeps_what_the_url_sets(url: str) -> None:
    settings = Settings.model_validate({"reports": {"history_url": url, "history_timeout": 12}})
    store = open_store(settings)
    assert isinstance(store, PostgresHistory)
    assert store.conn.execute("SHOW statement_timeout").fetchone() == ("12s",)
    info = store.conn.info.get_parameters()
    assert (info["keepalives"], info["keepalives_idle"], info["tcp_user_timeout"]) == ("1", "4", "30000")
    store.close()
    store = PostgresHistory(f"{url}{'&' if '?' in url else '?'}keepalives_idle=60", timeout=12)
    assert store.conn.info.get_parameters()["keepalives_idle"] == "60"
    store.close()


def test_one_replica_prunes_at_a_time(url: str) -> None:
    a, b = PostgresHistory(url), PostgresHistory(url)
    a.write([received("q1"), received("q2")], False)
    with a.conn.transaction():  # a is pruning: holds the lock
        a.conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRUNE_LOCK,))
        assert b.prune(T0 + 1) == 0
    assert b.prune(T0 + 1) == 2
    a.close()
    b.close()
