"""GroupCommit.settled: a read waits for the writes queued before it, and only those."""

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from matrix_leave_forget.audit.log import GroupCommit, run_each_txn


class FakeApi:
    """run_db_interaction answers when the test says so; background processes just run."""

    def __init__(self) -> None:
        self.transactions: list[tuple[Callable[[Any], Any], defer.Deferred[Any]]] = []

    def run_db_interaction(self, desc: str, fn: Callable[[Any], Any]) -> "defer.Deferred[Any]":
        d: defer.Deferred[Any] = defer.Deferred()
        self.transactions.append((fn, d))
        return d

    def run_as_background_process(self, desc: str, func: Callable[[], Awaitable[None]]) -> None:
        defer.ensureDeferred(func())

    def commit_next(self) -> None:
        fn, d = self.transactions.pop(0)
        try:
            result = fn(object())
        except Exception as error:
            d.errback(error)
        else:
            d.callback(result)


class SettledTests(TestCase):
    def setUp(self) -> None:
        self.api = FakeApi()
        self.commit: GroupCommit[Callable[[Any], str], str] = GroupCommit(
            self.api,  # type: ignore[arg-type]
            "test",
            None,
            run_each_txn,
        )

    def queue(self, name: str) -> "defer.Deferred[str]":
        return defer.ensureDeferred(self.commit.run(lambda txn: name))

    def test_nothing_queued(self) -> None:
        """With nothing queued (or everything written), settled returns at once."""
        self.assertIsNone(self.successResultOf(defer.ensureDeferred(self.commit.settled())))
        a = self.queue("a")
        self.api.commit_next()
        self.assertEqual(self.successResultOf(a), "a")
        self.assertIsNone(self.successResultOf(defer.ensureDeferred(self.commit.settled())))

    def test_waits_for_earlier_jobs_only(self) -> None:
        """settled waits until the newest job queued before it is written; a job queued
        afterwards does not hold it back, and every caller still gets its own result."""
        a, b = self.queue("a"), self.queue("b")
        settled = defer.ensureDeferred(self.commit.settled())
        self.assertNoResult(settled)
        self.api.commit_next()  # a's transaction
        self.assertEqual(self.successResultOf(a), "a")
        self.assertNoResult(settled)
        c = self.queue("c")  # after settled was asked
        self.api.commit_next()  # b's
        self.assertIsNone(self.successResultOf(settled))
        self.assertEqual(self.successResultOf(b), "b")
        self.assertNoResult(c)
        self.api.commit_next()
        self.assertEqual(self.successResultOf(c), "c")

    def test_a_failed_job_settles_too(self) -> None:
        """A job whose transaction fails still counts as finished (its caller gets the error)."""

        def boom(txn: Any) -> str:
            raise RuntimeError("no")

        failed = defer.ensureDeferred(self.commit.run(boom))
        settled = defer.ensureDeferred(self.commit.settled())
        self.api.commit_next()
        self.assertIsNone(self.successResultOf(settled))
        self.failureResultOf(failed, RuntimeError)
