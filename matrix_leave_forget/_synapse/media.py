"""Synapse's events and media as the media reference index and media deletion need them."""

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from synapse.module_api import LoggingTransaction, ModuleApi

# A parameter, not a literal: with psycopg2 a literal % in the statement is
# read as a placeholder.
MXC_LIKE = "%mxc://%"

# One row per event: stream ordering, event id, room id, type, event JSON.
EventRow = tuple[int, str, str, str, str]


def events_with_mxc_txn(
    txn: LoggingTransaction, after: int, upto: int, paramstyle: str = "?"
) -> list[EventRow]:
    """The events in stream range (after, upto] whose JSON holds an ``mxc://`` URI.

    Why: no module API reads events by stream position; the module reads
    ``events`` and ``event_json`` (the same columns on Synapse 1.98 and
    1.163). The LIKE keeps the JSON of events without media (nearly all of
    them) in the database; the range is one scan of the stream-ordering index.
    """
    txn.execute(
        "SELECT e.stream_ordering, e.event_id, e.room_id, e.type, j.json"
        " FROM events AS e JOIN event_json AS j ON j.event_id = e.event_id"
        " WHERE e.stream_ordering > ? AND e.stream_ordering <= ?"
        " AND j.json LIKE ?".replace("?", paramstyle),
        (after, upto, MXC_LIKE),
    )
    return [(int(r[0]), r[1], r[2], r[3], r[4]) for r in txn.fetchall()]


def stream_bounds_txn(txn: LoggingTransaction) -> tuple[int, int]:
    """(lowest, highest) stream ordering of Synapse's events; (0, 0) on an empty server.

    Why: events back-filled over federation take negative stream orderings,
    so the lowest one is where a back-fill over every event starts.
    """
    txn.execute(
        "SELECT COALESCE(MIN(stream_ordering), 0), COALESCE(MAX(stream_ordering), 0) FROM events"
    )
    row = txn.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def room_media_facts_txn(
    txn: LoggingTransaction, room_id: str, with_rows: bool = True, paramstyle: str = "?"
) -> tuple[bool, int, list[EventRow]]:
    """(encrypted, last stream ordering, events holding an mxc URI) of a room about to be purged.

    Why: after Synapse's purge the room's events are gone, and its current
    state already is once no local user is joined; whether it was encrypted
    is read from its ``m.room.encryption`` event in ``events``, and its own
    events with media are read here (through the room's index) so that the
    index holds them even if it had not reached them yet. Same tables on
    Synapse 1.98 and 1.163. ``paramstyle``: ``%s`` from the offline CLI on a
    raw psycopg2 cursor (Synapse's LoggingTransaction converts ``?`` itself).
    """
    txn.execute(
        "SELECT 1 FROM events WHERE room_id = ? AND type = ? LIMIT 1".replace("?", paramstyle),
        (room_id, "m.room.encryption"),
    )
    encrypted = txn.fetchone() is not None
    txn.execute(
        "SELECT COALESCE(MAX(stream_ordering), 0) FROM events WHERE room_id = ?".replace(
            "?", paramstyle
        ),
        (room_id,),
    )
    row = txn.fetchone()
    max_stream = int(row[0]) if row else 0
    if not with_rows:
        return encrypted, max_stream, []
    txn.execute(
        "SELECT e.stream_ordering, e.event_id, e.room_id, e.type, j.json"
        " FROM events AS e JOIN event_json AS j ON j.event_id = e.event_id"
        " WHERE e.room_id = ? AND j.json LIKE ?".replace("?", paramstyle),
        (room_id, MXC_LIKE),
    )
    rows = [(int(r[0]), r[1], r[2], r[3], r[4]) for r in txn.fetchall()]
    return encrypted, max_stream, rows


# Why a medium is never deleted, whatever room referenced it.
KEPT_PROFILE_AVATAR = "profile_avatar"
KEPT_SAFE_FROM_QUARANTINE = "safe_from_quarantine"


def media_facts_txn(
    txn: LoggingTransaction, server_name: str, origin: str, media_id: str, paramstyle: str = "?"
) -> tuple[int | None, str | None, str | None]:
    """What Synapse holds of one medium: (bytes or None if absent, remote file id, kept).

    ``kept``: why it is never deleted (KEPT_PROFILE_AVATAR: a user's profile
    avatar in ``profiles``; KEPT_SAFE_FROM_QUARANTINE: marked so in
    ``local_media_repository``), or None.

    Why: no module API reads the media tables; the columns read are the same
    on Synapse 1.98 and 1.163. ``paramstyle``: as :func:`room_media_facts_txn`'s.
    """
    txn.execute(
        "SELECT 1 FROM profiles WHERE avatar_url = ?".replace("?", paramstyle),
        (f"mxc://{origin}/{media_id}",),
    )
    profile = KEPT_PROFILE_AVATAR if txn.fetchone() is not None else None
    if origin == server_name:
        txn.execute(
            "SELECT media_length, safe_from_quarantine FROM local_media_repository"
            " WHERE media_id = ?".replace("?", paramstyle),
            (media_id,),
        )
        row = txn.fetchone()
        if row is None:
            return None, None, profile
        safe = KEPT_SAFE_FROM_QUARANTINE if row[1] else None
        return int(row[0] or 0), None, profile or safe
    txn.execute(
        "SELECT media_length, filesystem_id FROM remote_media_cache"
        " WHERE media_origin = ? AND media_id = ?".replace("?", paramstyle),
        (origin, media_id),
    )
    row = txn.fetchone()
    if row is None:
        return None, None, profile
    return int(row[0] or 0), str(row[1]), profile


