"""The retention state: rooms forgotten by every local user, their purges, and holds.

Each room's row in leave_forget_rooms (forgotten, due, purging, purged or
active again), the sweep's due decisions, holds placed through the admin API,
and the listings and counts the admin API and the offline CLI show. Every
change of state is recorded in the audit log in the same transaction (the
log's ``*_txn`` methods, after its chain lock).
"""

import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import attr
from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget._synapse.forget import remembering_members_txn
from matrix_leave_forget._synapse.sql import LIVE_MEMBERSHIPS, is_postgres
from matrix_leave_forget.audit.entry import escape_text, needs_escape, unescape_text
from matrix_leave_forget.audit.log import AuditFields, AuditLog
from matrix_leave_forget.retention.receipt import MEDIA_POLICY_KEEP, build_receipt, encode_receipt

# Retention states of a room (leave_forget_rooms.state).
STATE_ACTIVE = "active"  # was forgotten by all, then someone came back
STATE_FORGOTTEN = "forgotten"  # forgotten by every local user; purge pending if due
STATE_DRY_RUN = "dry_run"  # due, but dry_run was on: recorded, not purged
STATE_PURGING = "purging"  # Synapse was asked to purge it
STATE_PURGED = "purged"  # Synapse no longer has the room

# The states a listing (admin API, CLI) can ask for, and which stored states
# each one covers.
LISTINGS = {
    "forgotten": (STATE_FORGOTTEN, STATE_DRY_RUN),
    "pending": (STATE_FORGOTTEN,),
    "dry_run": (STATE_DRY_RUN,),
    "purged": (STATE_PURGING, STATE_PURGED),
}


@attr.s(frozen=True, auto_attribs=True)
class RoomRetention:
    """One row of leave_forget_rooms."""

    room_id: str
    state: str
    forgotten_at: int | None
    purge_due_at: int | None
    purge_started_at: int | None
    purged_at: int | None
    cancelled_at: int | None
    note: str | None
    updated_at: int


_ROOM_COLUMNS = ", ".join(f.name for f in attr.fields(RoomRetention))

# Decides, inside a transaction, which rooms some local user still has:
# (txn, room_ids) -> {room_id: why not forgotten by all}; the sweep's is
# why_not_forgotten_many_txn (a test may pass its own).
ForgottenCheckMany = Callable[[LoggingTransaction, Sequence[str]], dict[str, str]]


def why_not_forgotten_many_txn(txn: LoggingTransaction, room_ids: Sequence[str]) -> dict[str, str]:
    """Why each room some local user still has is remembered, set-based.

    Returns:
        {room_id: why} for the rooms that are still remembered.
    """
    known, with_members, members = remembering_members_txn(txn, room_ids)
    reasons: dict[str, str] = {}
    for room_id in room_ids:
        if room_id not in known:
            reasons[room_id] = "unknown room"
        elif room_id in members:
            reasons[room_id] = still_has(*members[room_id])
        elif room_id not in with_members:
            reasons[room_id] = "no local members"
    return reasons


def why_not_abandoned_many_txn(txn: LoggingTransaction, room_ids: Sequence[str]) -> dict[str, str]:
    """Why each room is not abandoned: a local user joined, invited or knocking, set-based.

    An abandoned room (docs/retention.md "Abandoned rooms") was left by every
    local user, forgotten or not; it is purged on an admin's decision, so a
    membership left but not forgotten does not keep it.

    Returns:
        {room_id: why} for the rooms that are not abandoned.
    """
    known, with_members, members = remembering_members_txn(txn, room_ids)
    reasons: dict[str, str] = {}
    for room_id in room_ids:
        if room_id not in known:
            reasons[room_id] = "unknown room"
        elif room_id in members and members[room_id][1] in LIVE_MEMBERSHIPS:
            reasons[room_id] = still_has(*members[room_id])
        elif room_id not in with_members:
            reasons[room_id] = "no local members"
    return reasons


