"""The room-retention store: the module's own tables in Synapse's database.

SQL lives here and only here (Synapse's own tables are read through
``_synapse.SynapseInternals``). Every method runs one transaction under one
description string, as Synapse's stores do.
"""

import json
import logging
import time
from typing import (
    AbstractSet,
    Any,
    Callable,
    Dict,
    Generic,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import attr
from signedjson.types import SigningKey
from synapse.module_api import LoggingTransaction, ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from matrix_leave_forget._synapse import run_in_background_process, wake
from matrix_leave_forget.audit import (
    ENTRY_FIELDS,
    GENESIS_HASH,
    OPTIONAL_FIELDS,
    escape_fields,
    escape_text,
    needs_escape,
    now_ms,
    seal_entries,
    unescape_text,
)
from matrix_leave_forget.schema import is_postgres, run_migrations

logger = logging.getLogger(__name__)

# Retention states of a room (leave_forget_rooms.state).
STATE_ACTIVE = "active"  # was forgotten by all, then someone came back
STATE_FORGOTTEN = "forgotten"  # forgotten by every local user; purge pending if due
STATE_DRY_RUN = "dry_run"  # due, but dry_run was on: recorded, not purged
STATE_PURGING = "purging"  # Synapse was asked to purge it
STATE_PURGED = "purged"  # Synapse no longer has the room

# The columns every entry has; STORED_COLUMNS adds the optional fields, which
# an entry read back carries only when they are set (see audit.OPTIONAL_FIELDS).
AUDIT_COLUMNS: Sequence[str] = (*ENTRY_FIELDS, "hash", "signatures")
STORED_COLUMNS: Sequence[str] = (*AUDIT_COLUMNS, *OPTIONAL_FIELDS)
_INT_OPTIONAL_FIELDS = frozenset({"format", "reason_bytes", "suppressed", "event_ts"})

# Positions in Synapse's events stream (leave_forget_stream_positions.name):
# where the module was installed (nothing before it is recorded as a
# departure), and how far the catch-up has read (reconcile.py).
STREAM_INSTALLED = "installed"
STREAM_DEPARTURES = "departures"

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
    # A refused request's reason cut to a prefix: the whole reason's size and hash.
    reason_bytes: Optional[int] = None
    reason_sha256: Optional[str] = None
    # This user's refusals counted but not appended since their previous entry.
    suppressed: Optional[int] = None
    # How it happened (docs/audit.md "Routes"), who acted when not the user,
    # and the membership event's own time.
    via: Optional[str] = None
    actor: Optional[str] = None
    event_ts: Optional[int] = None


@attr.s(frozen=True, auto_attribs=True)
class ForgetResult:
    """What one forget transaction did.

    Attributes:
        membership: The user's membership at the forget (None: never had one).
        refused: Whether the membership forbids forgetting (nothing was written).
        entry: The audit entry (None if refused, or a noop not recorded).
        room: The room's retention row if it was (re)marked forgotten by all.
    """

    membership: Optional[str]
    refused: bool = False
    entry: Optional[Dict[str, Any]] = None
    room: Optional["RoomRetention"] = None


@attr.s(frozen=True, auto_attribs=True)
class Departure:
    """A membership event that took a local user out of a room, as the log records it."""

    event_id: str
    room_id: str
    user_id: str
    sender: str
    membership: str
    origin_server_ts: int
    reason: Optional[str]
    stream_ordering: int = 0


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
# The same for many rooms at once: (txn, room_ids) -> {room_id: why not} for
# the rooms that are *not* forgotten by every local user.
ForgottenCheckMany = Callable[[LoggingTransaction, Sequence[str]], Dict[str, str]]
# Reads, inside a transaction, the requester's membership in the room (None if
# they never had one).
MembershipRead = Callable[[LoggingTransaction], Optional[str]]


@attr.s(frozen=True, auto_attribs=True)
class DueDecisions:
    """What one decision transaction of the sweep decided.

    Attributes:
        decided: Rooms now ``purging`` (or ``dry_run``), oldest due first.
        cancelled: (room_id, why) of rooms someone came back to, now ``active``.
        more: Whether more due rooms may be waiting (the batch was full).
        timings_ms: Where the transaction's time went, for logs and benchmarks.
    """

    decided: List[str]
    cancelled: List[Tuple[str, str]]
    more: bool
    timings_ms: Dict[str, float]


T = TypeVar("T")

# Most audit writes one group-commit transaction carries.
GROUP_COMMIT_MAX = 100


class _Job(Generic[T]):
    """One caller's work in a group commit, and how it ended."""

    def __init__(self, fn: Callable[[LoggingTransaction], T]) -> None:
        self.fn = fn
        self.turn: defer.Deferred[None] = defer.Deferred()
        self.done = False
        self.result: Optional[T] = None
        self.error: Optional[BaseException] = None

    def finish(self, result: Optional[T] = None, error: Optional[BaseException] = None) -> None:
        self.done, self.result, self.error = True, result, error

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit:
    """Runs concurrent audit writes together, in one transaction (group commit).

    Every leave and forget appends to the chain, whose head is one row: at most
    one append can run at a time, and each pays a commit (an fsync). Jobs are
    queued; one background drainer at a time runs everything queued in one
    transaction, with one commit, wakes each caller with its result, and
    repeats while jobs arrived meanwhile. A lone caller's job runs at once, as
    before. If the shared transaction fails, each job is retried in a
    transaction of its own, so that one bad job fails alone. A caller that is
    cancelled while waiting does not stop its job (the action it records has
    happened) nor the drainer.

    Args:
        api: The module API (run_db_interaction, background processes).
        desc: The transaction's description (Synapse's metrics and logs).
        prepare: Run first in every transaction (the chain lock).
    """

    def __init__(
        self, api: ModuleApi, desc: str, prepare: Callable[[LoggingTransaction], None]
    ) -> None:
        self._api = api
        self._desc = desc
        self._prepare = prepare
        self._waiting: List[_Job[Any]] = []
        self._draining = False

    async def run(self, fn: Callable[[LoggingTransaction], T]) -> T:
        job: _Job[T] = _Job(fn)
        self._waiting.append(job)
        if not self._draining:
            self._draining = True
            run_in_background_process(self._api, "leave_forget_group_commit", self._drain)
        # Waiting on a copy: cancelling this caller must not cancel job.turn.
        waiter: defer.Deferred[None] = defer.Deferred()
        job.turn.chainDeferred(waiter)
        await make_deferred_yieldable(waiter)
        return job.outcome()

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:GROUP_COMMIT_MAX]
                del self._waiting[: len(batch)]
                try:
                    await self._run_batch(batch)
                except Exception as error:  # never leave a caller waiting
                    logger.exception("Audit group commit failed")
                    for job in batch:
                        if not job.done:
                            job.finish(error=error)
                finally:
                    wake([job.turn for job in batch])
        finally:
            self._draining = False

    async def _run_batch(self, batch: List[_Job[Any]]) -> None:
        def txn_fn(txn: LoggingTransaction) -> List[Any]:
            self._prepare(txn)
            return [j.fn(txn) for j in batch]

        try:
            results = await self._api.run_db_interaction(self._desc, txn_fn)
        except Exception as error:
            if len(batch) == 1:
                batch[0].finish(error=error)
                return
            for j in batch:
                try:
                    j.finish(await self._run_one(j))
                except Exception as one_error:
                    j.finish(error=one_error)
            return
        for j, result in zip(batch, results, strict=True):
            j.finish(result)

    async def _run_one(self, job: _Job[T]) -> T:
        def txn_fn(txn: LoggingTransaction) -> T:
            self._prepare(txn)
            return job.fn(txn)

        return await self._api.run_db_interaction(self._desc, txn_fn)


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
        # Leaves, forgets and refusals: the writes every request makes.
        self._records = GroupCommit(api, "leave_forget_record", self._lock_chain_txn)

    async def setup(
        self, stream_position: Optional[Callable[[LoggingTransaction], int]] = None
    ) -> int:
        """Create or upgrade the schema; returns the version now in place.

        Args:
            stream_position: Reads the newest position of Synapse's events
                stream; at the first start-up with this schema it is recorded
                as the installation point (and the catch-up starts there).
        """

        def txn_fn(txn: LoggingTransaction) -> int:
            version = run_migrations(txn)
            if stream_position is not None:
                txn.execute(
                    "SELECT 1 FROM leave_forget_stream_positions WHERE name = ?",
                    (STREAM_INSTALLED,),
                )
                if txn.fetchone() is None:
                    position = stream_position(txn)
                    for name in (STREAM_INSTALLED, STREAM_DEPARTURES):
                        txn.execute(
                            "INSERT INTO leave_forget_stream_positions (name, stream_id) "
                            "VALUES (?, ?)",
                            (name, position),
                        )
            return version

        return await self._api.run_db_interaction("leave_forget_migrate", txn_fn)

    # -- audit -----------------------------------------------------------

    def _append_txn(self, txn: LoggingTransaction, fields: AuditFields) -> Dict[str, Any]:
        """Append one entry to the chain.

        Callers must have called _lock_chain_txn first in the same transaction.
        """
        return self._append_many_txn(txn, [fields])[0]

    def _append_many_txn(
        self, txn: LoggingTransaction, many: Sequence[AuditFields]
    ) -> List[Dict[str, Any]]:
        """Append entries to the chain in order: one head read, one signature, one insert.

        The entries are sealed as a group (audit.seal_entries): each is hashed
        into the chain and only the last is signed, its signature covering the
        whole group; the group commits or fails as one. Client texts that
        neither engine can store (NUL, lone surrogates) are stored escaped.

        Callers must have called _lock_chain_txn first in the same transaction.
        """
        if not many:
            return []
        txn.execute("SELECT seq, hash FROM leave_forget_audit ORDER BY seq DESC LIMIT 1")
        row = txn.fetchone()
        seq, prev_hash = (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)
        common = {"origin": self._origin, "instance": self._instance}
        entries = seal_entries(
            [escape_fields({**attr.asdict(fields), **common, "ts": now_ms()}) for fields in many],
            seq,
            prev_hash,
            self._origin,
            self._signing_key,
        )
        rows = [
            [
                json.dumps(entry["signatures"], sort_keys=True)
                if c == "signatures"
                else entry.get(c)
                for c in STORED_COLUMNS
            ]
            for entry in entries
        ]
        sql = (
            f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in STORED_COLUMNS)})"
        )
        if len(rows) == 1:
            txn.execute(sql, rows[0])
        elif is_postgres(txn):
            # One multi-row INSERT per 1000 rows, not one statement per row.
            txn.execute_values(
                f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)}) VALUES ?",
                rows,
                fetch=False,
            )
        else:
            txn.execute_batch(sql, rows)
        return entries

    @staticmethod
    def _lock_chain_txn(txn: LoggingTransaction) -> None:
        """Serialise appenders across processes so the chain never forks.

        On PostgreSQL this must be the transaction's first statement, so that
        the REPEATABLE READ snapshot is taken after the lock and sees the
        latest head. SQLite allows one writer at a time already.
        """
        if is_postgres(txn):
            txn.execute("LOCK TABLE leave_forget_audit IN SHARE ROW EXCLUSIVE MODE")

    async def head(self) -> Tuple[int, str]:
        """The chain's head: (seq, hash) of the newest entry, (0, "") for an empty log."""

        def txn_fn(txn: LoggingTransaction) -> Tuple[int, str]:
            txn.execute("SELECT seq, hash FROM leave_forget_audit ORDER BY seq DESC LIMIT 1")
            row = txn.fetchone()
            return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

        return await self._api.run_db_interaction("leave_forget_audit_head", txn_fn)

    async def append(self, fields: AuditFields) -> Dict[str, Any]:
        """Append one audit entry (group-committed with concurrent ones)."""

        def txn_fn(txn: LoggingTransaction) -> Dict[str, Any]:
            return self._append_txn(txn, fields)

        return await self._records.run(txn_fn)

    async def record_forget(
        self,
        fields: AuditFields,
        room_id: str,
        forgotten_check: ForgottenCheck,
        retention_period_ms: Optional[int],
        membership: MembershipRead,
        forget_rows: Optional[Callable[[LoggingTransaction], None]] = None,
        refuse: AbstractSet[str] = frozenset(),
        record_noop: bool = True,
    ) -> ForgetResult:
        """Forget, record the forget and, atomically, whether the room is now forgotten by all.

        One transaction: the requester's membership (refused if in
        ``refuse``; ``ok``, or ``noop`` for a room they never had one in),
        Synapse's own forget rows (``forget_rows``), the audit entry and the
        retention state. A crash leaves either all of it or none.

        Args:
            fields: The entry; its outcome is set here from the membership.
            membership: Reads the requester's membership inside the transaction.
            forget_rows: Performs Synapse's forget in the transaction.
            refuse: Memberships that may not forget (nothing is written).
            record_noop: Whether a ``noop`` forget gets an entry at all.
        """

        def txn_fn(txn: LoggingTransaction) -> ForgetResult:
            current = membership(txn)
            if current in refuse:
                return ForgetResult(current, refused=True)
            if forget_rows is not None:
                forget_rows(txn)
            if current is None:
                if not record_noop:
                    return ForgetResult(current)
                entry = self._append_txn(txn, attr.evolve(fields, outcome="noop"))
                return ForgetResult(current, entry=entry)
            entry = self._append_txn(txn, attr.evolve(fields, outcome="ok"))
            if forgotten_check(txn, room_id) is not None:
                return ForgetResult(current, entry=entry)
            txn.execute("SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,))
            row = txn.fetchone()
            # A room already "forgotten" is re-armed: someone rejoined (or was
            # invited, or knocked) and is now the last to forget it, and the room
            # must stay a full period after that forget, not the earlier one. So
            # is a "purged" one: forgotten_check found it in Synapse again, i.e.
            # it was rejoined (over federation) after the purge and is a room
            # to purge again. Only a purge under way is left to finish.
            if row is not None and row[0] == STATE_PURGING:
                return ForgetResult(current, entry=entry)
            self._mark_forgotten_txn(txn, room_id, int(entry["ts"]), retention_period_ms, None)
            return ForgetResult(current, entry=entry, room=self._get_room_txn(txn, room_id))

        return await self._records.run(txn_fn)

    async def record_departure(self, fields: AuditFields) -> bool:
        """Append a departure seen in Synapse's events, once per event.

        Returns:
            False if an entry for the event was already in the log (the
            module's endpoint, or another route, recorded it first).
        """

        def txn_fn(txn: LoggingTransaction) -> bool:
            if self._has_event_txn(txn, fields.event_id):
                return False
            self._append_txn(txn, fields)
            return True

        return await self._records.run(txn_fn)

    @staticmethod
    def _has_event_txn(txn: LoggingTransaction, event_id: Optional[str]) -> bool:
        txn.execute(
            "SELECT 1 FROM leave_forget_audit WHERE event_id = ? AND action = 'leave' LIMIT 1",
            (event_id,),
        )
        return txn.fetchone() is not None

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

    def _mark_forgotten_txn(
        self,
        txn: LoggingTransaction,
        room_id: str,
        now: int,
        retention_period_ms: Optional[int],
        note: Optional[str],
    ) -> None:
        """(Re)start the room's period as forgotten by every local user at ``now``."""
        self._upsert_room_txn(
            txn,
            room_id,
            state=STATE_FORGOTTEN,
            forgotten_at=now,
            purge_due_at=now + retention_period_ms if retention_period_ms is not None else None,
            purge_started_at=None,
            purged_at=None,
            cancelled_at=None,
            note=note,
            updated_at=now,
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

    async def get_in_state(self, state: str, limit: int) -> List[str]:
        def txn_fn(txn: LoggingTransaction) -> List[str]:
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
    ) -> DueDecisions:
        """Decide up to ``limit`` due rooms in one transaction, oldest due first.

        Inside the transaction that records the decisions: held rooms (a hold
        through the admin API, or ``config_holds``) are left out and stay
        due; every other due room is re-checked, set-based, for "still
        forgotten by every local user, none joined, invited or knocking". Rooms
        someone came back to are cancelled (``active``, an audit entry naming
        why); the rest go to ``purging`` (or ``dry_run``), each with its audit
        entry in the chain.
        """

        def txn_fn(txn: LoggingTransaction) -> DueDecisions:
            clock = time.perf_counter()
            timings: Dict[str, float] = {}

            def lap(name: str) -> None:
                nonlocal clock
                now_clock = time.perf_counter()
                timings[name] = round((now_clock - clock) * 1000, 2)
                clock = now_clock

            self._lock_chain_txn(txn)
            holds = sorted(config_holds)
            txn.execute(
                "SELECT room_id FROM leave_forget_rooms AS r "
                "WHERE state = ? AND purge_due_at IS NOT NULL AND purge_due_at <= ? "
                "AND NOT EXISTS "
                "(SELECT 1 FROM leave_forget_holds AS h WHERE h.room_id = r.room_id) "
                + (f"AND room_id NOT IN ({', '.join('?' for _ in holds)}) " if holds else "")
                + "ORDER BY purge_due_at LIMIT ?",
                (STATE_FORGOTTEN, now, *holds, limit),
            )
            rooms = [str(r[0]) for r in txn.fetchall()]
            lap("select_ms")
            why_not = forgotten_check(txn, rooms) if rooms else {}
            lap("recheck_ms")
            cancelled = [(r, why_not[r]) for r in rooms if r in why_not]
            decided = [r for r in rooms if r not in why_not]
            outcome = "dry_run" if dry_run else "started"
            entries = self._append_many_txn(
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

        return await self._api.run_db_interaction("leave_forget_decide_due", txn_fn)

    async def count_due_held(self, now: int, config_holds: AbstractSet[str]) -> int:
        """How many due rooms a hold keeps (they are left out of decide_due)."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute(
                "SELECT COUNT(*) FROM leave_forget_holds AS h "
                "JOIN leave_forget_rooms AS r ON r.room_id = h.room_id "
                "WHERE r.state = ? AND r.purge_due_at IS NOT NULL AND r.purge_due_at <= ?",
                (STATE_FORGOTTEN, now),
            )
            row = txn.fetchone()
            count = int(row[0]) if row else 0
            extra = sorted(config_holds)
            if extra:
                txn.execute(
                    "SELECT COUNT(*) FROM leave_forget_rooms AS r "
                    f"WHERE r.room_id IN ({', '.join('?' for _ in extra)}) "
                    "AND r.state = ? AND r.purge_due_at IS NOT NULL AND r.purge_due_at <= ? "
                    "AND NOT EXISTS (SELECT 1 FROM leave_forget_holds AS h "
                    "WHERE h.room_id = r.room_id)",
                    (*extra, STATE_FORGOTTEN, now),
                )
                row = txn.fetchone()
                count += int(row[0]) if row else 0
            return count

        return await self._api.run_db_interaction("leave_forget_count_due_held", txn_fn)

    async def backlog_counts(self, now: int, config_holds: AbstractSet[str]) -> Dict[str, int]:
        """What retention has to do (see retention_counts_txn), in one transaction."""
        return await self._api.run_db_interaction(
            "leave_forget_backlog_counts", retention_counts_txn, now, config_holds
        )

    async def probe(self) -> None:
        """The smallest transaction: what waiting for the database costs right now."""

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute("SELECT 1")
            txn.fetchone()

        await self._api.run_db_interaction("leave_forget_probe", txn_fn)

    async def count_purged_since(self, since_ts: int) -> int:
        """Rooms recorded purged since ``since_ts`` (the audit log's ts index)."""
        return await self._api.run_db_interaction(
            "leave_forget_count_purged_since", count_purged_since_txn, since_ts
        )

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
                "INSERT INTO leave_forget_holds "
                "(room_id, held_by, reason, created_at, reason_escaped) VALUES (?, ?, ?, ?, ?)",
                _hold_values(room_id, held_by, reason, entry["ts"]),
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

    async def get_holds_page(self, after: Optional[str], limit: int) -> List[Dict[str, Any]]:
        """Holds placed through the admin API, keyset-paged by room id."""
        return await self._api.run_db_interaction(
            "leave_forget_get_holds_page", select_holds_page_txn, after, limit
        )

    async def get_hold(self, room_id: str) -> Optional[Dict[str, Any]]:
        """The hold placed on room_id through the admin API, if any."""

        def txn_fn(txn: LoggingTransaction) -> Optional[Dict[str, Any]]:
            txn.execute(
                f"SELECT {_HOLD_COLUMNS} FROM leave_forget_holds WHERE room_id = ?", (room_id,)
            )
            r = txn.fetchone()
            return _hold_dict(r) if r else None

        return await self._api.run_db_interaction("leave_forget_get_hold", txn_fn)

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
        """Each user's latest leave and forget in room_id, from the audit log.

        Successful entries of every route count, those found by the catch-up
        after a crash (``recovered``) included; a leave's time is its event's
        own when the entry has it.
        """

        def txn_fn(txn: LoggingTransaction) -> Dict[str, Dict[str, Any]]:
            txn.execute(
                "SELECT user_id, action, ts, reason, event_id, via, actor, event_ts, outcome "
                "FROM leave_forget_audit WHERE room_id = ? AND action IN ('leave', 'forget') "
                "AND outcome IN ('ok', 'noop', ?) AND user_id IS NOT NULL ORDER BY seq",
                (room_id, OUTCOME_RECOVERED),
            )
            history: Dict[str, Dict[str, Any]] = {}
            for (
                user_id,
                action,
                ts,
                reason,
                event_id,
                via,
                actor,
                event_ts,
                outcome,
            ) in txn.fetchall():
                member = history.setdefault(str(user_id), {})
                member[f"{action}_ts"] = int(event_ts if event_ts is not None else ts)
                member[f"{action}_reason"] = reason
                member[f"{action}_via"] = via
                member[f"{action}_actor"] = actor
                member[f"{action}_outcome"] = outcome
                if action == "leave":
                    member["leave_event_id"] = event_id
            return history

        return await self._api.run_db_interaction("leave_forget_member_history", txn_fn)

    # -- catch-up from Synapse's events stream ---------------------------

    async def stream_position(self, name: str) -> int:
        """A stored position in Synapse's events stream (0 if never set)."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute(
                "SELECT stream_id FROM leave_forget_stream_positions WHERE name = ?", (name,)
            )
            row = txn.fetchone()
            return int(row[0]) if row else 0

        return await self._api.run_db_interaction("leave_forget_stream_position", txn_fn)

    async def record_recovered_departures(
        self, departures: Sequence[Tuple[Departure, AuditFields]], position: int
    ) -> int:
        """Record the departures the log lacks and advance the catch-up, atomically.

        Returns:
            How many entries were appended (events already in the log are skipped).
        """

        def txn_fn(txn: LoggingTransaction) -> int:
            missing = [
                fields for d, fields in departures if not self._has_event_txn(txn, d.event_id)
            ]
            self._append_many_txn(txn, missing)
            txn.execute(
                "UPDATE leave_forget_stream_positions SET stream_id = ? "
                "WHERE name = ? AND stream_id < ?",
                (position, STREAM_DEPARTURES, position),
            )
            return len(missing)

        return await self._records.run(txn_fn)


def row_to_entry(row: Sequence[Any]) -> Dict[str, Any]:
    """An audit row (STORED_COLUMNS) as the entry that was hashed and signed.

    Optional fields appear only when set: an entry without them is exactly
    what was hashed.
    """
    entry = dict(zip(STORED_COLUMNS, row, strict=True))
    for key in OPTIONAL_FIELDS:
        if entry[key] is None:
            del entry[key]
        elif key in _INT_OPTIONAL_FIELDS:
            entry[key] = int(entry[key])
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
    columns = ", ".join(STORED_COLUMNS)
    sql = f"SELECT {columns} FROM leave_forget_audit WHERE {' AND '.join(clauses)}"
    if (
        limit is not None
        and user_id is None
        and room_id is None
        and (since_ts, until_ts)
        != (
            None,
            None,
        )
    ):
        # A time range alone: select the range through the ts index, then
        # sort it. Left to itself the planner walks seq order from the start
        # of the log, filtering on ts, which costs the entries *before* the
        # range (150 ms for a range in the middle of 10^6 entries on
        # PostgreSQL); this costs the entries *in* it. The inner LIMIT keeps
        # the subquery from being merged into the outer one (both engines).
        sql = f"SELECT * FROM ({sql} LIMIT 9223372036854775807) AS ranged ORDER BY seq LIMIT ?"
        args.append(limit)
    else:
        sql += " ORDER BY seq"
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
    # One keyset range of the (state, room_id) index per state, merged: the
    # cost grows with the page, not with the number of rooms in the states.
    part = (
        f"SELECT {_ROOM_COLUMNS} FROM leave_forget_rooms "
        "WHERE state = ? AND room_id > ? ORDER BY room_id LIMIT ?"
    )
    args: List[Any] = []
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
) -> Dict[str, int]:
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


def count_purged_since_txn(txn: Any, since_ts: int, paramstyle: str = "?") -> int:
    """Rooms recorded purged since ``since_ts`` (the audit log's ts index); shared with the CLI."""
    txn.execute(
        "SELECT COUNT(*) FROM leave_forget_audit "
        "WHERE ts >= ? AND action = 'purge' AND outcome = 'purged'".replace("?", paramstyle),
        (since_ts,),
    )
    row = txn.fetchone()
    return int(row[0]) if row else 0


def select_holds_page_txn(
    txn: Any, after: Optional[str], limit: int, paramstyle: str = "?"
) -> List[Dict[str, Any]]:
    """Holds placed through the admin API, by room id after ``after``, at most ``limit``."""
    sql = (
        f"SELECT {_HOLD_COLUMNS} FROM leave_forget_holds WHERE room_id > ? ORDER BY room_id LIMIT ?"
    )
    txn.execute(sql.replace("?", paramstyle), (after or "", limit))
    return [_hold_dict(r) for r in txn.fetchall()]


def select_holds_txn(txn: Any) -> List[Dict[str, Any]]:
    """Every hold placed through the admin API, by room id; shared with the offline CLI."""
    txn.execute(f"SELECT {_HOLD_COLUMNS} FROM leave_forget_holds ORDER BY room_id")
    return [_hold_dict(r) for r in txn.fetchall()]


_HOLD_COLUMNS = "room_id, held_by, reason, created_at, reason_escaped"


def _hold_values(
    room_id: str, held_by: str, reason: Optional[str], created_at: int
) -> Tuple[Any, ...]:
    """A hold row: a reason neither engine can store as-is is stored escaped, and marked."""
    if reason is not None and needs_escape(reason):
        return room_id, held_by, escape_text(reason), created_at, 1
    return room_id, held_by, reason, created_at, None


def _hold_dict(r: Sequence[Any]) -> Dict[str, Any]:
    """A hold row (_HOLD_COLUMNS) as the admin API and the CLI show it: the reason as given."""
    reason = unescape_text(r[2]) if r[4] and r[2] is not None else r[2]
    return {"room_id": r[0], "held_by": r[1], "reason": reason, "created_at": r[3]}
