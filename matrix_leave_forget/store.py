"""The room-retention store: the module's own tables in Synapse's database.

SQL lives here and only here (Synapse's own tables are read through
``_synapse.SynapseInternals``). Every method runs one transaction under one
description string, as Synapse's stores do.
"""

import json
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import attr
from signedjson.types import SigningKey
from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget.audit import ENTRY_FIELDS, GENESIS_HASH, now_ms, seal_entry
from matrix_leave_forget.schema import is_postgres, run_migrations

logger = logging.getLogger(__name__)

# Retention states of a room (leave_forget_rooms.state).
STATE_ACTIVE = "active"  # was forgotten by all, then someone came back
STATE_FORGOTTEN = "forgotten"  # forgotten by every local user; purge pending if due
STATE_DRY_RUN = "dry_run"  # due, but dry_run was on: recorded, not purged
STATE_PURGING = "purging"  # Synapse was asked to purge it
STATE_PURGED = "purged"  # Synapse no longer has the room

AUDIT_COLUMNS: Sequence[str] = (*ENTRY_FIELDS, "hash", "signatures")

# Outcome of entries written by start-up reconciliation, for actions Synapse
# performed but whose audit write was lost (a crash between the two).
OUTCOME_RECOVERED = "recovered"


@attr.s(frozen=True, auto_attribs=True)
class AuditFields:
    """What the caller knows about an action; the store adds seq, chain and signature."""

    action: str
    outcome: str
    user_id: Optional[str] = None
    room_id: Optional[str] = None
    reason: Optional[str] = None
    event_id: Optional[str] = None
    device_id: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class RoomRetention:
    """One row of leave_forget_rooms."""

    room_id: str
    state: str
    forgotten_at: Optional[int]
    purge_due_at: Optional[int]
    purge_started_at: Optional[int]
    purged_at: Optional[int]
    cancelled_at: Optional[int]
    note: Optional[str]
    updated_at: int


_ROOM_COLUMNS = ", ".join(f.name for f in attr.fields(RoomRetention))

# Decides, inside a transaction, whether every local user has forgotten a room:
# (txn, room_id) -> None if they have, else why not. Provided by the handler,
# which asks Synapse's tables through the internals façade.
ForgottenCheck = Callable[[LoggingTransaction, str], Optional[str]]


