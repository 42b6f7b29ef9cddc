"""The audit log: the chain's rules in one place.

Appending (one head read, one seal, one insert), the chain lock that keeps
the chain from forking, group commit of concurrent appends, the head and the
queries over entries. Callers that must record an entry in the same
transaction as their own writes call the ``*_txn`` methods after
``lock_chain_txn``, or run their transaction through ``run_grouped``.
"""

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import attr
from signedjson.types import SigningKey
from synapse.module_api import LoggingTransaction, ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from matrix_leave_forget._synapse.contexts import run_in_background_process, wake
from matrix_leave_forget.audit.entry import (
    ENTRY_FIELDS,
    GENESIS_HASH,
    OPTIONAL_FIELDS,
    escape_fields,
    now_ms,
    seal_entries,
)
from matrix_leave_forget.db.schema import is_postgres
from matrix_leave_forget.db.statements import StatementBatch

logger = logging.getLogger(__name__)

# The columns every entry has; STORED_COLUMNS adds the optional fields, which
# an entry read back carries only when they are set (see audit.OPTIONAL_FIELDS).
AUDIT_COLUMNS: Sequence[str] = (*ENTRY_FIELDS, "hash", "signatures")
STORED_COLUMNS: Sequence[str] = (*AUDIT_COLUMNS, *OPTIONAL_FIELDS)
_INT_OPTIONAL_FIELDS = frozenset({"format", "reason_bytes", "suppressed", "event_ts"})

# Outcome of entries written by start-up reconciliation, for actions Synapse
# performed but whose audit write was lost (a crash between the two).
OUTCOME_RECOVERED = "recovered"


@attr.s(frozen=True, auto_attribs=True)
class AuditFields:
    """What the caller knows about an action; the log adds seq, chain and signature."""

    action: str
    outcome: str
    user_id: str | None = None
    room_id: str | None = None
    reason: str | None = None
    event_id: str | None = None
    device_id: str | None = None
    # A refused request's reason cut to a prefix: the whole reason's size and hash.
    reason_bytes: int | None = None
    reason_sha256: str | None = None
    # This user's refusals counted but not appended since their previous entry.
    suppressed: int | None = None
    # How it happened (docs/audit.md "Routes"), who acted when not the user,
    # and the membership event's own time.
    via: str | None = None
    actor: str | None = None
    event_ts: int | None = None


T = TypeVar("T")
Item = TypeVar("Item")

# Most audit writes one group-commit transaction carries.
GROUP_COMMIT_MAX = 100


class _Job(Generic[Item, T]):
    """One caller's work in a group commit, and how it ended."""

    def __init__(self, item: Item) -> None:
        self.item = item
        self.turn: defer.Deferred[None] = defer.Deferred()
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def finish(self, result: T | None = None, error: BaseException | None = None) -> None:
        self.done, self.result, self.error = True, result, error

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit(Generic[Item, T]):
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
        prepare: Run first in every transaction (the chain lock), if given.
        run_txn: Does the queued jobs' work in the transaction, all at once
            (set-based where it can), returning one result per item in order.
    """

    def __init__(
        self,
        api: ModuleApi,
        desc: str,
        prepare: Callable[[LoggingTransaction], None] | None,
        run_txn: Callable[[LoggingTransaction, Sequence[Item]], Sequence[T]],
    ) -> None:
        self._api = api
        self._desc = desc
        self._prepare = prepare
        self._run_txn = run_txn
        self._waiting: list[_Job[Item, T]] = []
        self._draining = False

    async def run(self, item: Item) -> T:
        job: _Job[Item, T] = _Job(item)
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

    async def _run_batch(self, batch: list[_Job[Item, T]]) -> None:
        try:
            results = await self._run_items([j.item for j in batch])
        except Exception as error:
            if len(batch) == 1:
                batch[0].finish(error=error)
                return
            for j in batch:
                try:
                    j.finish((await self._run_items([j.item]))[0])
                except Exception as one_error:
                    j.finish(error=one_error)
            return
        for j, result in zip(batch, results, strict=True):
            j.finish(result)

    async def _run_items(self, items: list[Item]) -> Sequence[T]:
        def txn_fn(txn: LoggingTransaction) -> Sequence[T]:
            if self._prepare is not None:
                self._prepare(txn)
            return self._run_txn(txn, items)

        return await self._api.run_db_interaction(self._desc, txn_fn)


def run_each_txn(
    txn: LoggingTransaction, fns: Sequence[Callable[[LoggingTransaction], T]]
) -> list[T]:
    """GroupCommit's run_txn for jobs that are transaction functions: one after the other."""
    return [fn(txn) for fn in fns]


