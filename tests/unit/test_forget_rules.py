"""The rules of a forget, in process (no Synapse): who may forget, what is recorded, and
when a room is forgotten by every local user.

The forget writer runs on an in-memory SQLite database holding the module's tables and
the columns of Synapse's membership tables its queries read; Synapse's side of a forget
is the real query (``_synapse/forget.py``) and a plain ``forgotten = 1`` update. The
real-Synapse suites (tests/integration/test_clients.py, test_audit_routes.py) check the
same rules through Synapse's own handlers.
"""

import itertools
from collections.abc import Sequence
from typing import Any

from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget._synapse.forget import (
    forget_reads_txn,
    remembering_members_txn,
    remembers,
)
from matrix_leave_forget._synapse.sql import LIVE_MEMBERSHIPS
from matrix_leave_forget.audit.log import AuditFields
from matrix_leave_forget.db.statements import StatementBatch
from matrix_leave_forget.membership.forget_writer import ForgetRequest, ForgetResult, ForgetWriter
from matrix_leave_forget.retention.state import STATE_FORGOTTEN, why_not_forgotten_many_txn
from matrix_leave_forget.retention.store import RetentionStore
from tests.unit.db_helpers import InlineApi, World

PERIOD_MS = 7 * 86_400_000
ROOM = "!room:example.org"
ALICE = "@alice:example.org"
BOB = "@bob:example.org"


class WorldForgets:
    """Synapse's side of a forget on a World: the real reads, a plain forget row."""

    def __init__(self, world: World) -> None:
        self._world = world

    def forget_reads_txn(
        self, txn: Any, pairs: Sequence[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], str], set[str]]:
        return forget_reads_txn(txn, pairs)

    def forget_rows_txn(
        self, txn: Any, pairs: Sequence[tuple[str, str]], together: StatementBatch
    ) -> None:
        together.add_each(
            "UPDATE room_memberships SET forgotten = 1 WHERE user_id = ? AND room_id = ?",
            list(pairs),
        )
        together.run(txn)


def request(user_id: str, room_id: str = ROOM, record_noop: bool = True) -> ForgetRequest:
    """A forget as the membership handler asks for one (live memberships refused)."""
    return ForgetRequest(
        AuditFields(action="forget", outcome="ok", user_id=user_id, room_id=room_id, via="api"),
        refuse=LIVE_MEMBERSHIPS,
        record_noop=record_noop,
    )


