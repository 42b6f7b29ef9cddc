"""The forget writer: forgets with their entries and retention state, in one transaction.

Every forget, whatever its route, goes through here: the requesters'
memberships and Synapse's forget rows (``_synapse/forget.py``), the audit
entries and the retention state (``retention/store.py``), atomically, many forgets
at once.
"""

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Optional, Protocol

import attr
from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget.audit.log import AuditFields, AuditLog
from matrix_leave_forget.db.group_commit import GroupCommit
from matrix_leave_forget.db.statements import StatementBatch
from matrix_leave_forget.retention.state import RoomRetention
from matrix_leave_forget.retention.store import RetentionStore


class ForgetOps(Protocol):
    """What a forget reads and writes of Synapse's own tables, many forgets at once."""

    def forget_reads_txn(
        self, txn: LoggingTransaction, pairs: Sequence[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], str], set[str]]:
        """Each (user_id, room_id)'s current membership (absent if none), and
        the rooms of those pairs that no local user outside ``pairs`` still
        has (a live membership, or one not forgotten)."""

    def forget_rows_txn(
        self,
        txn: LoggingTransaction,
        pairs: Sequence[tuple[str, str]],
        together: StatementBatch,
    ) -> None:
        """Synapse's own forget of each (user_id, room_id), its writes sent
        with ``together``'s (in one round trip where the engine allows)."""


@attr.s(frozen=True, auto_attribs=True)
class ForgetRequest:
    """One forget to perform and record.

    Attributes:
        fields: The entry (user_id and room_id set); its outcome is set from
            the membership: ``ok``, or ``noop`` for a room never had.
        refuse: Memberships that may not forget (nothing is written).
        record_noop: Whether a ``noop`` forget gets an entry at all.
    """

    fields: AuditFields
    refuse: AbstractSet[str] = frozenset()
    record_noop: bool = True

    @property
    def pair(self) -> tuple[str, str]:
        assert self.fields.user_id is not None and self.fields.room_id is not None
        return self.fields.user_id, self.fields.room_id


@attr.s(frozen=True, auto_attribs=True)
class ForgetResult:
    """What one forget transaction did.

    Attributes:
        membership: The user's membership at the forget (None: never had one).
        refused: Whether the membership forbids forgetting (nothing was written).
        entry: The audit entry (None if refused, or a noop not recorded).
        room: The room's retention row if it was (re)marked forgotten by all.
    """

    membership: str | None
    refused: bool = False
    entry: dict[str, Any] | None = None
    room: Optional["RoomRetention"] = None


class ForgetWriter:
    """Forgets with their entries and retention state, atomically and set-based.

    One transaction per group of concurrent forgets (group commit, after the
    chain lock): the requesters' memberships, Synapse's own forget rows, the
    audit entries and the retention state. A crash leaves either all of a
    forget or none of it. The group's statements do not grow with its size
    (one read of the memberships, one batched update per table, one
    allocation of cache-stream ids, one append, one forgotten-by-all check
    for all its rooms), so concurrent forgets cost about what one does, although
    the chain lock serialises them.

    Args:
        api: The module API.
        store: The audit log and retention state.
        ops: Synapse's side of a forget.
        retention_period_ms: How long a room forgotten by all is kept.
    """

    def __init__(
        self,
        api: ModuleApi,
        store: RetentionStore,
        ops: ForgetOps,
        retention_period_ms: int | None,
    ) -> None:
        self._store = store
        self._ops = ops
        self._period = retention_period_ms
        # The chain lock is taken by _forget_many_txn, with the head in the same call.
        self._group: GroupCommit[ForgetRequest, ForgetResult] = GroupCommit(
            api, "leave_forget_forget", None, self._forget_many_txn
        )

    async def forget(self, request: ForgetRequest) -> ForgetResult:
        """Forget, record the forget and whether the room is now forgotten by all."""
        return await self._group.run(request)

    def _forget_many_txn(
        self, txn: LoggingTransaction, requests: Sequence[ForgetRequest]
    ) -> list[ForgetResult]:
        head = AuditLog.lock_chain_read_head_txn(txn)
        pairs = [request.pair for request in requests]
        memberships, unremembered = self._ops.forget_reads_txn(txn, pairs)
        done = [
            i
            for i, request in enumerate(requests)
            if memberships.get(pairs[i]) not in request.refuse
        ]
        recorded = [i for i in done if pairs[i] in memberships or requests[i].record_noop]
        # The entries' insert and Synapse's forget rows go in one round trip.
        writes = StatementBatch()
        entries = self._store.audit.append_many_txn(
            txn,
            [
                attr.evolve(requests[i].fields, outcome="ok" if pairs[i] in memberships else "noop")
                for i in recorded
            ],
            head=head,
            together=writes,
        )
        self._ops.forget_rows_txn(txn, [pairs[i] for i in done], writes)
        entry_of = dict(zip(recorded, entries, strict=True))
        done_set = set(done)
        results = [
            ForgetResult(memberships.get(pair), entry=entry_of.get(i))
            if i in done_set
            else ForgetResult(memberships.get(pair), refused=True)
            for i, pair in enumerate(pairs)
        ]
        # A room no one outside the group still has is forgotten by all once
        # the group's forgets of it are written, unless one of them was
        # refused (a member still in it): so when the last two local users
        # forget a room together, the room is forgotten by all.
        refused_rooms = {pair[1] for i, pair in enumerate(pairs) if i not in done_set}
        last_forget = {
            pairs[i][1]: i
            for i in done
            if pairs[i] in memberships
            and pairs[i][1] in unremembered
            and pairs[i][1] not in refused_rooms
        }
        for room_id, i in sorted(last_forget.items()):
            last_entry = results[i].entry
            if last_entry is None:
                continue
            room = self._store.retention.rearm_forgotten_txn(
                txn, room_id, int(last_entry["ts"]), self._period
            )
            results[i] = attr.evolve(results[i], room=room)
        return results
