"""The sweep's decisions, in process (no Synapse): which due rooms are purged, which are
left held, which are cancelled because someone came back, and the retention summary.

``RetentionState.decide_due`` runs with the sweep's own check (``why_not_forgotten_many_txn``)
on an in-memory SQLite database holding the module's tables and the columns of
Synapse's membership tables it reads. tests/integration/test_retention.py checks the
same decisions against a real Synapse, purges included.
"""

from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.retention.state import (
    STATE_ACTIVE,
    STATE_DRY_RUN,
    STATE_FORGOTTEN,
    STATE_PURGING,
    DueDecisions,
    retention_counts_txn,
    why_not_forgotten_many_txn,
)
from matrix_leave_forget.retention.store import RetentionStore
from matrix_leave_forget.retention.summary import RATE_WINDOW_MS, retention_summary
from tests.unit.db_helpers import InlineApi, World

NOW = 1_800_000_000_000
PERIOD_MS = 1000
ALICE = "@alice:example.org"


class DecideDueTests(SynchronousTestCase):
    """RetentionState.decide_due with the sweep's check of Synapse's memberships."""

    def setUp(self) -> None:
        self.world = World()
        self.api = InlineApi(self.world)
        store = RetentionStore(self.api, "example.org", "master", generate_signing_key("k"))  # type: ignore[arg-type]
        self.retention = store.retention

    def forgotten(self, room_id: str, at: int) -> None:
        """A room every local member (alice) left and forgot at ``at``."""
        self.world.member(ALICE, room_id, "leave", forgotten=True)
        self.retention.mark_forgotten_txn(self.world.txn, room_id, at, PERIOD_MS)

    def decide(
        self, limit: int = 10, holds: frozenset[str] = frozenset(), dry_run: bool = False
    ) -> DueDecisions:
        result: DueDecisions = self.successResultOf(
            defer.ensureDeferred(
                self.retention.decide_due(NOW, limit, why_not_forgotten_many_txn, holds, dry_run)
            )
        )
        return result

    def state(self, room_id: str) -> Any:
        return self.world.rows(
            "SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,)
        )[0][0]

    def test_due_rooms_are_decided_oldest_first(self) -> None:
        """Due rooms go to purging, oldest due first; a room not yet due waits."""
        self.forgotten("!new:example.org", NOW - PERIOD_MS)
        self.forgotten("!old:example.org", NOW - 5 * PERIOD_MS)
        self.forgotten("!later:example.org", NOW)
        decisions = self.decide()
        self.assertEqual(decisions.decided, ["!old:example.org", "!new:example.org"])
        self.assertEqual(decisions.cancelled, [])
        self.assertFalse(decisions.more)
        self.assertEqual(self.state("!old:example.org"), STATE_PURGING)
        self.assertEqual(self.state("!later:example.org"), STATE_FORGOTTEN)

    def test_limit_leaves_the_rest_for_later(self) -> None:
        """A full batch says more may be due; the next decision takes the rest."""
        for i in range(3):
            self.forgotten(f"!r{i}:example.org", NOW - (10 - i) * PERIOD_MS)
        first = self.decide(limit=2)
        self.assertEqual(len(first.decided), 2)
        self.assertTrue(first.more)
        self.assertEqual(self.decide(limit=2).decided, ["!r2:example.org"])

    def test_holds_are_left_due(self) -> None:
        """A room held through the admin API or the config is not decided and stays due."""
        self.forgotten("!api:example.org", NOW - 2 * PERIOD_MS)
        self.forgotten("!config:example.org", NOW - 2 * PERIOD_MS)
        self.forgotten("!free:example.org", NOW - 2 * PERIOD_MS)
        self.world.txn.execute(
            "INSERT INTO leave_forget_holds (room_id, held_by, created_at) VALUES (?, ?, ?)",
            ("!api:example.org", "@admin:example.org", NOW),
        )
        decisions = self.decide(holds=frozenset({"!config:example.org"}))
        self.assertEqual(decisions.decided, ["!free:example.org"])
        self.assertEqual(self.state("!api:example.org"), STATE_FORGOTTEN)
        self.assertEqual(self.state("!config:example.org"), STATE_FORGOTTEN)

    def test_someone_came_back(self) -> None:
        """A room someone rejoined (or is invited to) is cancelled, with who and why."""
        self.forgotten("!back:example.org", NOW - 2 * PERIOD_MS)
        self.world.member("@bob:example.org", "!back:example.org", "invite")
        decisions = self.decide()
        self.assertEqual(decisions.decided, [])
        self.assertEqual(
            decisions.cancelled,
            [("!back:example.org", "@bob:example.org has membership invite")],
        )
        self.assertEqual(self.state("!back:example.org"), STATE_ACTIVE)

    def test_dry_run_records_without_purging(self) -> None:
        """Under dry_run a due room is recorded as dry_run, with its audit entry."""
        self.forgotten("!dry:example.org", NOW - 2 * PERIOD_MS)
        self.assertEqual(self.decide(dry_run=True).decided, ["!dry:example.org"])
        self.assertEqual(self.state("!dry:example.org"), STATE_DRY_RUN)
        self.assertEqual(
            self.world.rows("SELECT action, outcome, room_id FROM leave_forget_audit"),
            [("purge", "dry_run", "!dry:example.org")],
        )

    def test_counts_follow_the_decisions(self) -> None:
        """retention_counts_txn counts what decide_due will take: due, held, waiting, in flight."""
        self.forgotten("!due:example.org", NOW - 2 * PERIOD_MS)
        self.forgotten("!held:example.org", NOW - 2 * PERIOD_MS)
        self.forgotten("!waiting:example.org", NOW)
        holds = frozenset({"!held:example.org"})
        counts = retention_counts_txn(self.world.txn, NOW, holds)
        self.assertEqual(counts, {"due": 1, "held": 1, "waiting": 1, "in_flight": 0})
        self.decide(holds=holds)
        counts = retention_counts_txn(self.world.txn, NOW, holds)
        self.assertEqual(counts, {"due": 0, "held": 1, "waiting": 1, "in_flight": 1})


