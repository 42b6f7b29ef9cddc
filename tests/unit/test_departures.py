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
from matrix_leave_forget._synapse.sql import IN_LIST_MAX
from matrix_leave_forget.history.departures import (
    DepartureLookup,
    MembershipRow,
    departure_from,
)

USER = "@u:test.local"
JOINED = "!joined:test.local"
LEFT = "!left:test.local"
FORGOTTEN_EARLIER = "!earlier:test.local"
FORGOTTEN_JUST_NOW = "!justnow:test.local"


def membership_tables() -> sqlite3.Connection:
    """An in-memory database with the columns of Synapse's tables the lookups read."""
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE room_memberships (event_id TEXT, user_id TEXT, room_id TEXT,"
        " membership TEXT, forgotten INTEGER DEFAULT 0)"
    )
    conn.execute("CREATE TABLE events (event_id TEXT, stream_ordering INTEGER, outlier BOOLEAN)")
    return conn


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
        self.internals.membership_history = mock.AsyncMock(  # type: ignore[attr-defined]
            return_value=[("join", "$join", 3, True), ("leave", "$departure", 7, True)]
        )
        departure = self.successResultOf(
            defer.ensureDeferred(lookup.departure(USER, FORGOTTEN_JUST_NOW))
        )
        assert departure is not None
        self.assertEqual((departure.stream_ordering, departure.forgotten), (7, True))


def _history(*memberships: str, forgotten_until: int = 0) -> list[MembershipRow]:
    """Rows for memberships at positions 1, 2, ...; the first forgotten_until flagged."""
    return [(m, f"${i}", i, i <= forgotten_until) for i, m in enumerate(memberships, start=1)]


class DepartureFromTests(SynchronousTestCase):
    def test_departure_is_the_first_leave_or_ban_after_the_last_join(self) -> None:
        """Knocks, rescinds, invites, rejections, unbans and further bans after a
        departure do not move it; a rejoin starts a new stay."""
        cases = {
            ("join", "leave"): 2,
            ("join", "ban", "leave"): 2,  # ban, unban
            ("join", "leave", "knock", "leave"): 2,  # knock, rescind
            ("join", "leave", "invite", "leave"): 2,  # invite, reject
            ("join", "leave", "ban", "leave", "ban"): 2,
            ("join", "leave", "invite", "join", "leave"): 5,  # rejoined, left again
            ("join", "leave", "knock", "invite", "join", "ban"): 6,
        }
        for memberships, position in cases.items():
            departure = departure_from(_history(*memberships))
            assert departure is not None, memberships
            self.assertEqual(departure.stream_ordering, position, memberships)

    def test_no_departure_when_joined_or_never_joined(self) -> None:
        """A joined user, and one who was only invited or knocked, read as natively."""
        for memberships in (
            ("join",),
            ("join", "leave", "invite", "join"),
            ("invite", "leave"),
            ("knock", "leave", "invite"),
            (),
        ):
            self.assertIsNone(departure_from(_history(*memberships)), memberships)

    def test_forget_holds_until_the_next_join(self) -> None:
        """The departure's forgotten flag decides: a knock or invite after the forget
        (rows without the flag) keeps it; a rejoin starts a stay never forgotten."""
        kept = departure_from(_history("join", "leave", "knock", "leave", forgotten_until=2))
        assert kept is not None
        self.assertTrue(kept.forgotten)
        lifted = departure_from(
            _history("join", "leave", "invite", "join", "leave", forgotten_until=2)
        )
        assert lifted is not None
        self.assertFalse(lifted.forgotten)


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

    def test_membership_history_in_stream_order(self) -> None:
        """HistoryInternals.membership_history returns the user's memberships in the
        room in stream order with their forgotten flags, outliers and other users
        and rooms left out."""
        conn = membership_tables()
        conn.executemany(
            "INSERT INTO room_memberships VALUES (?, ?, ?, ?, ?)",
            [
                ("$knock", USER, LEFT, "knock", 0),
                ("$join", USER, LEFT, "join", 1),
                ("$leave", USER, LEFT, "leave", 1),
                ("$oob", USER, LEFT, "leave", 0),
                ("$other", "@other:test.local", LEFT, "leave", 1),
                ("$elsewhere", USER, JOINED, "join", 0),
            ],
        )
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?)",
            [
                ("$join", 3, False),
                ("$leave", 5, False),
                ("$knock", 9, False),
                ("$oob", 11, True),
                ("$other", 4, False),
                ("$elsewhere", 1, False),
            ],
        )
        store = _Store(conn)
        api = mock.Mock()
        api._hs.get_datastores.return_value.main = store
        internals = HistoryInternals(api)
        rows = self.successResultOf(defer.ensureDeferred(internals.membership_history(USER, LEFT)))
        self.assertEqual(
            rows,
            [
                ("join", "$join", 3, True),
                ("leave", "$leave", 5, True),
                ("knock", "$knock", 9, False),
            ],
        )