class ForgetWriterTests(SynchronousTestCase):
    """ForgetWriter's decisions for one group of concurrent forgets."""

    def setUp(self) -> None:
        self.world = World()
        api = InlineApi(self.world)
        store = RetentionStore(api, "example.org", "master", generate_signing_key("k"))  # type: ignore[arg-type]
        self.writer = ForgetWriter(api, store, WorldForgets(self.world), PERIOD_MS)  # type: ignore[arg-type]

    def forget(self, *requests: ForgetRequest) -> list[ForgetResult]:
        return self.writer._forget_many_txn(self.world.txn, requests)

    def entries(self) -> list[tuple[Any, ...]]:
        return self.world.rows(
            "SELECT user_id, room_id, action, outcome FROM leave_forget_audit ORDER BY seq"
        )

    def room_state(self, room_id: str = ROOM) -> Any:
        rows = self.world.rows("SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,))
        return rows[0][0] if rows else None

    def test_live_membership_is_refused_and_nothing_written(self) -> None:
        """A joined, invited or knocking user may not forget: refused, no entry, no row."""
        for i, membership in enumerate(sorted(LIVE_MEMBERSHIPS)):
            room_id = f"!r{i}:example.org"
            self.world.member(ALICE, room_id, membership)
            (result,) = self.forget(request(ALICE, room_id))
            self.assertTrue(result.refused, membership)
            self.assertEqual(result.membership, membership)
            self.assertIsNone(result.entry)
        self.assertEqual(self.entries(), [])
        self.assertEqual(self.world.rows("SELECT forgotten FROM room_memberships"), [(0,)] * 3)

    def test_last_local_member_makes_the_room_forgotten_by_all(self) -> None:
        """The first of two departed members to forget leaves the room remembered; the
        second's forget marks it forgotten, due one retention period after that forget."""
        self.world.member(ALICE, ROOM, "leave")
        self.world.member(BOB, ROOM, "ban")
        (first,) = self.forget(request(ALICE))
        self.assertIsNone(first.room)
        self.assertIsNone(self.room_state())
        (second,) = self.forget(request(BOB))
        assert second.room is not None and second.entry is not None
        self.assertEqual(second.room.state, STATE_FORGOTTEN)
        self.assertEqual(second.room.purge_due_at, int(second.entry["ts"]) + PERIOD_MS)
        self.assertEqual(
            self.entries(), [(ALICE, ROOM, "forget", "ok"), (BOB, ROOM, "forget", "ok")]
        )

    def test_last_two_together_mark_the_room_once(self) -> None:
        """When the last two members forget in one group, the room is marked by the last one."""
        self.world.member(ALICE, ROOM, "leave")
        self.world.member(BOB, ROOM, "leave")
        first, second = self.forget(request(ALICE), request(BOB))
        self.assertIsNone(first.room)
        self.assertIsNotNone(second.room)
        self.assertEqual(self.room_state(), STATE_FORGOTTEN)

    def test_refused_member_in_the_group_keeps_the_room(self) -> None:
        """A group forget that is refused for one member (still joined) marks nothing."""
        self.world.member(ALICE, ROOM, "leave")
        self.world.member(BOB, ROOM, "join")
        done, refused = self.forget(request(ALICE), request(BOB))
        self.assertFalse(done.refused)
        self.assertTrue(refused.refused)
        self.assertIsNone(done.room)
        self.assertIsNone(self.room_state())

    def test_member_who_has_not_forgotten_keeps_the_room(self) -> None:
        """A departed member who has not forgotten still has the room."""
        self.world.member(ALICE, ROOM, "leave")
        self.world.member(BOB, ROOM, "leave")
        (result,) = self.forget(request(ALICE))
        self.assertIsNone(result.room)

    def test_room_never_had_is_a_noop(self) -> None:
        """A forget of a room the user never had is recorded as a noop (or not at all when
        asked), writes no forget row and never marks the room."""
        self.world.room(ROOM)
        (recorded,) = self.forget(request(ALICE))
        self.assertIsNone(recorded.membership)
        self.assertFalse(recorded.refused)
        self.assertIsNone(recorded.room)
        (unrecorded,) = self.forget(request(ALICE, record_noop=False))
        self.assertIsNone(unrecorded.entry)
        self.assertEqual(self.entries(), [(ALICE, ROOM, "forget", "noop")])


class ForgottenByAllRuleTests(SynchronousTestCase):
    """The two queries that ask "does a local member still have this room" agree with
    ``remembers``, on every combination of two members' memberships and forget flags."""

    MEMBERSHIPS = ("join", "invite", "knock", "leave", "ban")

    def test_queries_agree_with_the_rule(self) -> None:
        """For each combination, forget_reads_txn (asked for a third member's forget) and
        why_not_forgotten_many_txn answer what ``remembers`` says of the rows."""
        world = World()
        states = list(itertools.product(self.MEMBERSHIPS, (False, True)))
        expected: dict[str, bool] = {}
        pairs = []
        for i, ((m1, f1), (m2, f2)) in enumerate(itertools.product(states, states)):
            room_id = f"!c{i}:example.org"
            world.member(ALICE, room_id, m1, f1)
            world.member(BOB, room_id, m2, f2)
            # The member whose forget is asked about: left, not forgotten yet.
            world.member("@carol:example.org", room_id, "leave")
            pairs.append(("@carol:example.org", room_id))
            expected[room_id] = remembers(m1, f1) or remembers(m2, f2)
        memberships, unremembered = forget_reads_txn(world.txn, pairs)
        self.assertEqual(len(memberships), len(pairs))
        for room_id, remembered in expected.items():
            self.assertEqual(room_id not in unremembered, remembered, room_id)
        world.forget_rows(pairs)
        why = why_not_forgotten_many_txn(world.txn, sorted(expected))
        for room_id, remembered in expected.items():
            self.assertEqual(room_id in why, remembered, (room_id, why.get(room_id)))
        _, with_members, _ = remembering_members_txn(world.txn, sorted(expected))
        self.assertEqual(with_members, set(expected))

    def test_reasons(self) -> None:
        """The sweep's reasons name who still has a room, live memberships first."""
        world = World()
        world.member(ALICE, "!a:example.org", "leave")
        world.member(BOB, "!a:example.org", "invite")
        world.member(ALICE, "!b:example.org", "leave")
        world.room("!c:example.org")
        why = why_not_forgotten_many_txn(
            world.txn, ["!a:example.org", "!b:example.org", "!c:example.org", "!d:example.org"]
        )
        self.assertEqual(
            why,
            {
                "!a:example.org": f"{BOB} has membership invite",
                "!b:example.org": f"{ALICE} has not forgotten the room",
                "!c:example.org": "no local members",
                "!d:example.org": "unknown room",
            },
        )
