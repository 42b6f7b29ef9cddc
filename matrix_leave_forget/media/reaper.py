"""A purged room's media goes with it: what nothing else references, after a grace.

Steps, each a transaction of its own, so that a crash (or SIGKILL) anywhere
resumes from the tables (docs/retention.md "Media"):

1. Before Synapse purges a room (:meth:`MediaReaper.before_purge`): whether
   it is encrypted, where its events end in the stream, and its own events'
   references (added to the index: it may not have read the newest yet).
2. Once it is purged and the reference index has read past its events and
   finished its back-fill: each medium its events referenced is *due* (after
   ``retention.media_grace``) or *kept*, with the reason: an encrypted room
   (the server cannot see which media its events use), another room's event,
   a profile avatar, safe from quarantine.
3. A download or thumbnail of a due medium during the grace cancels its
   deletion (:meth:`MediaReaper.on_media_read`).
4. Past the grace, each due medium is checked again (a reference made during
   the grace keeps it) and deleted through Synapse's media repository, then
   marked deleted. Deleting twice is harmless: a resumed deletion finds the
   file gone and deletes the rows. This step runs on the process that holds
   the media store (:meth:`MediaReaper.delete_tick` on a media-repository
   worker), under a lock that lets one process at a time delete.
5. When none of a room's media is due any more, a ``purge``/``media_deleted``
   audit entry records what was deleted and kept (its ``receipt``).
"""

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget._synapse.media import (
    can_delete_media,
    delete_local_media,
    delete_remote_media,
    media_deleter_here,
    media_deletion_lock,
    media_facts_txn,
    room_media_facts_txn,
)
from matrix_leave_forget.audit.log import AuditFields, AuditLog
from matrix_leave_forget.config import MEDIA_DELETE, RetentionConfig
from matrix_leave_forget.db.media import (
    CANCELLED_DOWNLOADED,
    KEPT_ENCRYPTED_ROOM,
    MEDIA_CANCELLED,
    MEDIA_DELETED,
    MEDIA_DUE,
    MEDIA_KEPT,
    MediaRefStore,
    decide_room_media_txn,
    due_media_txn,
    is_due_txn,
    mark_reported_txn,
    purged_rooms_waiting_txn,
    record_room_txn,
    referenced_elsewhere_txn,
    room_media_rows_txn,
    rooms_settled_txn,
    schedule_room_txn,
    settle_media_txn,
)
from matrix_leave_forget.db.media import (
    KEPT_REFERENCED_ELSEWHERE as REFERENCED,
)
from matrix_leave_forget.media.index import (
    MediaIndexer,
    index_covers,
    refs_of_rows,
    unindexed_refs_txn,
)
from matrix_leave_forget.retention.receipt import OUTCOME_MEDIA_DELETED, encode_receipt
from matrix_leave_forget.timestamps import now_ms

logger = logging.getLogger(__name__)

# How often due media and purged rooms are looked at.
INTERVAL_MS = 1000
# Media deleted per run (each is a few file operations and a transaction).
BATCH = 100

# Media listed per room by preview().
PREVIEW_LIMIT = 1000


def media_receipt(
    rows: list[tuple[str, str, str, str | None, int]], server_name: str
) -> dict[str, Any]:
    """The ``media_deleted`` entry's receipt: counts and bytes deleted, kept and why.

    Args:
        rows: ``room_media_rows_txn``'s rows of the room.
    """
    media: dict[str, Any] = {
        "policy": MEDIA_DELETE,
        "local_items": 0,
        "local_bytes": 0,
        "remote_items": 0,
        "remote_bytes": 0,
        "kept_referenced_elsewhere": 0,
        "kept_encrypted_room": 0,
    }
    reasons: Counter[str] = Counter()
    for origin, _media_id, state, reason, size in rows:
        if state == MEDIA_DELETED:
            where = "local" if origin == server_name else "remote"
            media[f"{where}_items"] += 1
            media[f"{where}_bytes"] += size
            continue
        reasons[f"{state}:{reason}"] += 1
        if reason == KEPT_ENCRYPTED_ROOM:
            media["kept_encrypted_room"] += 1
        else:
            media["kept_referenced_elsewhere"] += 1
    media["kept"] = dict(sorted(reasons.items()))
    return {"media": media}


