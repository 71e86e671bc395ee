"""The durable spool: one file per waiting message, laid out so that `ls` shows what is waiting and why.

A message is first committed to the shared journal (relay/store/journal.py); it gets a file here only when
its first attempt does not settle it (a retry, a dead letter, a wait), or at start-up after a crash.

    <path>/journal/         messages during their first attempt (see relay/store/journal.py)
    <path>/tmp/<id>.msg     being written (the journal still has it); deleted at start-up
    <path>/queue/<id>.msg   JSON envelope line, then the exact bytes to send upstream
    <path>/queue/<id>.state after a failed attempt: attempts, next try, recipients left, last reply (JSON)
    <path>/dead/<id>.msg    dead-lettered (a hard link when only some recipients died)
    <path>/dead/<id>.state  who died and why
    <path>/flush.request    `relay queue flush` asks a running relay to retry now
    <path>/damaged/         copies of journal records that did not open (reported; never delivered)

With spool.encryption_key_file set, every .msg and .state file (and every journal record) is sealed
(relay/store/sealing.py): a .msg file is then the sealed envelope followed by the sealed bytes, a .state
file one sealed JSON object. Files written before encryption was turned on are still read as they are.

Each step is one atomic rename (or link/unlink) after an fsync of the data, so a crash at any instant
leaves either the old state or the new one. A message is out of the journal only after its rename
into queue/ and an fsync of that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

from relay.core.message import Envelope, Prepared
from relay.store.sealing import DEAD_STATE, HEADER, STATE, Sealer, SealError, is_sealed, peek
from relay.testing.failpoints import crashpoint

log = structlog.get_logger("relay.store.spool")

FLUSH_REQUEST = "flush.request"
# Beside a dead letter whose bounce's note may not be in the message history yet: a start after a crash or a
# stop notes it again (Scheduler._note_unnoted). Created before the state, whose directory sync covers both.
UNNOTED = ".unnoted"
LOCK = "lock"
STATUS = "status.json"  # what the running relay says about delivery (paused until ...), for `relay queue`
# Messages hold recipient addresses and bodies: only the relay's own user may read them, whatever the umask.
DIR_MODE = 0o700
FILE_MODE = 0o600
ENVELOPE_READ = 4096  # what start-up reads of a .msg file first: the envelope line is nearly always in it


class SpoolLocked(OSError):
    """Another relay owns this spool: two on one spool would adopt and delete each other's messages."""


class DamagedRecord(FileNotFoundError):
    """A sealed message that does not open (a flipped bit, a swapped file). To delivery it is as good as
    gone: it is reported here and left where it is for an engineer, and never sent."""


