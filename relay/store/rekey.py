"""Which keys the spool's records need, the start-up check that they are all configured, and `relay queue
rekey`, which rewrites everything waiting under the current key so an old key can be retired.

The check reads only record headers (the key id, see relay/store/sealing.py): every journal record's and a
sample of queue/ and dead/ (key_sample). It writes nothing, so a relay started with a wrong or missing key
stops with a config error naming the key id before anything under the spool path is created, moved, changed
or deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from relay.store import journal
from relay.store.sealing import DEAD_STATE, STATE, MissingKeyError, Sealer, SealError, is_sealed
from relay.store.spool import Spool, file_key_id, fsync_dir, read_message_file, write_atomically

NOT_KEYS = ("plain", "damaged")  # census entries that are not key ids
KEY_SAMPLE = 64  # .msg (and .state) files per directory whose key id start-up checks


def key_census(spool: Spool) -> dict[str, int]:
    """Records (messages and states in queue/ and dead/, message records in journal/) by the key id that
    sealed them; "plain" for plaintext ones, "damaged" for a sealed header that does not check."""
    census = journal.key_census(spool.journal_dir)
    for directory in (spool.queue, spool.dead):
        if not directory.is_dir():
            continue
        for entry in os.scandir(directory):
            if entry.name.endswith((".msg", ".state")):
                name = file_key_id(entry.path)
                if name is not None:
                    census[name] = census.get(name, 0) + 1
    return census


def key_sample(spool: Spool, per_kind: int = KEY_SAMPLE) -> dict[str, int]:
    """key_census for start-up: every journal record (recovery reads them all anyway), but of queue/ and
    dead/ only about `per_kind` .msg and as many .state files, spread over the directory listing, with the
    oldest and the newest (ids sort by arrival). A key still needed seals a run of messages that the sample
    meets unless it is a small share of them; a message the sample missed that no configured key opens is
    reported when start-up reads it (spool_entry_key_missing) and left in place."""
    census = journal.key_census(spool.journal_dir)
    for directory in (spool.queue, spool.dead):
        if not directory.is_dir():
            continue
        names = os.listdir(directory)
        for suffix in (".msg", ".state"):
            found = [name for name in names if name.endswith(suffix)]
            if not found:
                continue
            for name in {*found[:: max(1, len(found) // per_kind)], min(found), max(found)}:
                key = file_key_id(os.path.join(directory, name))
                if key is not None:
                    census[key] = census.get(key, 0) + 1
    return census


def check_keys(spool: Spool) -> None:
    """MissingKeyError (a config error) naming every key id the spool has records of that the config
    does not hold (by key_sample: start-up must not read every file before it listens)."""
    census = key_sample(spool)
    held = set(spool.sealer.key_ids) if spool.sealer is not None else set()
    missing = sorted(name for name in census if name not in held and name not in NOT_KEYS)
    if not missing:
        spool.keys_checked = True  # one check per start
        return
    records, ids = sum(census[name] for name in missing), ", ".join(missing)
    if spool.sealer is None:
        raise MissingKeyError(
            f"spool.encryption_key_file: not set, but {spool.path} holds record(s) sealed with key id {ids} "
            f"({records} of those checked); set it (or spool.old_key_files) to the key file(s) with that id. "
            "Nothing under the spool was changed"
        )
    raise MissingKeyError(
        f"spool.encryption_key_file: {spool.path} holds record(s) sealed with key id {ids} ({records} of those "
        f"checked), which is neither the current key ({spool.sealer.current_id}) nor in spool.old_key_files; add "
        "the key file with that id to spool.old_key_files. Nothing under the spool was changed"
    )


@dataclass
class Rekeyed:
    rewritten: int = 0  # files in queue/ and dead/ sealed again under the current key
    from_journal: int = 0  # messages moved from journal/ into queue/ (so the segments could go)
    unchanged: int = 0  # already under the current key
    damaged: list[str] = field(default_factory=list)  # left as they are (and reported)


def rekey(spool: Spool) -> Rekeyed:
    """Everything waiting, under the current key; the caller holds the spool lock (the relay is stopped).
    Each file is replaced atomically after an fsync, so a crash midway leaves every file readable with the
    keys configured; running it again finishes the job."""
    assert spool.sealer is not None, "rekey needs spool.encryption_key_file"
    result = Rekeyed()
    result.from_journal, damaged = journal.promote_journal(spool)  # then no segment is needed
    result.damaged += [f"journal/{d.segment} at {d.offset}: {d.reason}" for d in damaged]
    linked = _linked_dead_letters(spool)
    for directory in (spool.queue, spool.dead):
        for name in sorted(os.listdir(directory)):
            if not name.endswith((".msg", ".state")):
                continue
            path = directory / name
            key = file_key_id(str(path))
            if key is None:
                continue  # gone since the listing
            if key == spool.sealer.current_id:
                result.unchanged += 1
            elif directory == spool.dead and name in linked:
                _relink(spool.queue / name, path)  # the queue/ copy was just rewritten: share it again
                result.rewritten += 1
            else:
                try:
                    _rewrite(spool.sealer, path, dead=directory == spool.dead)
                except (SealError, ValueError) as exc:
                    result.damaged.append(f"{path}: {exc}")
                    continue
                result.rewritten += 1
        fsync_dir(directory)
    return result


def _linked_dead_letters(spool: Spool) -> set[str]:
    """dead/<id>.msg files that are hard links of queue/<id>.msg (some recipients died, others wait)."""
    linked = set()
    for name in os.listdir(spool.dead):
        queued = spool.queue / name
        if name.endswith(".msg") and queued.exists() and os.path.samefile(spool.dead / name, queued):
            linked.add(name)
    return linked


def _relink(source: Path, target: Path) -> None:
    temporary = target.with_name(target.name + ".tmp")
    temporary.unlink(missing_ok=True)
    os.link(source, temporary)
    os.replace(temporary, target)


def _rewrite(sealer: Sealer, path: Path, *, dead: bool) -> None:
    queue_id = path.name.rsplit(".", 1)[0]
    if path.name.endswith(".msg"):
        line, body = read_message_file(path, queue_id, sealer)
        data = b"".join(sealer.seal_message(queue_id, line, [body]))
    else:
        kind = DEAD_STATE if dead else STATE
        raw = path.read_bytes()
        plain = sealer.open(kind, queue_id, raw)[0] if is_sealed(raw) else raw
        data = b"".join(sealer.seal(kind, queue_id, plain))
    write_atomically(path, data, sync_dir=False)
