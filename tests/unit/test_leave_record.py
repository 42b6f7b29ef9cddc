"""A leave's entry written in the transaction that persists its event, in process (no Synapse).

``MembershipHandler.record_in_persist_txn`` runs inside Synapse's event-persisting
transaction (``_synapse/persist_hook.py``); here on SQLite. These tests drive the handler
with a stand-in for Synapse's leave that "persists" the event in a transaction on
an in-memory database and calls the hook in it, then commits (running the
after-commit callbacks) or rolls back. They prove which leaves are written with
their event, that the endpoint then writes no second entry, and that every way the
in-transaction write can fail still ends with exactly one entry, never half a
group. tests/integration/test_audit_routes.py checks the same on a real Synapse.
"""

import sqlite3
from collections.abc import Callable
from typing import Any

import attr
from signedjson.key import generate_signing_key, get_verify_key
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.audit.entry import verify_chain, verify_key_id
from matrix_leave_forget.audit.log import select_audit_txn
from matrix_leave_forget.config import LeaveForgetConfig
from matrix_leave_forget.membership.handler import MembershipHandler, _ServedLeave
from matrix_leave_forget.retention.store import RetentionStore
from tests.unit.db_helpers import InlineApi, Txn, World

ORIGIN = "example.org"
ROOM = "!room:example.org"
ALICE = "@alice:example.org"
BOB = "@bob:example.org"


@attr.s(auto_attribs=True)
class _User:
    user_id: str

    def to_string(self) -> str:
        return self.user_id


@attr.s(auto_attribs=True)
class _Requester:
    user: _User
    device_id: str


@attr.s(auto_attribs=True)
class _Event:
    event_id: str
    room_id: str
    sender: str
    state_key: str
    membership: str
    type: str = "m.room.member"

    @property
    def content(self) -> dict[str, Any]:
        return {"membership": self.membership}


def requester(user_id: str) -> Any:
    return _Requester(_User(user_id), "DEVICE" + user_id[1:3].upper())


class _PersistTxn(Txn):
    """A transaction that keeps its after-commit callbacks, as Synapse's does."""

    def __init__(self, world: World) -> None:
        super().__init__(world.conn.cursor(), sqlite3)
        self.after: list[Callable[[], None]] = []

    def call_after(self, fn: Callable[..., Any], *args: Any) -> None:
        self.after.append(lambda: fn(*args))


class _SynapseLeave:
    """Synapse's leave: persists ``events`` in one transaction, with the module's hook.

    ``outcome``: ``commit`` (the event is persisted, callbacks run), ``rollback``
    (the persisting transaction failed after the hook: Synapse raises).
    """

    def __init__(self, world: World, handler_ref: list[MembershipHandler]) -> None:
        self._world = world
        self._handler = handler_ref
        self.events: list[_Event] = []
        self.outcome = "commit"

    async def leave(self, requester: Any, room_id: str, txn_id: Any, content: Any) -> str:
        txn = _PersistTxn(self._world)
        txn.execute("BEGIN")
        txn.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT)")
        for event in self.events:
            txn.execute("INSERT INTO events (event_id) VALUES (?)", (event.event_id,))
        self._handler[0].record_in_persist_txn(txn, self.events)  # type: ignore[arg-type]
        if self.outcome == "rollback":
            txn.execute("ROLLBACK")
            raise RuntimeError("the event's transaction failed")
        txn.execute("COMMIT")
        for callback in txn.after:
            callback()
        # Synapse answers with the requester's own membership event.
        mine = [
            e
            for e in self.events
            if e.sender == e.state_key == requester.user.user_id and e.membership == "leave"
        ]
        return (mine or self.events)[0].event_id


class LeaveRecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()
        self.key = generate_signing_key("k")
        api = InlineApi(self.world)
        api.worker_app = None  # type: ignore[attr-defined]
        api._hs = None  # type: ignore[attr-defined]  # the forget side is not used here
        self.store = RetentionStore(api, ORIGIN, "master", self.key)  # type: ignore[arg-type]
        ref: list[MembershipHandler] = []
        self.synapse = _SynapseLeave(self.world, ref)
        self.handler = MembershipHandler(
            api,  # type: ignore[arg-type]
            LeaveForgetConfig(),
            self.synapse,  # type: ignore[arg-type]
            self.store,
            None,  # type: ignore[arg-type]
        )
        ref.append(self.handler)
        self.appends: list[str] = []
        real_append = self.store.audit.append

        async def counting_append(fields: Any) -> Any:
            self.appends.append(fields.event_id)
            return await real_append(fields)

        self.patch(self.store.audit, "append", counting_append)

    def leave(self, user_id: str, *events: _Event, reason: str | None = None) -> Any:
        """The handler's leave for user_id, Synapse persisting ``events``; its result."""
        self.synapse.events = list(events)
        d = defer.ensureDeferred(self.handler.leave(requester(user_id), ROOM, reason))
        results: list[Any] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1, "the leave did not finish at once")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def entries(self) -> list[dict[str, Any]]:
        return select_audit_txn(self.world.conn.cursor(), limit=None)

    def assert_chain_ok(self) -> None:
        keys = {verify_key_id(self.key): get_verify_key(self.key)}
        result = verify_chain(self.entries(), ORIGIN, keys)
        self.assertTrue(result.ok, result.problem)

    def test_served_leave_is_written_with_its_event(self) -> None:
        """The served leave's entry (device, via api, reason) is in the event's
        transaction, and the endpoint appends no entry of its own."""
        self.leave(BOB, _Event("$bob", ROOM, BOB, BOB, "leave"), reason="bye")
        (entry,) = self.entries()
        self.assertEqual(
            (entry["user_id"], entry["device_id"], entry["via"], entry["event_id"]),
            (BOB, "DEVICEBO", "api", "$bob"),
        )
        self.assertEqual(entry["reason"], "bye")
        self.assertEqual(self.appends, [])
        self.assert_chain_ok()

    def test_other_events_are_not_written(self) -> None:
        """Events in the batch that are not the served leave (another user's
        leave, a kick of the requester, a join) get no entry from the hook; the
        endpoint records its leave itself when no event in the batch was it."""
        self.leave(
            BOB,
            _Event("$kick", ROOM, ALICE, BOB, "leave"),
            _Event("$alice", ROOM, ALICE, ALICE, "leave"),
            _Event("$join", ROOM, BOB, BOB, "join"),
        )
        self.assertEqual([e["event_id"] for e in self.entries()], ["$kick"])
        self.assertEqual(self.appends, ["$kick"])  # returned as the leave's event id

    def test_failed_write_is_recorded_apart(self) -> None:
        """If the entry cannot be written in the event's transaction, nothing of
        it stays there and the endpoint records the leave on its own: one entry."""

        real = self.store.audit.append_many_txn

        def broken(txn: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(txn, _PersistTxn):
                raise RuntimeError("disk full")
            return real(txn, *args, **kwargs)

        self.patch(self.store.audit, "append_many_txn", broken)
        self.leave(BOB, _Event("$bob", ROOM, BOB, BOB, "leave"))
        self.assertEqual(self.appends, ["$bob"])
        self.assertEqual([e["event_id"] for e in self.entries()], ["$bob"])
        self.assert_chain_ok()

    def test_half_written_group_is_rolled_back(self) -> None:
        """A group whose insert fails part-way leaves no row in the event's
        transaction (savepoint), so the chain never ends on an unsigned entry."""
        real = self.store.audit.append_many_txn

        def half(txn: Any, many: Any, **kwargs: Any) -> Any:
            if not isinstance(txn, _PersistTxn):
                return real(txn, many, **kwargs)
            real(txn, many[:1], **kwargs)  # type: ignore[arg-type]
            raise RuntimeError("second insert failed")

        self.patch(self.store.audit, "append_many_txn", half)
        self.leave(BOB, _Event("$bob", ROOM, BOB, BOB, "leave"))
        self.assertEqual(self.appends, ["$bob"])
        # Only the entry written apart: the half-written group was rolled back.
        self.assertEqual([e["event_id"] for e in self.entries()], ["$bob"])
        self.assert_chain_ok()

    def test_rolled_back_event_transaction_leaves_no_claim(self) -> None:
        """When Synapse's transaction fails after the hook, the entry goes with
        it and the served leave is not marked written (its after-commit
        callback never runs)."""
        self.synapse.outcome = "rollback"
        with self.assertRaises(RuntimeError):
            self.leave(BOB, _Event("$bob", ROOM, BOB, BOB, "leave"))
        self.assertEqual(self.entries(), [])

    def test_two_requests_for_one_leave_are_left_to_the_endpoint(self) -> None:
        """While two requests serve one user's leave of a room, the hook cannot
        tell whose event it is and writes nothing."""
        first = self.handler._serving.setdefault((BOB, ROOM), [])
        first.append(object())  # type: ignore[arg-type]
        first.append(object())  # type: ignore[arg-type]
        txn = _PersistTxn(self.world)
        leave = _Event("$bob", ROOM, BOB, BOB, "leave")
        self.handler.record_in_persist_txn(txn, [leave])  # type: ignore[arg-type]
        self.assertEqual((self.entries(), txn.after), ([], []))

    def test_batch_of_served_leaves_is_one_sealed_group(self) -> None:
        """Two served leaves persisted in one batch get one entry each, in a
        chain that verifies (the group's last entry signed)."""
        self.handler._serving[(ALICE, ROOM)] = []
        alice_served = self.handler._serving[(ALICE, ROOM)]
        alice_served.append(_ServedLeave(requester(ALICE), None))
        self.leave(
            BOB,
            _Event("$alice", ROOM, ALICE, ALICE, "leave"),
            _Event("$bob", ROOM, BOB, BOB, "leave"),
        )
        self.assertEqual([e["event_id"] for e in self.entries()], ["$alice", "$bob"])
        self.assertEqual(alice_served[0].recorded_event_id, "$alice")
        self.assert_chain_ok()

    def test_stale_head_collides_and_is_recorded_apart(self) -> None:
        """A head read from a stale snapshot (PostgreSQL, another writer appended
        since the event's transaction began) makes the entry's seq collide with
        that writer's: the savepoint undoes it, the leave is recorded apart, and
        the chain does not fork."""
        self.leave(ALICE, _Event("$alice", ROOM, ALICE, ALICE, "leave"))
        (first,) = self.entries()
        real_head = self.store.audit.read_head_txn
        stale = (first["seq"] - 1, first["prev_hash"])

        def stale_in_event_txn(txn: Any) -> tuple[int, str]:
            return stale if isinstance(txn, _PersistTxn) else real_head(txn)

        self.patch(self.store.audit, "read_head_txn", stale_in_event_txn)
        self.leave(BOB, _Event("$bob", ROOM, BOB, BOB, "leave"))
        self.assertEqual(self.appends, ["$bob"])
        self.assertEqual([e["event_id"] for e in self.entries()], ["$alice", "$bob"])
        self.assert_chain_ok()

    def test_postgres_writes_only_a_lone_leave(self) -> None:
        """On PostgreSQL the entry is written with its event only while this
        process serves no other leave (the chain's lock cannot be taken in the
        event's transaction); with two leaves in flight nothing is written."""

        class _Psycopg:
            __name__ = "psycopg2"
            Error = Exception

        txn = _PersistTxn(self.world)
        txn.database_engine.module = _Psycopg()
        self.handler._serving[(ALICE, ROOM)] = [_ServedLeave(requester(ALICE), None)]
        self.handler._serving[(BOB, ROOM)] = [_ServedLeave(requester(BOB), None)]
        leave = _Event("$bob", ROOM, BOB, BOB, "leave")
        self.handler.record_in_persist_txn(txn, [leave])  # type: ignore[arg-type]
        self.assertEqual((txn.statements, txn.after), ([], []))