def preview_txn(
    txn: LoggingTransaction, room_id: str, server_name: str, paramstyle: str = "?"
) -> dict[str, Any]:
    """What a purge of the room would do with its media now; read only, in one transaction.

    Shared by the admin API's room detail and the offline CLI (``paramstyle``:
    ``%s`` on a raw psycopg2 cursor).

    Returns:
        ``encrypted``; ``index_ready`` (the index finished its back-fill,
        read past the room's events and is at most a stretch behind the
        head, the events past it read here: every reference of the room and
        from elsewhere is in the decisions, as in the deletion's own check);
        ``media``: up to
        PREVIEW_LIMIT decisions, each ``mxc``, ``decision`` (``due``: deleted
        after the grace, or ``kept``), ``reason`` and ``bytes``.
    """
    encrypted, max_stream, _rows = room_media_facts_txn(
        txn, room_id, with_rows=False, paramstyle=paramstyle
    )
    # Read before the decisions: the index has the room's own references once
    # it read past the room's events; with the events past the index, it has
    # every reference from elsewhere the decisions below could see (as
    # MediaReaper's check before a deletion).
    positions = MediaRefStore.positions_txn(txn, paramstyle)
    unindexed = unindexed_refs_txn(txn, paramstyle, positions)
    ready = unindexed is not None and index_covers(positions, max_stream)
    decisions = decide_room_media_txn(
        txn, room_id, encrypted, server_name, media_facts_txn, PREVIEW_LIMIT, paramstyle
    )
    media = []
    for origin, media_id, decision, reason, size in decisions:
        # Only once ready: before, the room's own newest events may be past the index.
        if ready and decision == MEDIA_DUE and (origin, media_id) in (unindexed or ()):
            decision, reason = MEDIA_KEPT, REFERENCED
        media.append(
            {
                "mxc": f"mxc://{origin}/{media_id}",
                "decision": decision,
                "reason": reason,
                "bytes": size,
            }
        )
    return {"encrypted": encrypted, "index_ready": ready, "media": media}


