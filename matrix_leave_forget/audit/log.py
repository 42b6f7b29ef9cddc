"""The audit log: the chain's rules in one place.

Appending (one head read, one seal, one insert), the chain lock that keeps
the chain from forking, group commit of concurrent appends (through
db/group_commit.py), the head and the queries over entries. Callers that
must record an entry in the same transaction as their own writes call the
``*_txn`` methods after ``lock_chain_txn``, or run their transaction through
``run_grouped``.
"""

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attr
from signedjson.types import SigningKey
from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget._synapse.sql import is_postgres
from matrix_leave_forget.audit.entry import (
    ACTION_ERASE,
    ENTRY_FIELDS,
    GENESIS_HASH,
    OPTIONAL_FIELDS,
    UNHASHED_FIELDS,
    ErasureIndex,
    content_problem,
    erasure_claim,
    erasure_claims,
    escape_fields,
    seal_entries,
)
from matrix_leave_forget.db.group_commit import GroupCommit, run_each_txn
from matrix_leave_forget.db.statements import StatementBatch
from matrix_leave_forget.timestamps import now_ms

logger = logging.getLogger(__name__)

# The columns every entry has; STORED_COLUMNS adds the optional fields, which
# an entry read back carries only when they are set (see audit.OPTIONAL_FIELDS).
AUDIT_COLUMNS: Sequence[str] = (*ENTRY_FIELDS, "hash", "signatures")
STORED_COLUMNS: Sequence[str] = (*AUDIT_COLUMNS, *OPTIONAL_FIELDS, *UNHASHED_FIELDS)
_INT_OPTIONAL_FIELDS = frozenset(
    {"format", "reason_bytes", "suppressed", "event_ts", "text_erased"}
)

# Most entries one ``erase`` entry records (its ``erasure`` field stays < 100 KB).
ERASE_BATCH = 1000
# Outcomes of ``erase`` entries: why the text went.
ERASED_USER = "erased_user"  # Synapse erased the user (GDPR erasure)
ERASED_TEXT_RETENTION = "text_retention"  # older than audit.text_retention
# Entries whose free text erasure removes: what users typed. Holds and
# purges carry an admin's or the module's text, which stays.
ERASABLE_ACTIONS = ("leave", "forget")

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
    # On an ``erase`` entry: the entries it erased (audit.erasure_claim, as JSON).
    erasure: str | None = None
    # On a ``purge``/``purged`` entry: the erasure receipt (retention.receipt, as JSON).
    receipt: str | None = None


T = TypeVar("T")


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

    async def run_locked(self, description: str, fn: Callable[[LoggingTransaction], T]) -> T:
        """Run ``fn`` in a transaction of its own that takes the chain lock first.

        The one way to append outside the group commit: the lock must be the
        transaction's first statement (see :meth:`lock_chain_txn`).
        """

        def txn_fn(txn: LoggingTransaction) -> T:
            self.lock_chain_txn(txn)
            return fn(txn)

        result: T = await self._api.run_db_interaction(description, txn_fn)
        return result

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

    def erase_text_txn(
        self, txn: LoggingTransaction, seqs: Sequence[int], outcome: str, user_id: str | None
    ) -> int:
        """Erase the free text of the entries ``seqs``, recording it in signed ``erase`` entries.

        Each entry is checked first: one whose contents no longer match its
        hash (tampered with) keeps its text, so that an erasure never
        launders an edit, and is logged. The ``erase`` entries (one per
        ERASE_BATCH) are appended first, then the text is deleted, in this
        transaction. Callers must have called lock_chain_txn first.

        Returns:
            How many entries had their text erased.
        """
        if not seqs:
            return 0
        txn.execute(
            f"SELECT {', '.join(STORED_COLUMNS)} FROM leave_forget_audit "
            f"WHERE seq IN ({', '.join('?' for _ in seqs)}) ORDER BY seq",
            list(seqs),
        )
        claims: list[list[Any]] = []
        for row in txn.fetchall():
            entry = row_to_entry(row)
            if entry.get("text_erased") is not None:
                continue
            problem = content_problem(entry, {})
            if problem is not None:
                logger.error(
                    "Audit entry %d keeps its free text, not erased: %s", entry["seq"], problem
                )
                continue
            claims.append(erasure_claim(entry))
        if not claims:
            return 0
        self.append_many_txn(
            txn,
            [
                AuditFields(
                    action=ACTION_ERASE,
                    outcome=outcome,
                    user_id=user_id,
                    erasure=json.dumps(claims[i : i + ERASE_BATCH], separators=(",", ":")),
                )
                for i in range(0, len(claims), ERASE_BATCH)
            ],
        )
        erased_seqs = [claim[0] for claim in claims]
        now = now_ms()
        for i in range(0, len(erased_seqs), ERASE_BATCH):
            chunk = erased_seqs[i : i + ERASE_BATCH]
            txn.execute(
                "UPDATE leave_forget_audit SET reason = NULL, reason_sha256 = NULL, "
                f"text_salt = NULL, text_erased = ? WHERE seq IN ({', '.join('?' for _ in chunk)})",
                [now, *chunk],
            )
        return len(claims)

    @staticmethod
    def user_text_seqs_txn(txn: LoggingTransaction, user_id: str, limit: int) -> list[int]:
        """Entries by or about user_id (``user_id`` or ``actor``) that still hold free text."""
        actions = ", ".join(f"'{a}'" for a in ERASABLE_ACTIONS)
        txn.execute(
            "SELECT seq FROM leave_forget_audit WHERE (user_id = ? OR actor = ?) "
            f"AND action IN ({actions}) AND text_erased IS NULL "
            "AND (reason IS NOT NULL OR reason_sha256 IS NOT NULL) ORDER BY seq LIMIT ?",
            (user_id, user_id, limit),
        )
        return [int(r[0]) for r in txn.fetchall()]

    @staticmethod
    def old_text_seqs_txn(txn: LoggingTransaction, before_ts: int, limit: int) -> list[int]:
        """Entries written before ``before_ts`` that still hold free text (audit.text_retention)."""
        actions = ", ".join(f"'{a}'" for a in ERASABLE_ACTIONS)
        txn.execute(
            # reason_sha256 is only ever set beside a reason's prefix; this
            # predicate is the partial index leave_forget_audit_text's.
            f"SELECT seq FROM leave_forget_audit WHERE ts < ? AND action IN ({actions}) "
            "AND reason IS NOT NULL AND text_erased IS NULL ORDER BY ts LIMIT ?",
            (before_ts, limit),
        )
        return [int(r[0]) for r in txn.fetchall()]

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