class RetentionSummaryTests(SynchronousTestCase):
    """The summary the admin API and the CLI show."""

    COUNTS = {"due": 50, "in_flight": 10, "held": 2, "waiting": 7}

    def test_rate_and_time_to_drain(self) -> None:
        """The rate is the rooms purged over the window; the time to drain, what is left at it."""
        purged = 120
        summary = retention_summary(self.COUNTS, purged)
        rate = purged / (RATE_WINDOW_MS / 1000)
        self.assertEqual(summary["rate_per_s"], round(rate, 3))
        self.assertEqual(summary["eta_s"], round(60 / rate, 1))
        self.assertEqual(
            {k: summary[k] for k in ("backlog", "in_flight", "held", "waiting")},
            {"backlog": 50, "in_flight": 10, "held": 2, "waiting": 7},
        )

    def test_no_rate_yet(self) -> None:
        """Without a purge in the window the time to drain is unknown, unless the pacer has
        an estimate; with nothing left it is 0."""
        self.assertIsNone(retention_summary(self.COUNTS, 0)["eta_s"])
        self.assertEqual(retention_summary(self.COUNTS, 0, 2.0)["eta_s"], 30.0)
        self.assertEqual(retention_summary(self.COUNTS, 0, 2.0)["rate_per_s"], 0.0)
        empty = {"due": 0, "in_flight": 0, "held": 3, "waiting": 1}
        self.assertEqual(retention_summary(empty, 0)["eta_s"], 0)

    def test_measured_rate_wins_over_the_estimate(self) -> None:
        """A measured rate is used for the time to drain even when the pacer has an estimate."""
        self.assertEqual(
            retention_summary(self.COUNTS, 60, 100.0)["eta_s"],
            retention_summary(self.COUNTS, 60)["eta_s"],
        )