class AuditLog:
    """The tamper-evident audit chain in leave_forget_audit.

    Args:
        api: The module API (for run_db_interaction).
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
        self._records: GroupCommit[Callable[[LoggingTransaction], Any], Any] = GroupCommit(
            api, "leave_forget_record", self.lock_chain_txn, run_each_txn
        )

    async def run_grouped(self, fn: Callable[[LoggingTransaction], T]) -> T:
        """Run ``fn`` in a group-committed transaction, after the chain lock."""
        result: T = await self._records.run(fn)
        return result

    def append_txn(self, txn: LoggingTransaction, fields: AuditFields) -> dict[str, Any]:
        """Append one entry to the chain.

        Callers must have called lock_chain_txn first in the same transaction.
        """
        return self.append_many_txn(txn, [fields])[0]

    def append_many_txn(
        self,
        txn: LoggingTransaction,
        many: Sequence[AuditFields],
        head: tuple[int, str] | None = None,
        together: StatementBatch | None = None,
    ) -> list[dict[str, Any]]:
        """Append entries to the chain in order: one head read, one signature, one insert.

        The entries are sealed as a group (audit.seal_entries): each is hashed
        into the chain and only the last is signed, its signature covering the
        whole group; the group commits or fails as one. Client texts that
        neither engine can store (NUL, lone surrogates) are stored escaped.

        Callers must have called lock_chain_txn first in the same transaction
        (or lock_chain_read_head_txn, whose head they may pass as ``head``,
        sparing a statement).

        Args:
            together: If given, the insert is added to it for the caller to
                run (with its own writes, in one round trip) before the
                transaction ends; otherwise it runs now.
        """
        if not many:
            return []
        seq, prev_hash = self.read_head_txn(txn) if head is None else head
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
        if together is not None:
            together.add_each(_INSERT_SQL, rows)
        elif len(rows) > 1 and is_postgres(txn):
            # One multi-row INSERT per 1000 rows, not one statement per row.
            txn.execute_values(
                f"{_INSERT_INTO} VALUES ?",
                rows,
                fetch=False,
            )
        else:
            batch = StatementBatch()
            batch.add_each(_INSERT_SQL, rows)
            batch.run(txn)
        return entries

    @staticmethod
    def lock_chain_txn(txn: LoggingTransaction) -> None:
        """Serialise appenders across processes so the chain never forks.

        On PostgreSQL this must be the transaction's first statement, so that
        the REPEATABLE READ snapshot is taken after the lock and sees the
        latest head. SQLite allows one writer at a time already.
        """
        if is_postgres(txn):
            txn.execute(_LOCK_CHAIN_SQL)

    @staticmethod
    def lock_chain_read_head_txn(txn: LoggingTransaction) -> tuple[int, str]:
        """lock_chain_txn, then the head (as read_head_txn), in one round trip.

        On PostgreSQL both statements go in one call (psycopg2 returns the
        last one's rows); the SELECT still takes the transaction's snapshot
        after the lock is granted.
        """
        if is_postgres(txn):
            txn.execute(f"{_LOCK_CHAIN_SQL}; {_HEAD_SQL}")
            return _head(txn.fetchone())
        return AuditLog.read_head_txn(txn)

    @staticmethod
    def read_head_txn(txn: LoggingTransaction) -> tuple[int, str]:
        """The chain's head: (seq, hash) of the newest entry, (0, GENESIS_HASH) if none."""
        txn.execute(_HEAD_SQL)
        return _head(txn.fetchone())

    async def head(self) -> tuple[int, str]:
        """The chain's head: (seq, hash) of the newest entry, (0, GENESIS_HASH) if none."""
        return await self._api.run_db_interaction("leave_forget_audit_head", self.read_head_txn)

    async def append(self, fields: AuditFields) -> dict[str, Any]:
        """Append one audit entry (group-committed with concurrent ones)."""

        def txn_fn(txn: LoggingTransaction) -> dict[str, Any]:
            return self.append_txn(txn, fields)

        entry: dict[str, Any] = await self._records.run(txn_fn)
        return entry

    @staticmethod
    def has_event_txn(txn: LoggingTransaction, event_id: str | None) -> bool:
        txn.execute(
            "SELECT 1 FROM leave_forget_audit WHERE event_id = ? AND action = 'leave' LIMIT 1",
            (event_id,),
        )
        return txn.fetchone() is not None

    async def audit_page(
        self,
        *,
        user_id: str | None = None,
        room_id: str | None = None,
        since_ts: int | None = None,
        until_ts: int | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit entries in seq order, filtered, keyset-paged by ``after_seq``."""

        def txn_fn(txn: LoggingTransaction) -> list[dict[str, Any]]:
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

    async def member_history(self, room_id: str) -> dict[str, dict[str, Any]]:
        """Each user's latest leave and forget in room_id, from the audit log.

        Successful entries of every route count, those found by the catch-up
        after a crash (``recovered``) included; a leave's time is its event's
        own when the entry has it.
        """

        def txn_fn(txn: LoggingTransaction) -> dict[str, dict[str, Any]]:
            txn.execute(
                "SELECT user_id, action, ts, reason, event_id, via, actor, event_ts, outcome "
                "FROM leave_forget_audit WHERE room_id = ? AND action IN ('leave', 'forget') "
                "AND outcome IN ('ok', 'noop', ?) AND user_id IS NOT NULL ORDER BY seq",
                (room_id, OUTCOME_RECOVERED),
            )
            history: dict[str, dict[str, Any]] = {}
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

    async def count_purged_since(self, since_ts: int) -> int:
        """Rooms recorded purged since ``since_ts`` (the audit log's ts index)."""
        return await self._api.run_db_interaction(
            "leave_forget_count_purged_since", count_purged_since_txn, since_ts
        )


_LOCK_CHAIN_SQL = "LOCK TABLE leave_forget_audit IN SHARE ROW EXCLUSIVE MODE"
_HEAD_SQL = "SELECT seq, hash FROM leave_forget_audit ORDER BY seq DESC LIMIT 1"
_INSERT_INTO = f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)})"
_INSERT_SQL = f"{_INSERT_INTO} VALUES ({', '.join('?' for _ in STORED_COLUMNS)})"