def still_has(user_id: str, membership: str) -> str:
    """Why a room is not forgotten by all, given a local member who still has it."""
    if membership in LIVE_MEMBERSHIPS:
        return f"{user_id} has membership {membership}"
    return f"{user_id} has not forgotten the room"


@attr.s(frozen=True, auto_attribs=True)
class DueDecisions:
    """What one decision transaction of the sweep decided.

    Attributes:
        decided: Rooms now ``purging`` (or ``dry_run``), oldest due first.
        cancelled: (room_id, why) of rooms someone came back to, now ``active``.
        more: Whether more due rooms may be waiting (the batch was full).
        timings_ms: Where the transaction's time went, for logs and benchmarks.
    """

    decided: list[str]
    cancelled: list[tuple[str, str]]
    more: bool
    timings_ms: dict[str, float]


@attr.s(frozen=True, auto_attribs=True)
class ScheduleResult:
    """What scheduling abandoned rooms did (or, under dry run, would do).

    Attributes:
        scheduled: ``{room_id, purge_due_at, held}`` of each room scheduled
            (a held room is scheduled but, like a forgotten one, not purged
            while held).
        skipped: ``{room_id, why}`` of each room left as it was.
    """

    scheduled: list[dict[str, Any]]
    skipped: list[dict[str, Any]]