def can_delete_media(api: ModuleApi) -> bool:
    """Whether this process holds the media store (Synapse's media repository runs here).

    Why: with a media-repository worker, the main process has no media store
    (``enable_media_repo: false``); only ``hs.config.media`` says so (1.98 and 1.163).
    """
    return bool(api._hs.config.media.can_load_media_repo)


def is_media_deleter(
    holds_media_store: bool, media_jobs_instance: str | None, instance_name: str
) -> bool:
    """The rule of which process deletes purged rooms' media (docs/workers.md "Media").

    A process that holds the media store, and, when
    ``media_instance_running_background_jobs`` names one instance, only that
    one (Synapse's own choice of the media instance that runs the media
    repository's background jobs; this deletion is one). Unset, every process
    holding the media store may delete, one at a time
    (:func:`media_deletion_lock`).
    """
    if not holds_media_store:
        return False
    return media_jobs_instance is None or media_jobs_instance == instance_name


def media_deleter_here(api: ModuleApi) -> tuple[bool, str | None]:
    """(whether this process deletes purged rooms' media, the instance named to run media jobs).

    Why: the media store and ``media_instance_running_background_jobs`` are
    only in ``hs.config.media`` (1.98 and 1.163; without a media store
    Synapse does not set the latter), the instance name only in ``hs``.
    """
    media = api._hs.config.media
    chosen = getattr(media, "media_instance_running_background_jobs", None)
    chosen = str(chosen) if chosen is not None else None
    here = is_media_deleter(bool(media.can_load_media_repo), chosen, api._hs.get_instance_name())
    return here, chosen


# Synapse's worker lock held by the process deleting media (worker_locks.lock_name).
MEDIA_DELETION_LOCK = "matrix_leave_forget_media_deletion"


@asynccontextmanager
async def media_deletion_lock(
    api: ModuleApi,
) -> AsyncIterator[Callable[[], Awaitable[bool]] | None]:
    """Hold the media deletion lock: one process at a time deletes media.

    Yields None when another process holds it; else a function that says
    whether this process still holds it (checked before each medium).

    Why: Synapse's ``LockStore.try_acquire_lock`` is the lock its own
    workers share (``worker_locks``, both databases; the same on 1.98 and
    1.163): renewed every 30 s while held, released on exit and at shutdown,
    taken over by another process once not renewed for 2 minutes (a process
    killed while holding it), and taken back at once by the same instance
    restarted. No ModuleApi method takes a lock between processes.
    """
    store: Any = api._hs.get_datastores().main
    lock = await store.try_acquire_lock(MEDIA_DELETION_LOCK, "")
    if lock is None:
        yield None
        return
    async with lock:
        yield lock.is_still_valid


async def delete_local_media(api: ModuleApi, media_id: str) -> None:
    """Delete a local medium's file, thumbnails and rows through Synapse's media repository.

    Why: ``MediaRepository.delete_local_media_ids`` (what Synapse's admin API
    calls; ``(media_ids: list) -> (deleted, count)`` on 1.98 and 1.163)
    removes the file and the thumbnail directory and then the rows; a file
    already gone (a deletion resumed after a crash) is skipped, so it can be
    called again. No ModuleApi method deletes media.
    """
    await api._hs.get_media_repository().delete_local_media_ids([media_id])


async def delete_remote_media(api: ModuleApi, origin: str, media_id: str, file_id: str) -> None:
    """Drop one cached remote medium (file, thumbnails, rows): it can be fetched again.

    Why: Synapse deletes cached remote media only by age
    (``delete_old_remote_media``); this does for one medium what that does
    for each, under the same linearizer, with the same repository paths and
    store method (1.98 and 1.163).
    """
    repo: Any = api._hs.get_media_repository()
    async with repo.remote_media_linearizer.queue((origin, media_id)):
        try:
            os.remove(repo.filepaths.remote_media_filepath(origin, file_id))
        except FileNotFoundError:
            pass
        shutil.rmtree(
            repo.filepaths.remote_media_thumbnail_dir(origin, file_id), ignore_errors=True
        )
        await repo.store.delete_remote_media(origin, media_id)
