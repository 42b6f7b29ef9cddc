"""The media reference index's rows and its positions in Synapse's events stream."""

from collections.abc import Iterable, Sequence
from typing import Protocol

from synapse.module_api import LoggingTransaction, ModuleApi

# Positions (leave_forget_stream_positions.name): how far the index has read
# Synapse's events stream; where the back-fill of events from before the
# index ends (it is complete once ``forward`` reaches it); and the lowest
# stream ordering read (events back-filled over federation come below it).
STREAM_MEDIA_FORWARD = "media_refs"
STREAM_MEDIA_TARGET = "media_refs_backfill_target"
STREAM_MEDIA_LOW = "media_refs_low"

# One reference: (server name, media id, room id, event id, kind).
RefRow = tuple[str, str, str, str, str]


class MediaRefStore:
    """The reference index (leave_forget_media_refs).

    Args:
        api: The module API (for run_db_interaction).
    """

    def __init__(self, api: ModuleApi) -> None:
        self._api = api

    @staticmethod
    def positions_txn(txn: LoggingTransaction, paramstyle: str = "?") -> dict[str, int]:
        """The index's stream positions by name (absent until it first ran).

        Shared with the CLI (``paramstyle``: ``%s`` on a raw psycopg2 cursor).
        """
        names = (STREAM_MEDIA_FORWARD, STREAM_MEDIA_TARGET, STREAM_MEDIA_LOW)
        txn.execute(
            "SELECT name, stream_id FROM leave_forget_stream_positions"
            " WHERE name IN (?, ?, ?)".replace("?", paramstyle),
            names,
        )
        return {name: int(position) for name, position in txn.fetchall()}

    @staticmethod
    def start_txn(txn: LoggingTransaction, low: int, high: int) -> None:
        """Set the positions at the index's first run: back-fill every event from ``low``."""
        for name, position in (
            (STREAM_MEDIA_FORWARD, low - 1),
            (STREAM_MEDIA_TARGET, high),
            (STREAM_MEDIA_LOW, low),
        ):
            txn.execute(
                "INSERT INTO leave_forget_stream_positions (name, stream_id) VALUES (?, ?)",
                (name, position),
            )

    @staticmethod
    def insert_txn(txn: LoggingTransaction, refs: Iterable[RefRow]) -> None:
        """Add references (once each)."""
        txn.execute_batch(
            "INSERT INTO leave_forget_media_refs"
            " (media_origin, media_id, room_id, event_id, kind) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (media_origin, media_id, event_id, kind) DO NOTHING",
            list(refs),
        )

    @staticmethod
    def add_txn(txn: LoggingTransaction, refs: Iterable[RefRow], name: str, position: int) -> None:
        """Add references (once each) and move stream position ``name`` to ``position``.

        One transaction: a crash between the two re-reads the batch, and the
        unique key makes the re-read add nothing twice.
        """
        MediaRefStore.insert_txn(txn, refs)
        txn.execute(
            "UPDATE leave_forget_stream_positions SET stream_id = ? WHERE name = ?",
            (position, name),
        )

    async def positions(self) -> dict[str, int]:
        return await self._api.run_db_interaction(
            "leave_forget_media_positions", self.positions_txn
        )

    async def count(self) -> int:
        """How many references the index holds."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute("SELECT COUNT(*) FROM leave_forget_media_refs")
            row = txn.fetchone()
            return int(row[0]) if row else 0

        return await self._api.run_db_interaction("leave_forget_media_count", txn_fn)

    async def refs_of_room(self, room_id: str) -> Sequence[RefRow]:
        """The references a room's events make, in key order."""

        def txn_fn(txn: LoggingTransaction) -> list[RefRow]:
            txn.execute(
                "SELECT media_origin, media_id, room_id, event_id, kind"
                " FROM leave_forget_media_refs WHERE room_id = ?"
                " ORDER BY media_origin, media_id, event_id, kind",
                (room_id,),
            )
            return [tuple(r) for r in txn.fetchall()]  # type: ignore[misc]

        return await self._api.run_db_interaction("leave_forget_media_room_refs", txn_fn)


# leave_forget_media_rooms.state: waiting for the room's purge and for the
# index to cover its events; its media decided; the decision's entry written.
ROOM_WAITING = "waiting"
ROOM_SCHEDULED = "scheduled"
ROOM_REPORTED = "reported"