class MediaReaper:
    """Deletes purged rooms' unreferenced media.

    The background-tasks process decides purged rooms' media and writes the
    report entries (:meth:`tick`); the deletion runs where the media store is
    (:attr:`deletes_here`): there too in a single process, on the
    media-repository worker otherwise (:meth:`delete_tick`).

    Args:
        api: The module API.
        config: The retention config (``media``, ``media_grace_ms``).
        index: The media reference index.
        audit: The audit log (the ``media_deleted`` entries).
    """

    def __init__(
        self, api: ModuleApi, config: RetentionConfig, index: MediaIndexer, audit: AuditLog
    ) -> None:
        self._api = api
        self._config = config
        self._index = index
        self._audit = audit
        self._running = False
        self._deleting = False
        self._said_where = False
        self._deletes_here, self._media_jobs_instance = media_deleter_here(api)

    @property
    def enabled(self) -> bool:
        return self._config.media == MEDIA_DELETE and not self._config.dry_run

    @property
    def deletes_here(self) -> bool:
        """Whether this process deletes due media (it holds the media store; docs/workers.md)."""
        return self.enabled and self._deletes_here

    async def before_purge(self, room_id: str) -> None:
        """Remember whether a room about to be purged is encrypted, and where its events end."""
        if not self.enabled:
            return

        def txn_fn(txn: LoggingTransaction) -> None:
            encrypted, max_stream, rows = room_media_facts_txn(txn, room_id)
            # The room's own references, whether or not the index reached them.
            MediaRefStore.insert_txn(txn, refs_of_rows(rows))
            record_room_txn(txn, room_id, encrypted, max_stream, now_ms())

        await self._api.run_db_interaction("leave_forget_media_before_purge", txn_fn)

    async def preview(self, room_id: str) -> dict[str, Any]:
        """What a purge of the room would do with its media now (the admin API's room detail).

        See :func:`preview_txn`, whose answer this returns with the policy.
        """
        preview = await self._api.run_db_interaction(
            "leave_forget_media_preview", preview_txn, room_id, self._api.server_name
        )
        return {"policy": self._config.media, **preview}

    async def on_media_read(self, origin: str, media_id: str) -> None:
        """A download or thumbnail request for a medium: cancel its deletion if it is due."""

        def txn_fn(txn: LoggingTransaction) -> int:
            if not is_due_txn(txn, origin, media_id):
                return 0
            return settle_media_txn(
                txn, origin, media_id, MEDIA_CANCELLED, CANCELLED_DOWNLOADED, now_ms()
            )

        cancelled = await self._api.run_db_interaction("leave_forget_media_read", txn_fn)
        if cancelled:
            logger.info(
                "Deletion of mxc://%s/%s cancelled: requested during its grace", origin, media_id
            )

    async def tick(self) -> None:
        """One run on the background-tasks process: decide purged rooms' media,
        delete what is past its grace if the media store is here, report."""
        if self._running or not self.enabled:
            return
        self._running = True
        try:
            await self._decide_rooms()
            if self._deletes_here:
                await self.delete_tick()
            else:
                self._say_where_media_is_deleted()
            await self._report()
        finally:
            self._running = False

    async def delete_tick(self) -> None:
        """Delete the media past its grace, if no other process is deleting (any process
        with the media store: :attr:`deletes_here`)."""
        if self._deleting or not self.deletes_here:
            return
        self._deleting = True
        try:
            # Most runs find nothing due: no lock taken for them.
            due = await self._api.run_db_interaction(
                "leave_forget_media_due", due_media_txn, now_ms(), 1
            )
            if not due:
                return
            async with media_deletion_lock(self._api) as still_held:
                if still_held is None:
                    logger.debug("Media due for deletion: another process is deleting it")
                    return
                await self._delete_due(still_held)
        finally:
            self._deleting = False

    def _say_where_media_is_deleted(self) -> None:
        if self._said_where:
            return
        self._said_where = True
        if can_delete_media(self._api):
            logger.info(
                "Purged rooms' media is deleted by %s (media_instance_running_background_jobs), "
                "not by this process",
                self._media_jobs_instance,
            )
        else:
            logger.info(
                "This process has no media store: purged rooms' media is deleted by the "
                "process that holds it (a media-repository worker with this module loaded)"
            )

    async def _decide_rooms(self) -> None:
        rooms = await self._api.run_db_interaction(
            "leave_forget_media_rooms_waiting", purged_rooms_waiting_txn
        )
        for room_id, encrypted, max_stream in rooms:
            # The index must have read every event that could reference the
            # room's media: its own, and everything else until now.
            if not await self._index.covers(max_stream):
                return
            due = await self._api.run_db_interaction(
                "leave_forget_media_schedule",
                schedule_room_txn,
                room_id,
                encrypted,
                self._api.server_name,
                now_ms(),
                self._config.media_grace_ms,
                media_facts_txn,
            )
            if encrypted:
                logger.info("Purged encrypted room %s: its media is kept", room_id)
            elif due:
                logger.info("Purged room %s: %d medium/media due for deletion", room_id, due)

    async def _delete_due(self, still_held: Callable[[], Awaitable[bool]]) -> None:
        due = await self._api.run_db_interaction(
            "leave_forget_media_due", due_media_txn, now_ms(), BATCH
        )
        if not due:
            return
        server_name = self._api.server_name
        for origin, media_id in due:
            if not await still_held():
                logger.warning("Lost the media deletion lock: stopping until the next run")
                return

            # A reference made during the grace (a forward into another room)
            # must be seen: the index, and the events it has not read yet,
            # up to the head, in the check's own transaction.
            def check_txn(
                txn: LoggingTransaction, origin: str = origin, media_id: str = media_id
            ) -> tuple[str | None, str | None, bool] | None:
                unindexed = unindexed_refs_txn(txn)
                if unindexed is None:
                    return None
                size, file_id, kept = media_facts_txn(txn, server_name, origin, media_id)
                if (origin, media_id) in unindexed or referenced_elsewhere_txn(
                    txn, origin, media_id, None
                ):
                    kept = REFERENCED
                return kept, file_id, size is not None

            checked = await self._api.run_db_interaction("leave_forget_media_check", check_txn)
            if checked is None:
                return  # the index is catching up: the next run
            kept, file_id, present = checked
            if kept is not None:
                await self._settle(origin, media_id, MEDIA_KEPT, kept)
                continue
            if present:
                if origin == server_name:
                    await delete_local_media(self._api, media_id)
                elif file_id is not None:
                    await delete_remote_media(self._api, origin, media_id, file_id)
            await self._settle(origin, media_id, MEDIA_DELETED, None)
            logger.info("Deleted mxc://%s/%s (a purged room's, past its grace)", origin, media_id)

    async def _settle(self, origin: str, media_id: str, state: str, reason: str | None) -> None:
        await self._api.run_db_interaction(
            "leave_forget_media_settle", settle_media_txn, origin, media_id, state, reason, now_ms()
        )

    async def _report(self) -> None:
        rooms = await self._api.run_db_interaction("leave_forget_media_settled", rooms_settled_txn)
        for room_id, encrypted in rooms:

            def txn_fn(
                txn: LoggingTransaction, room_id: str = room_id, encrypted: bool = encrypted
            ) -> None:
                rows = room_media_rows_txn(txn, room_id)
                mark_reported_txn(txn, room_id, now_ms())
                if not rows and not encrypted:
                    return  # no media: the purge's own receipt says all there is
                receipt = media_receipt(rows, self._api.server_name)
                receipt["media"]["encrypted_room"] = encrypted
                self._audit.append_txn(
                    txn,
                    AuditFields(
                        action="purge",
                        outcome=OUTCOME_MEDIA_DELETED,
                        room_id=room_id,
                        receipt=encode_receipt(receipt),
                    ),
                )

            await self._audit.run_locked("leave_forget_media_report", txn_fn)