def _head(row: Sequence[Any] | None) -> tuple[int, str]:
    return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)


# The optional columns after AUDIT_COLUMNS in a row, and those that hold an int.
_OPTIONAL_KEYS = tuple(OPTIONAL_FIELDS)
_INT_OPTIONAL_KEYS = tuple(key for key in OPTIONAL_FIELDS if key in _INT_OPTIONAL_FIELDS)
# What a row's signatures column holds for an unsigned (group-sealed) entry.
_NO_SIGNATURES = "{}"


def row_to_entry(row: Sequence[Any]) -> dict[str, Any]:
    """An audit row (STORED_COLUMNS) as the entry that was hashed and signed.

    Optional fields appear only when set: an entry without them is exactly
    what was hashed. Integer columns are made ints (a driver may return
    another type). (``verify`` decodes every row of the log through this: it
    builds each dict once, converts only what is not an int already and skips
    decoding an unsigned entry's ``{}``.)
    """
    if len(row) != len(STORED_COLUMNS):
        raise ValueError(f"an audit row has {len(STORED_COLUMNS)} columns, not {len(row)}")
    entry = dict(zip(AUDIT_COLUMNS, row, strict=False))  # the row is longer: checked above
    for key, value in zip(_OPTIONAL_KEYS, row[len(AUDIT_COLUMNS) :], strict=True):
        if value is not None:
            entry[key] = value
    for key in _INT_OPTIONAL_KEYS:
        value = entry.get(key)
        if value is not None and type(value) is not int:
            entry[key] = int(value)
    signatures = entry["signatures"]
    entry["signatures"] = {} if signatures == _NO_SIGNATURES else json.loads(signatures)
    for key in ("seq", "ts"):
        if type(entry[key]) is not int:
            entry[key] = int(entry[key])
    return entry


def select_audit_txn(
    txn: Any,
    *,
    user_id: str | None = None,
    room_id: str | None = None,
    since_ts: int | None = None,
    until_ts: int | None = None,
    after_seq: int = 0,
    limit: int | None = 100,
    paramstyle: str = "?",
) -> list[dict[str, Any]]:
    """Select audit entries; shared by the admin API and the offline CLI.

    Args:
        txn: A DB-API cursor (Synapse's LoggingTransaction converts ``?``; the
            CLI passes psycopg2's ``%s`` as ``paramstyle``).
    """
    clauses = ["seq > ?"]
    args: list[Any] = [after_seq]
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


def count_purged_since_txn(txn: Any, since_ts: int, paramstyle: str = "?") -> int:
    """Rooms recorded purged since ``since_ts`` (the audit log's ts index); shared with the CLI."""
    txn.execute(
        "SELECT COUNT(*) FROM leave_forget_audit "
        "WHERE ts >= ? AND action = 'purge' AND outcome = 'purged'".replace("?", paramstyle),
        (since_ts,),
    )
    row = txn.fetchone()
    return int(row[0]) if row else 0