# The optional (and unhashed) columns after AUDIT_COLUMNS in a row, and those that hold an int.
_OPTIONAL_KEYS = (*OPTIONAL_FIELDS, *UNHASHED_FIELDS)
_INT_OPTIONAL_KEYS = tuple(key for key in _OPTIONAL_KEYS if key in _INT_OPTIONAL_FIELDS)
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
        # range (docs/benchmarks.md §2); this costs the entries *in* it. The inner LIMIT keeps
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


def select_erasures_txn(txn: Any, paramstyle: str = "?") -> ErasureIndex:
    """Every ``erase`` entry's claims, for verify (an erased entry precedes its record).

    A record that does not decode is left out here: verify reports it when
    the chain reaches it. Shared by the offline CLI (``paramstyle``: see select_audit_txn).
    """
    columns = ", ".join(STORED_COLUMNS)
    txn.execute(
        f"SELECT {columns} FROM leave_forget_audit WHERE erasure IS NOT NULL ORDER BY seq".replace(
            "?", paramstyle
        )
    )
    out = ErasureIndex()
    for row in txn.fetchall():
        try:
            entry = row_to_entry(row)
            for seq, (claimed_hash, digest) in erasure_claims(entry).items():
                out[seq] = (entry["seq"], claimed_hash, digest)
        except (ValueError, TypeError, KeyError):
            continue
    return out


def purge_receipt_txn(txn: Any, room_id: str, paramstyle: str = "?") -> dict[str, Any] | None:
    """The room's latest ``purge``/``purged`` entry: seq, ts, hash and receipt (JSON text).

    Shared with the CLI (``paramstyle``: see select_audit_txn).
    """
    return purge_entry_txn(txn, room_id, "purged", 0, paramstyle)


def purge_entry_txn(
    txn: Any, room_id: str, outcome: str, after_seq: int, paramstyle: str = "?"
) -> dict[str, Any] | None:
    """The room's latest ``purge`` entry with ``outcome`` after ``after_seq``: seq, ts, hash
    and receipt (JSON text), or None. Shared with the CLI (``paramstyle``: see select_audit_txn).
    """
    txn.execute(
        "SELECT seq, ts, hash, receipt FROM leave_forget_audit WHERE room_id = ? "
        "AND action = 'purge' AND outcome = ? AND seq > ? ORDER BY seq DESC LIMIT 1".replace(
            "?", paramstyle
        ),
        (room_id, outcome, after_seq),
    )
    row = txn.fetchone()
    if row is None:
        return None
    return {"seq": int(row[0]), "ts": int(row[1]), "hash": str(row[2]), "receipt": row[3]}


def count_purged_since_txn(txn: Any, since_ts: int, paramstyle: str = "?") -> int:
    """Rooms recorded purged since ``since_ts`` (the audit log's ts index); shared with the CLI."""
    txn.execute(
        "SELECT COUNT(*) FROM leave_forget_audit "
        "WHERE ts >= ? AND action = 'purge' AND outcome = 'purged'".replace("?", paramstyle),
        (since_ts,),
    )
    row = txn.fetchone()
    return int(row[0]) if row else 0