class RetentionState:
    """Per-room retention state and holds, each change audited.

    Args:
        api: The module API (for run_db_interaction).
        audit: The audit log every change of state is recorded in.
    """

    def __init__(self, api: ModuleApi, audit: AuditLog) -> None:
        self._api = api
        self._audit = audit

    def _upsert_room_txn(self, txn: LoggingTransaction, room_id: str, **values: Any) -> None:
        columns = ["room_id", *values]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in values)
        txn.execute(
            f"INSERT INTO leave_forget_rooms ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT (room_id) DO UPDATE SET {updates}",
            [room_id, *values.values()],
        )

    def mark_forgotten_txn(
        self,
        txn: LoggingTransaction,
        room_id: str,
        now: int,
        retention_period_ms: int | None,
        scheduled_by: str | None = None,
    ) -> None:
        """(Re)start the room's period as forgotten by every local user at ``now``.

        Args:
            scheduled_by: The admin who scheduled an abandoned room (left by
                every local user, not necessarily forgotten); None for a room
                forgotten by all.
        """
        self._upsert_room_txn(
            txn,
            room_id,
            state=STATE_FORGOTTEN,
            forgotten_at=now,
            purge_due_at=now + retention_period_ms if retention_period_ms is not None else None,
            purge_started_at=None,
            purged_at=None,
            cancelled_at=None,
            note=None,
            updated_at=now,
            # A room purged before and back again is counted afresh at its next purge.
            purge_events=None,
            purge_state_groups=None,
            purge_min_stream=None,
            scheduled_by=scheduled_by,
        )

    def rearm_forgotten_txn(
        self,
        txn: LoggingTransaction,
        room_id: str,
        now: int,
        retention_period_ms: int | None,
    ) -> RoomRetention | None:
        """Mark a room every local user has now forgotten, at a forget at ``now``.

        Returns:
            The room's row, or None if a purge of it is under way (left to finish).
        """
        txn.execute("SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,))
        row = txn.fetchone()
        # A room already "forgotten" is re-armed: someone rejoined (or was
        # invited, or knocked) and is now the last to forget it, and the room
        # must stay a full period after that forget, not the earlier one. So
        # is a "purged" one: forgotten_check found it in Synapse again, i.e.
        # it was rejoined (over federation) after the purge and is a room
        # to purge again. Only a purge under way is left to finish.
        if row is not None and row[0] == STATE_PURGING:
            return None
        self.mark_forgotten_txn(txn, room_id, now, retention_period_ms)
        return self.get_room_txn(txn, room_id)

    @staticmethod
    def get_room_txn(
        txn: LoggingTransaction, room_id: str, paramstyle: str = "?"
    ) -> RoomRetention | None:
        """The room's row; shared with the CLI (``paramstyle``: see list_rooms_txn)."""
        txn.execute(
            f"SELECT {_ROOM_COLUMNS} FROM leave_forget_rooms WHERE room_id = ?".replace(
                "?", paramstyle
            ),
            (room_id,),
        )
        row = txn.fetchone()
        return RoomRetention(*row) if row else None

    async def get_room(self, room_id: str) -> RoomRetention | None:
        return await self._api.run_db_interaction(
            "leave_forget_get_room", self.get_room_txn, room_id
        )

    async def get_in_state(self, state: str, limit: int) -> list[str]:
        def txn_fn(txn: LoggingTransaction) -> list[str]:
            txn.execute(
                "SELECT room_id FROM leave_forget_rooms WHERE state = ? "
                "ORDER BY updated_at LIMIT ?",
                (state, limit),
            )
            return [str(r[0]) for r in txn.fetchall()]

        return await self._api.run_db_interaction("leave_forget_get_in_state", txn_fn)

    async def decide_due(
        self,
        now: int,
        limit: int,
        forgotten_check: ForgottenCheckMany,
        config_holds: AbstractSet[str],
        dry_run: bool,
        abandoned_check: ForgottenCheckMany | None = None,
    ) -> DueDecisions:
        """Decide up to ``limit`` due rooms in one transaction, oldest due first.

        Inside the transaction that records the decisions: held rooms (a hold
        through the admin API, or ``config_holds``) are left out and stay
        due; every other due room is re-checked, set-based, for "still
        forgotten by every local user, none joined, invited or knocking". Rooms
        someone came back to are cancelled (``active``, an audit entry naming
        why); the rest go to ``purging`` (or ``dry_run``), each with its audit
        entry in the chain.

        Rooms an admin scheduled as abandoned (``scheduled_by``) are re-checked
        with ``abandoned_check`` instead: only a local user joined, invited or
        knocking cancels them (a member who left and did not forget does not).
        """

        def txn_fn(txn: LoggingTransaction) -> DueDecisions:
            clock = time.perf_counter()
            timings: dict[str, float] = {}

            def lap(name: str) -> None:
                nonlocal clock
                now_clock = time.perf_counter()
                timings[name] = round((now_clock - clock) * 1000, 2)
                clock = now_clock

            holds = sorted(config_holds)
            txn.execute(
                "SELECT room_id, scheduled_by FROM leave_forget_rooms AS r "
                "WHERE state = ? AND purge_due_at IS NOT NULL AND purge_due_at <= ? "
                "AND NOT EXISTS "
                "(SELECT 1 FROM leave_forget_holds AS h WHERE h.room_id = r.room_id) "
                + (f"AND room_id NOT IN ({', '.join('?' for _ in holds)}) " if holds else "")
                + "ORDER BY purge_due_at LIMIT ?",
                (STATE_FORGOTTEN, now, *holds, limit),
            )
            rows = txn.fetchall()
            rooms = [str(r[0]) for r in rows]
            abandoned = [str(r[0]) for r in rows if r[1] is not None]
            forgotten = [str(r[0]) for r in rows if r[1] is None] if abandoned else rooms
            lap("select_ms")
            why_not = forgotten_check(txn, forgotten) if forgotten else {}
            if abandoned:
                why_not.update((abandoned_check or forgotten_check)(txn, abandoned))
            lap("recheck_ms")
            cancelled = [(r, why_not[r]) for r in rooms if r in why_not]
            decided = [r for r in rooms if r not in why_not]
            outcome = "dry_run" if dry_run else "started"
            entries = self._audit.append_many_txn(
                txn,
                [
                    AuditFields(action="purge", outcome="cancelled", room_id=r, reason=why)
                    for r, why in cancelled
                ]
                + [AuditFields(action="purge", outcome=outcome, room_id=r) for r in decided],
            )
            lap("audit_ms")
            ts = {e["room_id"]: int(e["ts"]) for e in entries}
            if cancelled:
                txn.execute_batch(
                    "UPDATE leave_forget_rooms SET state = ?, cancelled_at = ?, note = ?, "
                    "purge_due_at = NULL, updated_at = ? WHERE room_id = ?",
                    [(STATE_ACTIVE, ts[r], why, ts[r], r) for r, why in cancelled],
                )
            if decided and is_postgres(txn):
                # One statement per 1000 rooms, not one per room.
                txn.execute_values(
                    "UPDATE leave_forget_rooms AS r SET state = v.state, "
                    "purge_started_at = v.ts, updated_at = v.ts "
                    "FROM (VALUES ?) AS v (room_id, state, ts) WHERE r.room_id = v.room_id",
                    [(r, STATE_DRY_RUN if dry_run else STATE_PURGING, ts[r]) for r in decided],
                    template="(%s, %s, %s::BIGINT)",
                    fetch=False,
                )
            elif decided:
                txn.execute_batch(
                    "UPDATE leave_forget_rooms SET state = ?, purge_started_at = ?, "
                    "updated_at = ? WHERE room_id = ?",
                    [
                        (STATE_DRY_RUN if dry_run else STATE_PURGING, ts[r], ts[r], r)
                        for r in decided
                    ],
                )
            lap("update_ms")
            return DueDecisions(decided, cancelled, len(rooms) >= limit, timings)

        return await self._audit.run_locked("leave_forget_decide_due", txn_fn)

    async def schedule_abandoned(
        self,
        room_ids: Sequence[str],
        admin_id: str,
        retention_period_ms: int,
        abandoned_check: ForgottenCheckMany,
        config_holds: AbstractSet[str],
        dry_run: bool,
    ) -> "ScheduleResult":
        """Put abandoned rooms on the purge schedule, as rooms forgotten by all now.

        In one transaction: each room must be abandoned (``abandoned_check``:
        no local user joined, invited or knocking) and not already tracked
        (a room forgotten, due, purging or purged keeps its state; one that
        was ``active`` may be scheduled). Scheduled rooms are due after the
        retention period, each with an audit entry (``purge``/``scheduled``,
        ``actor``: the admin); the sweep treats them as forgotten rooms:
        holds skip them, a join, invite or knock cancels them. Under
        ``dry_run`` nothing is written: the result says what would happen.
        """

        def txn_fn(txn: LoggingTransaction) -> ScheduleResult:
            states: dict[str, str] = {}
            for start in range(0, len(room_ids), 500):
                chunk = list(room_ids[start : start + 500])
                txn.execute(
                    "SELECT room_id, state FROM leave_forget_rooms "
                    f"WHERE room_id IN ({', '.join('?' for _ in chunk)})",
                    chunk,
                )
                states.update((str(r[0]), str(r[1])) for r in txn.fetchall())
            skipped = {
                r: f"already {states[r]}"
                for r in room_ids
                if states.get(r, STATE_ACTIVE) != STATE_ACTIVE
            }
            candidates = [r for r in room_ids if r not in skipped]
            skipped.update(abandoned_check(txn, candidates) if candidates else {})
            chosen = [r for r in candidates if r not in skipped]
            held = {r for r in chosen if r in config_holds or self.is_held_txn(txn, r)}
            now = int(time.time() * 1000)
            if not dry_run and chosen:
                entries = self._audit.append_many_txn(
                    txn,
                    [
                        AuditFields(action="purge", outcome="scheduled", room_id=r, actor=admin_id)
                        for r in chosen
                    ],
                )
                now = int(entries[-1]["ts"])
                for room_id in chosen:
                    self.mark_forgotten_txn(
                        txn, room_id, now, retention_period_ms, scheduled_by=admin_id
                    )
            return ScheduleResult(
                scheduled=[
                    {"room_id": r, "purge_due_at": now + retention_period_ms, "held": r in held}
                    for r in chosen
                ],
                skipped=[{"room_id": r, "why": why} for r, why in sorted(skipped.items())],
            )

        return await self._audit.run_locked("leave_forget_schedule_abandoned", txn_fn)

    async def backlog_counts(self, now: int, config_holds: AbstractSet[str]) -> dict[str, int]:
        """What retention has to do (see retention_counts_txn), in one transaction."""
        return await self._api.run_db_interaction(
            "leave_forget_backlog_counts", retention_counts_txn, now, config_holds
        )

    async def held_due_rooms(self, now: int, config_holds: AbstractSet[str]) -> set[str]:
        """The rooms due now that a hold keeps (see held_due_rooms_txn)."""
        return await self._api.run_db_interaction(
            "leave_forget_held_due_rooms", held_due_rooms_txn, now, config_holds
        )

    async def record_footprint(
        self, room_id: str, footprint_txn: Callable[[LoggingTransaction, str], Any]
    ) -> None:
        """Record what Synapse holds of a room about to be purged, once.

        Args:
            footprint_txn: Reads it (``_synapse.leftovers.room_footprint_txn``).
                A room already counted keeps its counts: a purge requested
                again (after a restart, a failure) finds it partly purged.
        """

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "SELECT 1 FROM leave_forget_rooms WHERE room_id = ? AND purge_events IS NULL",
                (room_id,),
            )
            if txn.fetchone() is None:
                return
            footprint = footprint_txn(txn, room_id)
            txn.execute(
                "UPDATE leave_forget_rooms SET purge_events = ?, purge_state_groups = ?, "
                "purge_min_stream = ? WHERE room_id = ?",
                (footprint.events, footprint.state_groups, footprint.min_stream, room_id),
            )

        await self._api.run_db_interaction("leave_forget_record_footprint", txn_fn)

    async def mark_purged(
        self,
        room_id: str,
        leftovers_txn: Callable[[LoggingTransaction, str, int | None], dict[str, int]]
        | None = None,
        cleared: dict[str, int] | None = None,
        media_policy: str = MEDIA_POLICY_KEEP,
    ) -> None:
        """Record a room purged, clearing first what Synapse's purge left of it.

        The ``purged`` entry carries the erasure receipt (retention.receipt):
        the footprint recorded before the purge and the leftovers cleared.

        Args:
            leftovers_txn: Clears the room's leftovers in Synapse's tables
                (``_synapse.leftovers.purge_leftovers_txn``), given where its
                rows start in the events stream; in this transaction.
            cleared: Leftovers cleared before this transaction, by table, for
                the receipt.
            media_policy: The receipt's media policy (``delete``: the room's
                media is decided after its grace, in a ``media_deleted`` entry).
        """

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute(
                "SELECT purge_events, purge_state_groups, purge_min_stream "
                "FROM leave_forget_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = txn.fetchone() or (None, None, None)
            events, groups, min_stream = (None if v is None else int(v) for v in row)
            leftovers = dict(cleared or {})
            if leftovers_txn is not None:
                leftovers.update(leftovers_txn(txn, room_id, min_stream))
            receipt = encode_receipt(
                build_receipt(events, groups, leftovers, media_policy=media_policy)
            )
            entry = self._audit.append_txn(
                txn,
                AuditFields(action="purge", outcome="purged", room_id=room_id, receipt=receipt),
            )
            txn.execute(
                "UPDATE leave_forget_rooms SET state = ?, purged_at = ?, updated_at = ? "
                "WHERE room_id = ? AND state = ?",
                (STATE_PURGED, entry["ts"], entry["ts"], room_id, STATE_PURGING),
            )

        await self._audit.run_locked("leave_forget_mark_purged", txn_fn)

    # -- holds -----------------------------------------------------------

    @staticmethod
    def is_held_txn(txn: LoggingTransaction, room_id: str) -> bool:
        txn.execute("SELECT 1 FROM leave_forget_holds WHERE room_id = ?", (room_id,))
        return txn.fetchone() is not None

    async def put_hold(self, room_id: str, held_by: str, reason: str | None) -> bool:
        """Hold a room; False if it was already held."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            if self.is_held_txn(txn, room_id):
                return False
            entry = self._audit.append_txn(
                txn,
                AuditFields(
                    action="hold", outcome="ok", user_id=held_by, room_id=room_id, reason=reason
                ),
            )
            txn.execute(
                "INSERT INTO leave_forget_holds "
                "(room_id, held_by, reason, created_at, reason_escaped) VALUES (?, ?, ?, ?, ?)",
                _hold_values(room_id, held_by, reason, entry["ts"]),
            )
            return True

        return await self._audit.run_locked("leave_forget_put_hold", txn_fn)

    async def lift_hold(self, room_id: str, lifted_by: str) -> bool:
        """Lift a hold; False if there was none."""

        def txn_fn(txn: LoggingTransaction) -> bool:
            if not self.is_held_txn(txn, room_id):
                return False
            self._audit.append_txn(
                txn, AuditFields(action="unhold", outcome="ok", user_id=lifted_by, room_id=room_id)
            )
            txn.execute("DELETE FROM leave_forget_holds WHERE room_id = ?", (room_id,))
            return True

        return await self._audit.run_locked("leave_forget_lift_hold", txn_fn)

    async def get_holds_page(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Holds placed through the admin API, keyset-paged by room id."""
        return await self._api.run_db_interaction(
            "leave_forget_get_holds_page", select_holds_page_txn, after, limit
        )

    async def get_hold(self, room_id: str) -> dict[str, Any] | None:
        """The hold placed on room_id through the admin API, if any."""

        return await self._api.run_db_interaction("leave_forget_get_hold", select_hold_txn, room_id)

    async def list_rooms(
        self, states: Iterable[str], after: str | None, limit: int
    ) -> list[RoomRetention]:
        """Rooms in any of ``states``, by room id, paged by keyset."""
        return await self._api.run_db_interaction(
            "leave_forget_list_rooms", list_rooms_txn, list(states), after, limit
        )


def list_rooms_txn(
    txn: Any,
    states: Sequence[str],
    after: str | None,
    limit: int,
    paramstyle: str = "?",
) -> list[RoomRetention]:
    """Rooms in any of ``states``, by room id after ``after``; shared with the offline CLI.

    Args:
        txn: A DB-API cursor (see select_audit_txn for ``paramstyle``).
    """
    # One keyset range of the (state, room_id) index per state, merged: the
    # cost grows with the page, not with the number of rooms in the states.
    part = (
        f"SELECT {_ROOM_COLUMNS} FROM leave_forget_rooms "
        "WHERE state = ? AND room_id > ? ORDER BY room_id LIMIT ?"
    )
    args: list[Any] = []
    for state in states:
        args.extend((state, after or "", limit))
    if len(states) == 1:
        sql = part
    else:
        sql = (
            " UNION ALL ".join(f"SELECT * FROM ({part}) AS s{i}" for i in range(len(states)))
            + " ORDER BY room_id LIMIT ?"
        )
        args.append(limit)
    txn.execute(sql.replace("?", paramstyle), args)
    return [RoomRetention(*r) for r in txn.fetchall()]


def retention_counts_txn(
    txn: Any, now: int, config_holds: AbstractSet[str], paramstyle: str = "?"
) -> dict[str, int]:
    """What retention has to do: a few index ranges; shared with the offline CLI.

    Returns:
        ``due``: rooms due now and not held (the backlog); ``held``: due rooms a
        hold keeps; ``waiting``: forgotten rooms not yet due; ``in_flight``: rooms
        whose purge Synapse was asked for.
    """

    def count(sql: str, args: Sequence[Any]) -> int:
        txn.execute(sql.replace("?", paramstyle), args)
        row = txn.fetchone()
        return int(row[0]) if row else 0

    due_all = count(
        "SELECT COUNT(*) FROM leave_forget_rooms "
        "WHERE state = ? AND purge_due_at IS NOT NULL AND purge_due_at <= ?",
        (STATE_FORGOTTEN, now),
    )
    held = count(
        "SELECT COUNT(*) FROM leave_forget_holds AS h "
        "JOIN leave_forget_rooms AS r ON r.room_id = h.room_id "
        "WHERE r.state = ? AND r.purge_due_at IS NOT NULL AND r.purge_due_at <= ?",
        (STATE_FORGOTTEN, now),
    )
    extra = sorted(config_holds)
    if extra:
        held += count(
            "SELECT COUNT(*) FROM leave_forget_rooms AS r "
            f"WHERE r.room_id IN ({', '.join('?' for _ in extra)}) "
            "AND r.state = ? AND r.purge_due_at IS NOT NULL AND r.purge_due_at <= ? "
            "AND NOT EXISTS (SELECT 1 FROM leave_forget_holds AS h "
            "WHERE h.room_id = r.room_id)",
            (*extra, STATE_FORGOTTEN, now),
        )
    return {
        "due": max(0, due_all - held),
        "held": held,
        "waiting": count(
            "SELECT COUNT(*) FROM leave_forget_rooms WHERE state = ? AND purge_due_at > ?",
            (STATE_FORGOTTEN, now),
        ),
        "in_flight": count(
            "SELECT COUNT(*) FROM leave_forget_rooms WHERE state = ?", (STATE_PURGING,)
        ),
    }


def held_due_rooms_txn(txn: Any, now: int, config_holds: AbstractSet[str]) -> set[str]:
    """The rooms due now that a hold (admin API or ``retention.holds``) keeps from purge."""
    txn.execute(
        "SELECT r.room_id FROM leave_forget_holds AS h "
        "JOIN leave_forget_rooms AS r ON r.room_id = h.room_id "
        "WHERE r.state = ? AND r.purge_due_at IS NOT NULL AND r.purge_due_at <= ?",
        (STATE_FORGOTTEN, now),
    )
    held = {str(row[0]) for row in txn.fetchall()}
    extra = sorted(config_holds - held)
    if extra:
        txn.execute(
            "SELECT room_id FROM leave_forget_rooms "
            f"WHERE room_id IN ({', '.join('?' for _ in extra)}) "
            "AND state = ? AND purge_due_at IS NOT NULL AND purge_due_at <= ?",
            (*extra, STATE_FORGOTTEN, now),
        )
        held.update(str(row[0]) for row in txn.fetchall())
    return held


def select_holds_page_txn(
    txn: Any, after: str | None, limit: int, paramstyle: str = "?"
) -> list[dict[str, Any]]:
    """Holds placed through the admin API, by room id after ``after``, at most ``limit``."""
    sql = (
        f"SELECT {_HOLD_COLUMNS} FROM leave_forget_holds WHERE room_id > ? ORDER BY room_id LIMIT ?"
    )
    txn.execute(sql.replace("?", paramstyle), (after or "", limit))
    return [_hold_dict(r) for r in txn.fetchall()]


def select_hold_txn(txn: Any, room_id: str, paramstyle: str = "?") -> dict[str, Any] | None:
    """The hold placed on room_id through the admin API, if any; shared with the CLI."""
    txn.execute(
        f"SELECT {_HOLD_COLUMNS} FROM leave_forget_holds WHERE room_id = ?".replace(
            "?", paramstyle
        ),
        (room_id,),
    )
    r = txn.fetchone()
    return _hold_dict(r) if r else None


def select_holds_txn(txn: Any) -> list[dict[str, Any]]:
    """Every hold placed through the admin API, by room id; shared with the offline CLI."""
    txn.execute(f"SELECT {_HOLD_COLUMNS} FROM leave_forget_holds ORDER BY room_id")
    return [_hold_dict(r) for r in txn.fetchall()]


_HOLD_COLUMNS = "room_id, held_by, reason, created_at, reason_escaped"


def _hold_values(
    room_id: str, held_by: str, reason: str | None, created_at: int
) -> tuple[Any, ...]:
    """A hold row: a reason neither engine can store as-is is stored escaped, and marked."""
    if reason is not None and needs_escape(reason):
        return room_id, held_by, escape_text(reason), created_at, 1
    return room_id, held_by, reason, created_at, None


def _hold_dict(r: Sequence[Any]) -> dict[str, Any]:
    """A hold row (_HOLD_COLUMNS) as the admin API and the CLI show it: the reason as given."""
    reason = unescape_text(r[2]) if r[4] and r[2] is not None else r[2]
    return {"room_id": r[0], "held_by": r[1], "reason": reason, "created_at": r[3]}