@dataclass(slots=True)
class EntryState:
    """A .state file; absent means "never attempted, all recipients pending"."""

    attempts: int = 0
    next_attempt: float = 0.0
    recipients: list[str] | None = None  # still to deliver; None: all of the envelope's
    last_reply: str = ""
    held: bool = False  # by an outage (no answer from Infobip), not by a 4xx: tried at once after a restart
    dead: dict[str, str] = field(default_factory=dict)  # only in dead/: recipient -> reason


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    """mkdir with DIR_MODE exactly (mkdir's mode goes through the umask), durably in its parent."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes, *, sync_dir: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


class Spool:
    def __init__(self, path: Path, sealer: Sealer | None = None) -> None:
        self.path = path
        self.sealer = sealer  # None: records are written in plaintext
        self.keys_checked = False  # by check_keys (relay serve checks before anything else; lock then needn't)
        self.tmp = path / "tmp"
        self.queue = path / "queue"
        self.dead = path / "dead"
        self.journal_dir = path / "journal"  # relay/store/journal.py owns what is inside
        self._queue_str = str(self.queue)
        self._queue_dir_fd: int | None = None
        self._lock_fd: int | None = None
        self._renames_lock = threading.Lock()
        self._dir_sync_lock = threading.Lock()
        self._renamed = 0  # renames into queue/ so far
        self._synced = 0  # renames made durable by an fsync of queue/

    def lock(self) -> None:
        """Own the spool for this process's life (released when it exits, even by kill -9), or raise
        SpoolLocked. `relay queue` verbs do not take it: they work beside a running relay. Records sealed
        with a key we do not hold stop it first (MissingKeyError), before anything is created or changed."""
        from relay.store.rekey import check_keys  # it reads the journal, whose module builds on this one

        if not self.keys_checked:
            check_keys(self)
        if self.sealer is not None:  # the ids, never the keys: which key files this spool needs
            log.info("spool_encrypted", key_id=self.sealer.current_id, old_key_ids=list(self.sealer.key_ids[1:]))
        self.create()
        tighten((self.path, self.tmp, self.queue, self.dead, self.journal_dir))
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolLocked(f"spool {self.path} is in use by another relay (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def create(self) -> None:
        """The directories, durably (a queue/ not fsync'd into its parent could vanish) and private."""
        for directory in (self.path, self.tmp, self.queue, self.dead):
            if not directory.is_dir():
                make_private_dir(directory)

    # receiving

    def commit(self, message: Prepared, envelope: Envelope) -> None:
        """Write, fsync, rename into queue/, fsync the directory. Raises OSError (disk full...).

        Plain os calls and one writev: this runs in a thread beside the event loop, and each
        Python-level step there is time the loop waits for the GIL.
        """
        name = f"{envelope.queue_id}.msg"
        tmp = os.path.join(self.tmp, name)
        head = envelope.line()
        if self.sealer is None:
            parts = [memoryview(head), *message.segments()]
        else:
            parts = [memoryview(p) for p in self.sealer.seal_message(envelope.queue_id, head, list(message.segments()))]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                write_all_at(fd, parts, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            crashpoint("before_promote")
            with self._renames_lock:
                os.rename(tmp, os.path.join(self.queue, name))
                self._renamed += 1
                mine = self._renamed
            self._sync_queue_dir(mine)
            crashpoint("after_promote")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _sync_queue_dir(self, rename: int) -> None:
        """Group commit: one fsync of queue/ makes every rename before it durable, so a thread whose
        rename an fsync already covered returns at once instead of queueing another."""
        with self._dir_sync_lock:
            if self._synced >= rename:
                return
            with self._renames_lock:
                covered = self._renamed
            if self._queue_dir_fd is None:
                self._queue_dir_fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(self._queue_dir_fd)
            self._synced = covered

    # reading

    def read(self, queue_id: str, *, dead: bool = False) -> tuple[Envelope, bytes]:
        """The envelope and exact bytes of a message in queue/ (or dead/); DamagedRecord if it does not open."""
        path = (self.dead if dead else self.queue) / f"{queue_id}.msg"
        try:
            line, body = read_message_file(path, queue_id, self.sealer)
        except SealError as exc:
            log.error("spool_record_damaged", queue_id=queue_id, path=str(path), error=str(exc), kept="in place")
            raise DamagedRecord(f"{path}: {exc}") from None
        return Envelope.from_line(line), body

    def read_envelope(self, queue_id: str, *, dead: bool = False) -> Envelope:
        """The envelope alone (a sealed body is not decrypted). SealError if it does not open."""
        with open((self.dead if dead else self.queue) / f"{queue_id}.msg", "rb") as handle:
            if not is_sealed(handle.peek(HEADER.size)):
                return Envelope.from_line(handle.readline())
            head = handle.read(HEADER.size)
            blob = head + handle.read(peek(head).end - HEADER.size)
            return Envelope.from_line(_opener(self.sealer).open_envelope(queue_id, blob)[0])

    def read_state(self, queue_id: str, *, dead: bool = False) -> EntryState:
        try:
            raw = ((self.dead if dead else self.queue) / f"{queue_id}.state").read_bytes()
        except FileNotFoundError:
            return EntryState()
        return parse_state(self.sealer, queue_id, raw, DEAD_STATE if dead else STATE)

    def read_queued(self, queue_id: str, has_state: bool) -> tuple[Envelope, EntryState]:
        """Start-up's read of one queue/ entry: the envelope alone (a sealed body is not decrypted) and the
        .state only when the listing saw one. Plain os calls on string paths: start-up makes one of these
        per queued message, in a thread beside the listening relay. FileNotFoundError if it is gone."""
        base = os.path.join(self._queue_str, queue_id)
        envelope = Envelope.from_line(envelope_line(base + ".msg", queue_id, self.sealer))
        raw = _read_if_there(base + ".state") if has_state else None  # gone since the listing: None too
        return envelope, EntryState() if raw is None else parse_state(self.sealer, queue_id, raw, STATE)

    def queued_ids(self) -> list[str]:
        """Committed messages in arrival order (queue ids sort by time)."""
        return sorted(_ids(self.queue))

    def dead_ids(self) -> list[str]:
        return sorted(_ids(self.dead))

    # changing

    def write_state(self, queue_id: str, state: EntryState) -> None:
        write_atomically(self.queue / f"{queue_id}.state", self._state_bytes(queue_id, state, STATE), sync_dir=False)

    def _state_bytes(self, queue_id: str, state: EntryState, kind: bytes) -> bytes:
        raw = json.dumps(asdict(state)).encode()
        return raw if self.sealer is None else b"".join(self.sealer.seal(kind, queue_id, raw))

    def remove_many(self, queue_ids: list[str]) -> None:
        """Delivered: plain unlinks on string paths (this runs for every message); .state rarely exists."""
        queue = str(self.queue)
        for queue_id in queue_ids:
            base = os.path.join(queue, queue_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + ".msg")
            if os.path.exists(base + ".state"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base + ".state")

    def remove(self, queue_id: str) -> None:
        """Delivered (or handed back to the client): message first, so a crash leaves no half entry."""
        for suffix in (".msg", ".state"):
            with contextlib.suppress(FileNotFoundError):
                (self.queue / f"{queue_id}{suffix}").unlink()

    def dead_letter(self, queue_id: str, reasons: dict[str, str], last_reply: str, *, unnoted: bool = False) -> None:
        """Record dead recipients in dead/ (hard-linking the message), keeping the queue entry as is; `unnoted`:
        their bounce is not noted yet, and an UNNOTED marker says so until it is (see bounce_noted)."""
        target = self.dead / f"{queue_id}.msg"
        if not target.exists():
            os.link(self.queue / f"{queue_id}.msg", target)
        if unnoted:
            (self.dead / f"{queue_id}{UNNOTED}").touch(mode=FILE_MODE)
        state = self.read_state(queue_id, dead=True)
        state.dead.update(reasons)
        state.last_reply = last_reply
        write_atomically(self.dead / f"{queue_id}.state", self._state_bytes(queue_id, state, DEAD_STATE), sync_dir=True)

    def requeue(self, queue_id: str) -> None:
        """Back from dead/ to queue/ for the recipients that died (attempted afresh); those still pending stay."""
        dead_state = self.read_state(queue_id, dead=True)
        if not (self.queue / f"{queue_id}.msg").exists():
            os.link(self.dead / f"{queue_id}.msg", self.queue / f"{queue_id}.msg")
            pending: list[str] = []
        else:
            queued = self.read_state(queue_id)
            envelope = self.read_envelope(queue_id)
            pending = list(queued.recipients if queued.recipients is not None else envelope.recipients)
        recipients = pending + [r for r in dead_state.dead if r not in pending]
        self.write_state(queue_id, EntryState(recipients=recipients or None))
        fsync_dir(self.queue)
        for suffix in (".msg", ".state", UNNOTED):  # attempted afresh: new outcomes, new notes
            with contextlib.suppress(FileNotFoundError):
                (self.dead / f"{queue_id}{suffix}").unlink()

    def delete(self, queue_id: str) -> bool:
        found = False
        for directory in (self.queue, self.dead):
            for suffix in (".msg", ".state", UNNOTED):  # deleted: no bounce either
                with contextlib.suppress(FileNotFoundError):
                    (directory / f"{queue_id}{suffix}").unlink()
                    found = True
        return found

    def writable(self) -> str:
        """'ok', or why a message could not be stored now (for /readyz)."""
        probe = self.tmp / ".ready-probe"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return f"spool not writable: {exc.strerror or exc}"
        return "ok"

    def write_status(self, status: dict[str, object]) -> None:
        write_atomically(self.path / STATUS, json.dumps(status).encode(), sync_dir=False)

    def read_status(self) -> dict[str, object]:
        try:
            loaded: dict[str, object] = json.loads((self.path / STATUS).read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return loaded

    def request_flush(self) -> None:
        (self.path / FLUSH_REQUEST).touch(mode=FILE_MODE)

    def take_flush_request(self) -> set[str] | None:
        """What `relay queue flush` asked for: None (nothing), an empty set (everything), or the ids named."""
        path = self.path / FLUSH_REQUEST
        try:
            text = path.read_text(encoding="ascii", errors="replace")
            path.unlink()
        except FileNotFoundError:
            return None
        return {line.strip() for line in text.splitlines() if line.strip()}

    def recover(self) -> Listing:
        """Start-up: drop what was never acknowledged and state files whose message is gone; return what
        queue/ holds (the same directory pass: start-up reads nothing more before it listens)."""
        self.create()
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():  # not ours: leave it, but do not fail start-up over it
                continue
            leftover.unlink()
        tidy(self.dead)
        return tidy(self.queue)


def tidy(directory: Path) -> Listing:
    """Start-up, for queue/ or dead/: .tmp files and orphan .state files go; the rest is listed."""
    names = os.listdir(directory)  # names only: no stat, no DirEntry per file
    listing = Listing({name[: -len(".msg")] for name in names if name.endswith(".msg")}, set())
    for name in names:
        if name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))
        elif name.endswith(".state"):
            queue_id = name[: -len(".state")]  # an orphan by the listing is checked once more
            if queue_id in listing.ids or os.path.exists(os.path.join(directory, queue_id + ".msg")):
                listing.with_state.add(queue_id)
            else:
                os.unlink(os.path.join(directory, name))
    return listing


@dataclass(slots=True)
class Listing:
    """queue/ at start-up: the message ids, and which of them have a .state file."""

    ids: set[str]
    with_state: set[str]


def tighten(directories: Iterable[Path]) -> None:
    """Start-up: a spool an older relay made (0755 directories) becomes private, and the log says so."""
    for directory in directories:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(directory.stat().st_mode)
            if not mode & 0o077:
                continue
            try:
                os.chmod(directory, DIR_MODE)
            except OSError as exc:  # not ours (a volume's mount point): say so, but serve
                log.error("spool_permissions_open", path=str(directory), mode=f"{mode:o}", error=exc.strerror)
                continue
            log.warning("spool_permissions_tightened", path=str(directory), old=f"{mode:o}", new=f"{DIR_MODE:o}")


def write_all_at(fd: int, views: list[memoryview], offset: int) -> int:
    """pwritev from `offset` until everything is written (a large message may take several calls);
    returns the offset after the last byte."""
    while views:  # an empty view is popped without a call of its own (written >= 0)
        written = os.pwritev(fd, views[:512], offset)  # IOV_MAX is 1024 on Linux
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]
    return offset


