"""Unit tests of the departure lookups: which forgotten-rooms set an answer is checked against."""

import sqlite3
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any
from unittest import mock

from synapse.storage.databases.main.roommember import RoomMemberWorkerStore
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget._synapse.history import HistoryInternals
from matrix_leave_forget.history.departures import DepartureLookup

USER = "@u:test.local"
JOINED = "!joined:test.local"
LEFT = "!left:test.local"
FORGOTTEN_EARLIER = "!earlier:test.local"
FORGOTTEN_JUST_NOW = "!justnow:test.local"


class FakeInternals:
    """Synapse's caches, a forget behind: the database already holds FORGOTTEN_JUST_NOW."""

    def __init__(self, cached: bool = True) -> None:
        self.cached = cached
        self.database_reads = 0

    async def forgotten_rooms(self, user_id: str) -> AbstractSet[str]:
        return {FORGOTTEN_EARLIER}

    def forgotten_rooms_now(self, user_id: str) -> AbstractSet[str] | None:
        return {FORGOTTEN_EARLIER} if self.cached else None

    async def joined_rooms(self, user_id: str) -> AbstractSet[str]:
        return {JOINED}

    def joined_rooms_now(self, user_id: str) -> AbstractSet[str] | None:
        return {JOINED} if self.cached else None

    async def forgotten_rooms_from_database(self, user_id: str) -> AbstractSet[str]:
        self.database_reads += 1
        return {FORGOTTEN_EARLIER, FORGOTTEN_JUST_NOW}


class Named:
    """A named() for the lookups that counts its calls."""

    def __init__(self, *rooms: str) -> None:
        self.rooms = frozenset(rooms)
        self.calls = 0

    def __call__(self) -> AbstractSet[str]:
        self.calls += 1
        return self.rooms


class ForgottenRoomsTests(SynchronousTestCase):
    def lookup(self, forgets_elsewhere: bool, cached: bool = True) -> DepartureLookup:
        self.internals = FakeInternals(cached)
        return DepartureLookup(mock.Mock(), self.internals, forgets_elsewhere)  # type: ignore[arg-type]

    def forgotten(self, lookup: DepartureLookup, named: Callable[[], AbstractSet[str]]) -> Any:
        return self.successResultOf(defer.ensureDeferred(lookup.forgotten_rooms(USER, named)))

    def test_main_process_trusts_its_cache(self) -> None:
        """Where forgets are served, the cache is current: it answers, without looking
        at the answer's rooms or the database."""
        lookup = self.lookup(forgets_elsewhere=False)
        named = Named(FORGOTTEN_JUST_NOW)
        self.assertEqual(self.forgotten(lookup, named), {FORGOTTEN_EARLIER})
        self.assertEqual(lookup.forgotten_rooms_now(USER, named), {FORGOTTEN_EARLIER})
        self.assertEqual((named.calls, self.internals.database_reads), (0, 0))

    def test_worker_trusts_its_cache_for_rooms_it_explains(self) -> None:
        """On a worker, an answer naming only joined and already-forgotten rooms is
        checked against the cache: no database read, decided synchronously."""
        lookup = self.lookup(forgets_elsewhere=True)
        for named in (Named(), Named(JOINED), Named(JOINED, FORGOTTEN_EARLIER)):
            self.assertEqual(self.forgotten(lookup, named), {FORGOTTEN_EARLIER})
            self.assertEqual(lookup.forgotten_rooms_now(USER, named), {FORGOTTEN_EARLIER})
        self.assertEqual(self.internals.database_reads, 0)

    def test_worker_reads_the_database_for_a_room_it_cannot_explain(self) -> None:
        """On a worker, an answer naming a room the user is neither joined to nor known
        to have forgotten (it may have been forgotten a moment ago on the main
        process) is checked against the database's set; the synchronous pre-check
        declines to decide it."""
        lookup = self.lookup(forgets_elsewhere=True)
        for room in (FORGOTTEN_JUST_NOW, LEFT):
            named = Named(JOINED, room)
            self.assertIsNone(lookup.forgotten_rooms_now(USER, named))
            self.assertEqual(self.forgotten(lookup, named), {FORGOTTEN_EARLIER, FORGOTTEN_JUST_NOW})
        self.assertEqual(self.internals.database_reads, 2)

    def test_worker_pre_check_needs_both_caches(self) -> None:
        """Without the joined or forgotten set in cache the pre-check does not decide."""
        lookup = self.lookup(forgets_elsewhere=True, cached=False)
        self.assertIsNone(lookup.forgotten_rooms_now(USER, Named()))

    def test_worker_room_read_sees_a_forget_its_cache_missed(self) -> None:
        """A worker's departure lookup for a room read reports the forget the database
        holds, although the cache does not have it yet."""
        lookup = self.lookup(forgets_elsewhere=True)
        self.internals.local_membership = mock.AsyncMock(  # type: ignore[attr-defined]
            return_value=("leave", "$departure")
        )
        self.internals.stream_orderings = mock.AsyncMock(  # type: ignore[attr-defined]
            return_value={"$departure": 7}
        )
        departure = self.successResultOf(
            defer.ensureDeferred(lookup.departure(USER, FORGOTTEN_JUST_NOW))
        )
        assert departure is not None
        self.assertEqual((departure.stream_ordering, departure.forgotten), (7, True))


class _Pool:
    """Just enough of Synapse's DatabasePool to run a store function on SQLite."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.descriptions: list[str] = []

    async def runInteraction(self, desc: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        self.descriptions.append(desc)
        return func(self.conn.cursor(), *args, **kwargs)


class _Store(RoomMemberWorkerStore):
    def __init__(self, conn: sqlite3.Connection) -> None:  # no Synapse set-up
        self.db_pool = _Pool(conn)  # type: ignore[assignment]


class ForgottenRoomsFromDatabaseTests(SynchronousTestCase):
    def test_synapse_query_without_its_cache(self) -> None:
        """HistoryInternals.forgotten_rooms_from_database runs Synapse's own query under
        its @cached get_forgotten_rooms_for_user (this Synapse's, oldest and newest
        in CI): a room counts once every membership row of the user in it is
        forgotten, and the cache is never built (the store has no clock or server
        name, which building it needs)."""
        conn = sqlite3.connect(":memory:")
        conn.execute(
            "CREATE TABLE room_memberships (event_id TEXT, user_id TEXT, room_id TEXT,"
            " membership TEXT, forgotten INTEGER DEFAULT 0)"
        )
        conn.executemany(
            "INSERT INTO room_memberships VALUES (?, ?, ?, ?, ?)",
            [
                ("$1", USER, FORGOTTEN_EARLIER, "join", 1),
                ("$2", USER, FORGOTTEN_EARLIER, "leave", 1),
                ("$3", USER, LEFT, "join", 1),  # forgotten, then rejoined and left
                ("$4", USER, LEFT, "leave", 0),
                ("$5", USER, JOINED, "join", 0),
                ("$6", "@other:test.local", FORGOTTEN_JUST_NOW, "leave", 1),
            ],
        )
        store = _Store(conn)
        api = mock.Mock()
        api._hs.get_datastores.return_value.main = store
        internals = HistoryInternals(api)
        rooms = self.successResultOf(
            defer.ensureDeferred(internals.forgotten_rooms_from_database(USER))
        )
        self.assertEqual(set(rooms), {FORGOTTEN_EARLIER})
        self.assertEqual(store.db_pool.descriptions, ["get_forgotten_rooms_for_user"])  # type: ignore[attr-defined]
