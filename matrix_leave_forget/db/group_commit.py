"""Group commit: concurrent writes that must serialise, run together in one transaction.

The audit log's appends (audit/log.py) and the forget writer's forgets
(membership/forget_writer.py) both hold the audit chain's lock; each caller
queues its job and one drainer runs all queued jobs in one transaction.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from synapse.module_api import LoggingTransaction, ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from matrix_leave_forget._synapse.contexts import run_in_background_process, wake

logger = logging.getLogger(__name__)

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