def _opener(sealer: Sealer | None) -> Sealer:
    if sealer is None:
        raise SealError("sealed, but spool.encryption_key_file is not set")
    return sealer


def read_message_file(path: Path, queue_id: str, sealer: Sealer | None) -> tuple[bytes, bytes]:
    """(envelope line, exact bytes) of a .msg file, sealed or written before encryption was turned on."""
    with open(path, "rb") as handle:
        if not is_sealed(handle.peek(HEADER.size)):
            return handle.readline(), handle.read()
        data = handle.read()
    return _opener(sealer).open_message(queue_id, data)


def file_key_id(path: str) -> str | None:
    """The key id a .msg or .state file is sealed with, "plain", "damaged", or None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # something that is not a file (a FIFO) must not hang
    except FileNotFoundError:
        return None
    try:
        head = os.read(fd, HEADER.size)
    finally:
        os.close(fd)
    if not is_sealed(head):
        return "plain"
    try:
        return peek(head).key_id
    except SealError:
        return "damaged"


def parse_state(sealer: Sealer | None, queue_id: str, raw: bytes, kind: bytes) -> EntryState:
    if is_sealed(raw):
        raw = _opener(sealer).open(kind, queue_id, raw)[0]
    fields = json.loads(raw)
    known = EntryState.__dataclass_fields__
    return EntryState(**{k: v for k, v in fields.items() if k in known})  # a newer version's keys: ignored


def _read_if_there(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def envelope_line(path: str, queue_id: str, sealer: Sealer | None) -> bytes:
    """The envelope line of a .msg file, by plain os calls; of a sealed one only the envelope is read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = _read_until(fd, b"", HEADER.size)
        if is_sealed(head):
            return _opener(sealer).open_envelope(queue_id, _read_until(fd, head, peek(head).end))[0]
        while b"\n" not in head and (more := os.read(fd, ENVELOPE_READ)):
            head += more
        return head[: head.find(b"\n") + 1] or head
    finally:
        os.close(fd)


def _read_until(fd: int, data: bytes, size: int) -> bytes:
    """`data` (what was read of fd so far) extended to `size` bytes, or to the end of the file."""
    while len(data) < size:
        more = os.read(fd, max(size - len(data), ENVELOPE_READ))
        if not more:
            break
        data += more
    return data


def bounce_noted(dead: Path, queue_id: str) -> None:
    """The dead letter's bounce is noted in the history (or will never be): its UNNOTED marker goes."""
    with contextlib.suppress(FileNotFoundError):
        (dead / f"{queue_id}{UNNOTED}").unlink()


def unnoted_ids(dead: Path) -> list[str]:
    """Dead letters whose bounce's note may not be in the history (Spool.dead_letter)."""
    return sorted(path.name.removesuffix(UNNOTED) for path in dead.glob(f"*{UNNOTED}"))


def _ids(directory: Path) -> Iterator[str]:
    for entry in os.scandir(directory):
        if entry.name.endswith(".msg"):
            yield entry.name[: -len(".msg")]