# leave_forget_media_deletions.state, and the reasons.
MEDIA_DUE = "due"
MEDIA_DELETED = "deleted"
MEDIA_KEPT = "kept"
MEDIA_CANCELLED = "cancelled"
KEPT_ENCRYPTED_ROOM = "encrypted_room"
KEPT_REFERENCED_ELSEWHERE = "referenced_elsewhere"
CANCELLED_DOWNLOADED = "downloaded_during_grace"


class FactsTxn(Protocol):
    """(bytes or None, remote file id, kept reason) of a medium: _synapse.media.media_facts_txn."""

    def __call__(
        self,
        txn: LoggingTransaction,
        server_name: str,
        origin: str,
        media_id: str,
        paramstyle: str = "?",
    ) -> tuple[int | None, str | None, str | None]: ...


def record_room_txn(
    txn: LoggingTransaction, room_id: str, encrypted: bool, max_stream: int, now: int
) -> None:
    """Remember a room about to be purged (once: a purge requested again keeps the first)."""
    txn.execute(
        "INSERT INTO leave_forget_media_rooms (room_id, state, encrypted, max_stream, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_id) DO NOTHING",
        (room_id, ROOM_WAITING, int(encrypted), max_stream, now),
    )


def purged_rooms_waiting_txn(txn: LoggingTransaction) -> list[tuple[str, bool, int]]:
    """(room id, encrypted, last stream ordering) of purged rooms whose media is undecided."""
    txn.execute(
        "SELECT m.room_id, m.encrypted, m.max_stream FROM leave_forget_media_rooms AS m"
        " JOIN leave_forget_rooms AS r ON r.room_id = m.room_id"
        " WHERE m.state = ? AND r.state = 'purged' ORDER BY m.room_id",
        (ROOM_WAITING,),
    )
    return [(str(r[0]), bool(r[1]), int(r[2])) for r in txn.fetchall()]


def referenced_elsewhere_txn(
    txn: LoggingTransaction, origin: str, media_id: str, room_id: str | None, paramstyle: str = "?"
) -> bool:
    """Whether an event of a room other than ``room_id`` (None: of any room) references it."""
    sql = "SELECT 1 FROM leave_forget_media_refs WHERE media_origin = ? AND media_id = ?"
    args: list[object] = [origin, media_id]
    if room_id is not None:
        sql += " AND room_id <> ?"
        args.append(room_id)
    txn.execute((sql + " LIMIT 1").replace("?", paramstyle), args)
    return txn.fetchone() is not None


# One decision: (server name, media id, state, reason, bytes).
Decision = tuple[str, str, str, str | None, int]


def decide_room_media_txn(
    txn: LoggingTransaction,
    room_id: str,
    encrypted: bool,
    server_name: str,
    facts_txn: FactsTxn,
    limit: int | None = None,
    paramstyle: str = "?",
) -> list[Decision]:
    """What becomes of each medium a room's events reference (Synapse holds), and why.

    Read only: :func:`schedule_room_txn` records it after the purge; the
    admin API and the CLI show it before (``dry_run``; ``paramstyle``: ``%s``
    from the CLI on a raw psycopg2 cursor).
    """
    sql = (
        "SELECT DISTINCT media_origin, media_id FROM leave_forget_media_refs WHERE room_id = ?"
        " ORDER BY media_origin, media_id"
    )
    args: list[object] = [room_id]
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    txn.execute(sql.replace("?", paramstyle), args)
    media = [(str(o), str(m)) for o, m in txn.fetchall()]
    decisions: list[Decision] = []
    for origin, media_id in media:
        size, _file_id, kept = facts_txn(txn, server_name, origin, media_id, paramstyle)
        if size is None:
            continue
        if encrypted:
            state, reason = MEDIA_KEPT, KEPT_ENCRYPTED_ROOM
        elif referenced_elsewhere_txn(txn, origin, media_id, room_id, paramstyle):
            state, reason = MEDIA_KEPT, KEPT_REFERENCED_ELSEWHERE
        elif kept is not None:
            state, reason = MEDIA_KEPT, kept
        else:
            state, reason = MEDIA_DUE, None
        decisions.append((origin, media_id, state, reason, size))
    return decisions