class _SqliteInternals(HistoryInternals):
    """HistoryInternals on an in-memory database, with a fixed joined set."""

    def __init__(self, conn: sqlite3.Connection, joined: AbstractSet[str]) -> None:
        api = mock.Mock()
        api._hs.get_datastores.return_value.main = _Store(conn)
        super().__init__(api)
        self.joined = joined

    async def joined_rooms(self, user_id: str) -> AbstractSet[str]:
        return self.joined

    async def local_membership(self, user_id: str, room_id: str) -> tuple[str | None, str | None]:
        row = self._store.db_pool.conn.execute(
            "SELECT membership, event_id FROM local_current_membership"
            " WHERE user_id = ? AND room_id = ?",
            (user_id, room_id),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)


class BatchedDepartureTests(SynchronousTestCase):
    def database(self, rooms: int) -> tuple[sqlite3.Connection, list[str]]:
        """rooms rooms of USER with every kind of history (the pattern repeats)."""
        conn = membership_tables()
        conn.execute(
            "CREATE TABLE local_current_membership (room_id TEXT, user_id TEXT,"
            " event_id TEXT, membership TEXT)"
        )
        kinds: list[tuple[tuple[str, ...], int]] = [
            (("join", "leave"), 0),
            (("join", "leave", "knock"), 2),  # forgotten, then knocked: pending
            (("join", "leave", "invite"), 2),  # forgotten, then invited: pending
            (("join", "leave", "knock", "leave"), 2),  # knock rescinded
            (("join", "ban"), 0),
            (("join",), 0),  # joined (the cache may lag: the row says join)
            (("invite",), 0),  # never joined
            ((), 0),  # no membership at all
        ]
        position = 0
        room_ids = []
        for index in range(rooms):
            room_id = f"!r{index}:test.local"
            room_ids.append(room_id)
            memberships, forgotten_until = kinds[index % len(kinds)]
            for k, membership in enumerate(memberships, start=1):
                position += 1
                event_id = f"${index}.{k}"
                conn.execute(
                    "INSERT INTO room_memberships VALUES (?, ?, ?, ?, ?)",
                    (event_id, USER, room_id, membership, int(k <= forgotten_until)),
                )
                conn.execute("INSERT INTO events VALUES (?, ?, ?)", (event_id, position, False))
            if memberships:
                conn.execute(
                    "INSERT INTO local_current_membership VALUES (?, ?, ?, ?)",
                    (room_id, USER, f"${index}.{len(memberships)}", memberships[-1]),
                )
        return conn, room_ids

    def test_batched_departures_are_those_of_departure(self) -> None:
        """DepartureLookup.departures gives, for more rooms than one IN list holds,
        what departure() gives room by room (joined rooms, never-members and rooms
        without a membership included), in one transaction; a knock or invite after
        a forget is its pending membership, a rescinded one none."""
        conn, room_ids = self.database(IN_LIST_MAX + 37)
        internals = _SqliteInternals(conn, joined={room_ids[0], room_ids[5]})
        lookup = DepartureLookup(mock.Mock(), internals)
        pool = internals._store.db_pool
        batched = self.successResultOf(defer.ensureDeferred(lookup.departures(USER, room_ids)))
        self.assertEqual(pool.descriptions, ["leave_forget_membership_histories"])
        one_by_one = {
            room_id: self.successResultOf(defer.ensureDeferred(lookup.departure(USER, room_id)))
            for room_id in room_ids
        }
        self.assertEqual(batched, one_by_one)
        self.assertIsNone(batched[room_ids[0]])  # joined, per the cache
        left = batched[room_ids[8]]
        assert left is not None
        self.assertEqual((left.forgotten, left.pending), (False, None))
        pending = [batched[room_ids[i]] for i in (1, 2, 3)]
        self.assertEqual(
            [(d.forgotten, d.pending) for d in pending if d is not None],
            [(True, "knock"), (True, "invite"), (True, None)],
        )
        # Five of every eight kinds depart; room 0 (the first of them) is joined.
        departed = sum(1 for i in range(len(room_ids)) if i % 8 < 5) - 1
        self.assertEqual(sum(d is not None for d in batched.values()), departed)