class RetentionStore:
    """Audit log, per-room retention state and holds.

    Args:
        api: The module API (for run_db_interaction and the clock).
        origin: The server name entries are signed as.
        instance: This process's instance name, recorded in each entry.
        signing_key: The homeserver's signing key.
    """

    def __init__(self, api: ModuleApi, origin: str, instance: str, signing_key: SigningKey) -> None:
        self._api = api
        self._origin = origin
        self._instance = instance
        self._signing_key = signing_key

    async def setup(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        return await self._api.run_db_interaction("leave_forget_migrate", run_migrations)

    # -- audit -----------------------------------------------------------

    def _append_txn(self, txn: LoggingTransaction, fields: AuditFields) -> Dict[str, Any]:
        """Append one entry to the chain.

        Callers must have called _lock_chain_txn first in the same transaction.
        """
        txn.execute("SELECT seq, hash FROM leave_forget_audit ORDER BY seq DESC LIMIT 1")
        row = txn.fetchone()
        seq, prev_hash = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS_HASH)
        entry = seal_entry(
            {
                **attr.asdict(fields),
                "seq": seq,
                "ts": now_ms(),
                "origin": self._origin,
                "instance": self._instance,
                "prev_hash": prev_hash,
            },
            self._origin,
            self._signing_key,
        )
        values = [entry[c] for c in ENTRY_FIELDS] + [
            entry["hash"],
            json.dumps(entry["signatures"], sort_keys=True),
        ]
        txn.execute(
            f"INSERT INTO leave_forget_audit ({', '.join(AUDIT_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in AUDIT_COLUMNS)})",
            values,
        )
        return entry

    @staticmethod
    def _lock_chain_txn(txn: LoggingTransaction) -> None:
        """Serialise appenders across processes so the chain never forks.

        On PostgreSQL this must be the transaction's first statement, so that
        the REPEATABLE READ snapshot is taken after the lock and sees the
        latest head. SQLite allows one writer at a time already.
        """
        if is_postgres(txn):
            txn.execute("LOCK TABLE leave_forget_audit IN SHARE ROW EXCLUSIVE MODE")

    async def append(self, fields: AuditFields) -> Dict[str, Any]:
        """Append one audit entry on its own."""

        def txn_fn(txn: LoggingTransaction) -> Dict[str, Any]:
            self._lock_chain_txn(txn)
            return self._append_txn(txn, fields)

        return await self._api.run_db_interaction("leave_forget_append_audit", txn_fn)

    async def record_forget(
        self,
        fields: AuditFields,
        room_id: str,
        forgotten_check: ForgottenCheck,
        retention_period_ms: Optional[int],
    ) -> Tuple[Dict[str, Any], Optional[RoomRetention]]:
        """Record a successful forget and, atomically, whether the room is now forgotten by all.

        Returns:
            The audit entry, and the room's retention row if it was (re)marked
            as forgotten by every local user.
        """

        def txn_fn(
            txn: LoggingTransaction,
        ) -> Tuple[Dict[str, Any], Optional[RoomRetention]]:
            self._lock_chain_txn(txn)
            entry = self._append_txn(txn, fields)
            if forgotten_check(txn, room_id) is not None:
                return entry, None
            txn.execute("SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,))
            row = txn.fetchone()
            # A room already "forgotten" is re-armed: someone rejoined (or was
            # invited, or knocked) and is now the last to forget it, and the room
            # must stay a full period after that forget, not the earlier one.
            if row is not None and row[0] in (STATE_PURGING, STATE_PURGED):
                return entry, None
            now = int(entry["ts"])
            due = now + retention_period_ms if retention_period_ms is not None else None
            self._upsert_room_txn(
                txn,
                room_id,
                state=STATE_FORGOTTEN,
                forgotten_at=now,
                purge_due_at=due,
                purge_started_at=None,
                purged_at=None,
                cancelled_at=None,
                note=None,
                updated_at=now,
            )
            return entry, self._get_room_txn(txn, room_id)

        return await self._api.run_db_interaction("leave_forget_record_forget", txn_fn)

    # -- retention -------------------------------------------------------

    def _upsert_room_txn(self, txn: LoggingTransaction, room_id: str, **values: Any) -> None:
        columns = ["room_id", *values]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in values)
        txn.execute(
            f"INSERT INTO leave_forget_rooms ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT (room_id) DO UPDATE SET {updates}",
            [room_id, *values.values()],
        )

    @staticmethod
    def _get_room_txn(txn: LoggingTransaction, room_id: str) -> Optional[RoomRetention]:
        txn.execute(f"SELECT {_ROOM_COLUMNS} FROM leave_forget_rooms WHERE room_id = ?", (room_id,))
        row = txn.fetchone()
        return RoomRetention(*row) if row else None

    async def get_room(self, room_id: str) -> Optional[RoomRetention]:
        return await self._api.run_db_interaction(
            "leave_forget_get_room", self._get_room_txn, room_id
        )

    async def is_pending(self, room_id: str) -> bool:
        """Whether room_id is forgotten by all and not yet purged (cheap, no lock)."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            txn.execute(
                "SELECT 1 FROM leave_forget_rooms WHERE room_id = ? AND state IN (?, ?)",
                (room_id, STATE_FORGOTTEN, STATE_DRY_RUN),
            )
            return txn.fetchone() is not None

        return await self._api.run_db_interaction("leave_forget_is_pending", txn_fn)

    async def cancel(self, room_id: str, why: str) -> bool:
        """Mark a forgotten room active again (someone came back); False if it was not pending."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            self._lock_chain_txn(txn)
            txn.execute("SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,))
            row = txn.fetchone()
            if row is None or row[0] not in (STATE_FORGOTTEN, STATE_DRY_RUN):
                return False
            entry = self._append_txn(
                txn, AuditFields(action="purge", outcome="cancelled", room_id=room_id, reason=why)
            )
            txn.execute(
                "UPDATE leave_forget_rooms SET state = ?, cancelled_at = ?, note = ?, "
                "purge_due_at = NULL, updated_at = ? WHERE room_id = ?",
                (STATE_ACTIVE, entry["ts"], why, entry["ts"], room_id),
            )
            return True

        return await self._api.run_db_interaction("leave_forget_cancel_purge", txn_fn)

    async def get_due(self, now: int, limit: int) -> List[str]:
        """Rooms whose purge is due, oldest first."""

        def txn_fn(txn: LoggingTransaction) -> List[str]:
            txn.execute(
                "SELECT room_id FROM leave_forget_rooms "
                "WHERE state = ? AND purge_due_at IS NOT NULL AND purge_due_at <= ? "
                "ORDER BY purge_due_at LIMIT ?",
                (STATE_FORGOTTEN, now, limit),
            )
            return [str(r[0]) for r in txn.fetchall()]

        return await self._api.run_db_interaction("leave_forget_get_due", txn_fn)

    async def get_in_state(self, state: str, limit: int) -> List[str]:
        def txn_fn(txn: LoggingTransaction) -> List[str]:
            txn.execute(
                "SELECT room_id FROM leave_forget_rooms WHERE state = ? "
                "ORDER BY updated_at LIMIT ?",
                (state, limit),
            )
            return [str(r[0]) for r in txn.fetchall()]

        return await self._api.run_db_interaction("leave_forget_get_in_state", txn_fn)

    async def decide_purge(
        self,
        room_id: str,
        forgotten_check: ForgottenCheck,
        held: Callable[[LoggingTransaction, str], bool],
        dry_run: bool,
    ) -> str:
        """Re-check a due room and record the decision atomically.

        Returns:
            ``purge`` if the caller must now ask Synapse to purge the room, or
            ``cancelled`` / ``held`` / ``dry_run`` / ``skip``.
        """

        def txn_fn(txn: LoggingTransaction) -> str:
            self._lock_chain_txn(txn)
            room = self._get_room_txn(txn, room_id)
            if room is None or room.state != STATE_FORGOTTEN:
                return "skip"
            if held(txn, room_id):
                return "held"
            why_not = forgotten_check(txn, room_id)
            if why_not is not None:
                entry = self._append_txn(
                    txn,
                    AuditFields(
                        action="purge", outcome="cancelled", room_id=room_id, reason=why_not
                    ),
                )
                txn.execute(
                    "UPDATE leave_forget_rooms SET state = ?, cancelled_at = ?, note = ?, "
                    "purge_due_at = NULL, updated_at = ? WHERE room_id = ?",
                    (STATE_ACTIVE, entry["ts"], why_not, entry["ts"], room_id),
                )
                return "cancelled"
            outcome = "dry_run" if dry_run else "started"
            entry = self._append_txn(
                txn, AuditFields(action="purge", outcome=outcome, room_id=room_id)
            )
            txn.execute(
                "UPDATE leave_forget_rooms SET state = ?, purge_started_at = ?, "
                "updated_at = ? WHERE room_id = ?",
                (STATE_DRY_RUN if dry_run else STATE_PURGING, entry["ts"], entry["ts"], room_id),
            )
            return "dry_run" if dry_run else "purge"

        return await self._api.run_db_interaction("leave_forget_decide_purge", txn_fn)

    async def mark_purged(self, room_id: str) -> None:
        def txn_fn(txn: LoggingTransaction) -> None:
            self._lock_chain_txn(txn)
            entry = self._append_txn(
                txn, AuditFields(action="purge", outcome="purged", room_id=room_id)
            )
            txn.execute(
                "UPDATE leave_forget_rooms SET state = ?, purged_at = ?, updated_at = ? "
                "WHERE room_id = ? AND state = ?",
                (STATE_PURGED, entry["ts"], entry["ts"], room_id, STATE_PURGING),
            )

        await self._api.run_db_interaction("leave_forget_mark_purged", txn_fn)

    # -- holds -----------------------------------------------------------

    @staticmethod
    def is_held_txn(txn: LoggingTransaction, room_id: str) -> bool:
        txn.execute("SELECT 1 FROM leave_forget_holds WHERE room_id = ?", (room_id,))
        return txn.fetchone() is not None

    async def put_hold(self, room_id: str, held_by: str, reason: Optional[str]) -> bool:
        """Hold a room; False if it was already held."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            self._lock_chain_txn(txn)
            if self.is_held_txn(txn, room_id):
                return False
            entry = self._append_txn(
                txn,
                AuditFields(
                    action="hold", outcome="ok", user_id=held_by, room_id=room_id, reason=reason
                ),
            )
            txn.execute(
                "INSERT INTO leave_forget_holds (room_id, held_by, reason, created_at) "
                "VALUES (?, ?, ?, ?)",
                (room_id, held_by, reason, entry["ts"]),
            )
            return True

        return await self._api.run_db_interaction("leave_forget_put_hold", txn_fn)

    async def lift_hold(self, room_id: str, lifted_by: str) -> bool:
        """Lift a hold; False if there was none."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            self._lock_chain_txn(txn)
            if not self.is_held_txn(txn, room_id):
                return False
            self._append_txn(
                txn, AuditFields(action="unhold", outcome="ok", user_id=lifted_by, room_id=room_id)
            )
            txn.execute("DELETE FROM leave_forget_holds WHERE room_id = ?", (room_id,))
            return True

        return await self._api.run_db_interaction("leave_forget_lift_hold", txn_fn)

    async def get_holds(self) -> List[Dict[str, Any]]:
        return await self._api.run_db_interaction("leave_forget_get_holds", select_holds_txn)

    # -- operator queries --------------------------------------------------

    async def list_rooms(
        self, states: Iterable[str], after: Optional[str], limit: int
    ) -> List[RoomRetention]:
        """Rooms in any of ``states``, by room id, paged by keyset."""
        return await self._api.run_db_interaction(
            "leave_forget_list_rooms", list_rooms_txn, list(states), after, limit
        )

    async def audit_page(
        self,
        *,
        user_id: Optional[str] = None,
        room_id: Optional[str] = None,
        since_ts: Optional[int] = None,
        until_ts: Optional[int] = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> List[Dict[str, Any]]:
        """Audit entries in seq order, filtered, keyset-paged by ``after_seq``."""

        def txn_fn(txn: LoggingTransaction) -> List[Dict[str, Any]]:
            return select_audit_txn(
                txn,
                user_id=user_id,
                room_id=room_id,
                since_ts=since_ts,
                until_ts=until_ts,
                after_seq=after_seq,
                limit=limit,
            )

        return await self._api.run_db_interaction("leave_forget_audit_page", txn_fn)

    async def member_history(self, room_id: str) -> Dict[str, Dict[str, Any]]:
        """Each user's latest successful leave and forget in room_id, from the audit log."""

        def txn_fn(txn: LoggingTransaction) -> Dict[str, Dict[str, Any]]:
            txn.execute(
                "SELECT user_id, action, ts, reason, event_id FROM leave_forget_audit "
                "WHERE room_id = ? AND action IN ('leave', 'forget') AND outcome IN ('ok', 'noop') "
                "ORDER BY seq",
                (room_id,),
            )
            history: Dict[str, Dict[str, Any]] = {}
            for user_id, action, ts, reason, event_id in txn.fetchall():
                member = history.setdefault(str(user_id), {})
                member[f"{action}_ts"] = ts
                member[f"{action}_reason"] = reason
                if action == "leave":
                    member["leave_event_id"] = event_id
            return history

        return await self._api.run_db_interaction("leave_forget_member_history", txn_fn)

    # -- reconciliation after a crash ------------------------------------

    async def last_audit_ts(self) -> Optional[int]:
        """The time of the newest audit entry, or None for an empty log."""

        def txn_fn(txn: LoggingTransaction) -> Optional[int]:
            txn.execute("SELECT ts FROM leave_forget_audit ORDER BY seq DESC LIMIT 1")
            row = txn.fetchone()
            return int(row[0]) if row else None

        return await self._api.run_db_interaction("leave_forget_last_audit_ts", txn_fn)

    async def record_recovered_leave(
        self, event_id: str, room_id: str, user_id: str, reason: Optional[str]
    ) -> bool:
        """Record a leave Synapse has but the audit log lacks; False if it was recorded."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            self._lock_chain_txn(txn)
            txn.execute(
                "SELECT 1 FROM leave_forget_audit WHERE user_id = ? AND event_id = ?",
                (user_id, event_id),
            )
            if txn.fetchone() is not None:
                return False
            self._append_txn(
                txn,
                AuditFields(
                    action="leave",
                    outcome=OUTCOME_RECOVERED,
                    user_id=user_id,
                    room_id=room_id,
                    reason=reason,
                    event_id=event_id,
                ),
            )
            return True

        return await self._api.run_db_interaction("leave_forget_recover_leave", txn_fn)

    async def record_recovered_forgotten(
        self,
        room_id: str,
        forgotten_check: ForgottenCheck,
        retention_period_ms: Optional[int],
    ) -> bool:
        """Mark a room Synapse shows forgotten by all; False if its state already says so."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            self._lock_chain_txn(txn)
            room = self._get_room_txn(txn, room_id)
            if room is not None and room.state != STATE_ACTIVE:
                return False
            if forgotten_check(txn, room_id) is not None:
                return False
            entry = self._append_txn(
                txn, AuditFields(action="forget", outcome=OUTCOME_RECOVERED, room_id=room_id)
            )
            now = int(entry["ts"])
            self._upsert_room_txn(
                txn,
                room_id,
                state=STATE_FORGOTTEN,
                forgotten_at=now,
                purge_due_at=now + retention_period_ms if retention_period_ms else None,
                purge_started_at=None,
                purged_at=None,
                cancelled_at=None,
                note="found forgotten by every local user at start-up",
                updated_at=now,
            )
            return True

        return await self._api.run_db_interaction("leave_forget_recover_forgotten", txn_fn)


def row_to_entry(row: Sequence[Any]) -> Dict[str, Any]:
    """An audit row as the entry that was hashed and signed."""
    entry = dict(zip(AUDIT_COLUMNS, row, strict=True))
    entry["signatures"] = json.loads(entry["signatures"])
    for key in ("seq", "ts"):
        entry[key] = int(entry[key])
    return entry


def select_audit_txn(
    txn: Any,
    *,
    user_id: Optional[str] = None,
    room_id: Optional[str] = None,
    since_ts: Optional[int] = None,
    until_ts: Optional[int] = None,
    after_seq: int = 0,
    limit: Optional[int] = 100,
    paramstyle: str = "?",
) -> List[Dict[str, Any]]:
    """Select audit entries; shared by the admin API and the offline CLI.

    Args:
        txn: A DB-API cursor (Synapse's LoggingTransaction converts ``?``; the
            CLI passes psycopg2's ``%s`` as ``paramstyle``).
    """
    clauses = ["seq > ?"]
    args: List[Any] = [after_seq]
    for clause, value in (
        ("user_id = ?", user_id),
        ("room_id = ?", room_id),
        ("ts >= ?", since_ts),
        ("ts < ?", until_ts),
    ):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    sql = (
        f"SELECT {', '.join(AUDIT_COLUMNS)} FROM leave_forget_audit "
        f"WHERE {' AND '.join(clauses)} ORDER BY seq"
    )
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    txn.execute(sql.replace("?", paramstyle), args)
    return [row_to_entry(r) for r in txn.fetchall()]


def list_rooms_txn(
    txn: Any,
    states: Sequence[str],
    after: Optional[str],
    limit: int,
    paramstyle: str = "?",
) -> List[RoomRetention]:
    """Rooms in any of ``states``, by room id after ``after``; shared with the offline CLI.

    Args:
        txn: A DB-API cursor (see select_audit_txn for ``paramstyle``).
    """
    sql = (
        f"SELECT {_ROOM_COLUMNS} FROM leave_forget_rooms "
        f"WHERE state IN ({', '.join('?' for _ in states)}) AND room_id > ? "
        "ORDER BY room_id LIMIT ?"
    )
    txn.execute(sql.replace("?", paramstyle), (*states, after or "", limit))
    return [RoomRetention(*r) for r in txn.fetchall()]


def select_holds_txn(txn: Any) -> List[Dict[str, Any]]:
    """Every hold placed through the admin API, by room id; shared with the offline CLI."""
    txn.execute(
        "SELECT room_id, held_by, reason, created_at FROM leave_forget_holds ORDER BY room_id"
    )
    return [
        {"room_id": r[0], "held_by": r[1], "reason": r[2], "created_at": r[3]}
        for r in txn.fetchall()
    ]