def schedule_room_txn(
    txn: LoggingTransaction,
    room_id: str,
    encrypted: bool,
    server_name: str,
    now: int,
    grace_ms: int,
    facts_txn: FactsTxn,
) -> int:
    """Record each medium a purged room referenced: due after the grace, or kept and why.

    The room's references leave the index in the same transaction (its
    events are gone). Media Synapse does not hold is not recorded.

    Returns:
        How many media became due.
    """
    decisions = decide_room_media_txn(txn, room_id, encrypted, server_name, facts_txn)
    txn.execute_batch(
        "INSERT INTO leave_forget_media_deletions"
        " (media_origin, media_id, room_id, state, reason, bytes, due_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (media_origin, media_id, room_id) DO NOTHING",
        [(o, m, room_id, s, r, b, now + grace_ms, now) for o, m, s, r, b in decisions],
    )
    txn.execute("DELETE FROM leave_forget_media_refs WHERE room_id = ?", (room_id,))
    txn.execute(
        "UPDATE leave_forget_media_rooms SET state = ?, updated_at = ? WHERE room_id = ?",
        (ROOM_SCHEDULED, now, room_id),
    )
    return sum(1 for d in decisions if d[2] == MEDIA_DUE)


def due_media_txn(txn: LoggingTransaction, now: int, limit: int) -> list[tuple[str, str]]:
    """Media whose grace is over and whose deletion is not done."""
    txn.execute(
        "SELECT DISTINCT media_origin, media_id FROM leave_forget_media_deletions"
        " WHERE state = ? AND due_at <= ? ORDER BY media_origin, media_id LIMIT ?",
        (MEDIA_DUE, now, limit),
    )
    return [(str(o), str(m)) for o, m in txn.fetchall()]


def settle_media_txn(
    txn: LoggingTransaction, origin: str, media_id: str, state: str, reason: str | None, now: int
) -> int:
    """Record what became of a medium still due (every room's row of it)."""
    txn.execute(
        "UPDATE leave_forget_media_deletions SET state = ?, reason = ?, updated_at = ?"
        " WHERE media_origin = ? AND media_id = ? AND state = ?",
        (state, reason, now, origin, media_id, MEDIA_DUE),
    )
    return max(txn.rowcount, 0)


def is_due_txn(txn: LoggingTransaction, origin: str, media_id: str) -> bool:
    txn.execute(
        "SELECT 1 FROM leave_forget_media_deletions"
        " WHERE media_origin = ? AND media_id = ? AND state = ? LIMIT 1",
        (origin, media_id, MEDIA_DUE),
    )
    return txn.fetchone() is not None


def rooms_settled_txn(txn: LoggingTransaction) -> list[tuple[str, bool]]:
    """(room id, encrypted) of rooms whose media is all decided and settled, not yet reported."""
    txn.execute(
        "SELECT room_id, encrypted FROM leave_forget_media_rooms AS m"
        " WHERE state = ? AND NOT EXISTS"
        " (SELECT 1 FROM leave_forget_media_deletions AS d"
        "  WHERE d.room_id = m.room_id AND d.state = ?) ORDER BY room_id",
        (ROOM_SCHEDULED, MEDIA_DUE),
    )
    return [(str(r[0]), bool(r[1])) for r in txn.fetchall()]


def room_media_rows_txn(
    txn: LoggingTransaction, room_id: str
) -> list[tuple[str, str, str, str | None, int]]:
    """(origin, media id, state, reason, bytes) of each medium a purged room referenced."""
    txn.execute(
        "SELECT media_origin, media_id, state, reason, bytes FROM leave_forget_media_deletions"
        " WHERE room_id = ? ORDER BY media_origin, media_id",
        (room_id,),
    )
    return [(str(o), str(m), str(s), r, int(b)) for o, m, s, r, b in txn.fetchall()]


def mark_reported_txn(txn: LoggingTransaction, room_id: str, now: int) -> None:
    txn.execute(
        "UPDATE leave_forget_media_rooms SET state = ?, updated_at = ? WHERE room_id = ?",
        (ROOM_REPORTED, now, room_id),
    )


def media_room_status_txn(
    txn: LoggingTransaction, room_id: str, paramstyle: str = "?"
) -> tuple[str, int, int | None] | None:
    """Where a purged room's media stands: (room state, media still due, when the last is
    due) or None if its purge decides no media (``keep``, ``dry_run``, an older purge).

    Shared with the CLI (``paramstyle``: ``%s`` on a raw psycopg2 cursor).
    """
    txn.execute(
        "SELECT state FROM leave_forget_media_rooms WHERE room_id = ?".replace("?", paramstyle),
        (room_id,),
    )
    row = txn.fetchone()
    if row is None:
        return None
    txn.execute(
        "SELECT COUNT(*), MAX(due_at) FROM leave_forget_media_deletions"
        " WHERE room_id = ? AND state = ?".replace("?", paramstyle),
        (room_id, MEDIA_DUE),
    )
    due, due_at = txn.fetchone() or (0, None)
    return str(row[0]), int(due or 0), int(due_at) if due_at is not None else None
