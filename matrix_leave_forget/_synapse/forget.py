"""Synapse's forget rows and cache invalidations, inside the module's transactions."""

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget._synapse.sql import (
    IN_LIST_MAX,
    LIVE_MEMBERSHIPS,
    LIVE_SQL,
    StatementSink,
    is_postgres,
)

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


# -- every route: forgets, departures and the events stream -----------------
# Why: Synapse forgets rooms on several routes besides the client API
# (deactivation, admin room deletion, forget_rooms_on_leave), all through
# RoomMemberHandler.forget, and no module callback observes a forget. The
# module takes that one method over so that every forget, whatever the route,
# is written with its audit entry and retention state in one transaction, the
# way Synapse's own forget writes its rows (tests/integration/test_audit_routes.py
# checks the two against each other on the oldest and newest Synapse).

# The membership of a requester who may not forget (as Synapse's handler refuses).
FORGET_REFUSED = "User %s in room %s"


ForgetCallback = Callable[[str, str, bool], Awaitable[None]]


def forget_rows_txn(
    store: Any,
    txn: LoggingTransaction,
    pairs: Sequence[tuple[str, str]],
    together: StatementSink,
) -> None:
    """Synapse's forget of each (user_id, room_id), inside the caller's transaction.

    The same rows and the same caches as Synapse's own forget, for many
    forgets at once (a group commit's): one UPDATE per pair and table and the
    cache invalidation stream's rows, sent in one round trip with the
    caller's own statements (``together``), instead of a dozen statements each.

    Why: RoomMemberWorkerStore.forget runs its own transaction; the audit
    entry must commit or fail with it. This mirrors its transaction function
    (1.98: room_memberships; newer: also sliding_sync_membership_snapshots and
    its cache), invalidating locally after commit and on other workers
    through the cache invalidation stream, as Synapse does
    (``_invalidate_cache_and_stream_bulk`` is the bulk form of the
    ``_invalidate_cache_and_stream`` its forget calls, since 1.98).
    """
    batch = together
    args = list(pairs)
    batch.add_each(
        "UPDATE room_memberships SET forgotten = 1 WHERE user_id = ? AND room_id = ?", args
    )
    snapshots = getattr(store, "get_sliding_sync_rooms_for_user_from_membership_snapshots", None)
    if snapshots is not None:
        batch.add_each(
            "UPDATE sliding_sync_membership_snapshots SET forgotten = 1 "
            "WHERE user_id = ? AND room_id = ?",
            args,
        )
    if pairs:
        users = sorted({(user_id,) for user_id, _ in pairs})
        invalidations: list[tuple[Any, Sequence[tuple[str, ...]]]] = [
            (store.did_forget, sorted(set(args))),
            (store.get_forgotten_rooms_for_user, users),
        ]
        if snapshots is not None:
            invalidations.append((snapshots, users))
        _invalidate_and_stream_txn(store, txn, invalidations, batch)
    batch.run(txn)


class SynapseForgets:
    """Synapse's side of a forget, for the forget writer (membership/forget_writer.py).

    Args:
        api: The module API handed to the module by Synapse.
    """

    def __init__(self, api: ModuleApi) -> None:
        # Why: the forget rows are written with Synapse's main store's cache
        # and stream helpers, which ModuleApi does not expose.
        self._hs: HomeServer = api._hs

    def forget_reads_txn(
        self, txn: LoggingTransaction, pairs: Sequence[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], str], set[str]]:
        return forget_reads_txn(txn, pairs)

    def forget_rows_txn(
        self,
        txn: LoggingTransaction,
        pairs: Sequence[tuple[str, str]],
        together: StatementSink,
    ) -> None:
        forget_rows_txn(self._hs.get_datastores().main, txn, pairs, together)


# -- what a forget reads: who still has a room ------------------------------
# Why: "has every local user forgotten this room" is a question about
# Synapse's schema (local_current_membership, room_memberships.forgotten) that
# no ModuleApi answers inside a transaction. It runs inside the module's own
# transactions so that the decision and its record are atomic. A room is
# forgotten by all when no local member still has it (``remembers``):
# forget_reads_txn asks it in SQL for a forget's rooms (in one statement with
# the memberships), remembering_members_txn row by row for the rooms the sweep
# is about to purge (with who still has each, for the log).


def remembers(membership: str, forgotten: bool) -> bool:
    """Whether a local member with this current membership still has the room.

    A live membership (join, invite, knock) holds the room; any other one
    (leave, ban) holds it until the member forgets it. The SQL form is
    REMEMBERS_SQL.
    """
    return membership in LIVE_MEMBERSHIPS or not forgotten


# ``remembers`` in SQL, for local_current_membership {m} LEFT JOIN room_memberships {rm}.
REMEMBERS_SQL = f"({{m}}.membership IN ({LIVE_SQL}) OR COALESCE({{rm}}.forgotten, 0) = 0)"


def forget_reads_txn(
    txn: LoggingTransaction, pairs: Sequence[tuple[str, str]]
) -> tuple[dict[tuple[str, str], str], set[str]]:
    """What a group of forgets needs to know, in one statement per chunk.

    Args:
        pairs: The (user_id, room_id) pairs about to be forgotten.

    Returns:
        Each pair's current local membership (pairs without one are absent),
        and the rooms of those pairs that no local member *outside*
        ``pairs`` still has (``remembers``).
        Such a room is forgotten by every local user once the group's own
        forgets are written, if none of them is refused. Asking this
        before the group's writes, in the same transaction, spares a
        statement after them: the answer cannot differ, as the group's
        writes touch only its own pairs. (A room with a row in
        local_current_membership is one Synapse has: its purge deletes
        both in one transaction.)
    """
    memberships: dict[tuple[str, str], str] = {}
    unremembered: set[str] = set()
    unique = sorted(set(pairs))
    # Four arguments per pair (looked up, and left out of "someone else").
    for start in range(0, len(unique), IN_LIST_MAX // 4):
        chunk = unique[start : start + IN_LIST_MAX // 4]
        rooms = {room_id for _, room_id in chunk}
        group = [pair for pair in unique if pair[1] in rooms]
        txn.execute(
            "SELECT m.user_id, m.room_id, m.membership, "
            "NOT EXISTS (SELECT 1 FROM local_current_membership AS o "
            "LEFT JOIN room_memberships AS rm ON rm.event_id = o.event_id "
            "WHERE o.room_id = m.room_id AND NOT ("
            + " OR ".join("(o.user_id = ? AND o.room_id = ?)" for _ in group)
            + ") AND "
            + REMEMBERS_SQL.format(m="o", rm="rm")
            + ") "
            "FROM local_current_membership AS m WHERE "
            + " OR ".join("(m.user_id = ? AND m.room_id = ?)" for _ in chunk),
            [
                *(value for pair in group for value in pair),
                *(value for pair in chunk for value in pair),
            ],
        )
        for user_id, room_id, membership, no_one_else in txn:
            memberships[(str(user_id), str(room_id))] = str(membership)
            if no_one_else:
                unremembered.add(str(room_id))
    return memberships, unremembered


def remembering_members_txn(
    txn: LoggingTransaction, room_ids: Sequence[str]
) -> tuple[set[str], set[str], dict[str, tuple[str, str]]]:
    """A local member who still has each room (live memberships first), set-based.

    Returns:
        The rooms Synapse knows, the rooms with local members, and for each
        room a local member who still has it (live memberships first).
    """
    known: set[str] = set()
    with_members: set[str] = set()
    members: dict[str, tuple[str, str]] = {}
    postgres = "psycopg" in txn.database_engine.module.__name__
    for start in range(0, len(room_ids), IN_LIST_MAX):
        chunk = list(room_ids[start : start + IN_LIST_MAX])
        args: list[Any]
        if postgres:
            # A join with the unnested ids probes the indexes once per
            # room; with "= ANY(...)" PostgreSQL prefers scanning the
            # whole table (docs/benchmarks.md §3).
            source, args = "unnest(?::text[]) AS ids (room_id) JOIN", [chunk]
            where = "TRUE"
            on_ids = " ON {alias}.room_id = ids.room_id"
        else:
            source, args = "", chunk
            where = "{alias}.room_id IN (" + ", ".join("?" for _ in chunk) + ")"
            on_ids = ""
        txn.execute(
            f"SELECT r.room_id FROM {source} rooms AS r{on_ids.format(alias='r')} "
            f"WHERE {where.format(alias='r')}",
            args,
        )
        known.update(str(r[0]) for r in txn.fetchall())
        # Every local member of the chunk's rooms (these are rooms their
        # members forgot: a few rows each).
        txn.execute(
            "SELECT lcm.room_id, lcm.user_id, lcm.membership, COALESCE(rm.forgotten, 0) "
            f"FROM {source} local_current_membership AS lcm{on_ids.format(alias='lcm')} "
            "LEFT JOIN room_memberships AS rm "
            "ON rm.event_id = lcm.event_id AND rm.room_id = lcm.room_id "
            f"WHERE {where.format(alias='lcm')}",
            args,
        )
        for room_id, user_id, membership, forgotten in txn.fetchall():
            room_id = str(room_id)
            with_members.add(room_id)
            if not remembers(membership, forgotten):
                continue
            current = members.get(room_id)
            if current is None or (
                current[1] not in LIVE_MEMBERSHIPS and membership in LIVE_MEMBERSHIPS
            ):
                members[room_id] = (str(user_id), str(membership))
    return known, with_members, members


# Synapse's stream of cache invalidations for other workers (PostgreSQL only).
_CACHE_STREAM_INSERT = (
    "INSERT INTO cache_invalidation_stream_by_instance "
    "(stream_id, instance_name, cache_func, keys, invalidation_ts) VALUES (?, ?, ?, ?, ?)"
)


def _invalidate_and_stream_txn(
    store: Any,
    txn: LoggingTransaction,
    invalidations: Sequence[tuple[Any, Sequence[tuple[str, ...]]]],
    batch: StatementSink,
) -> None:
    """Synapse's ``_invalidate_cache_and_stream_bulk`` for several caches at once.

    Each key is invalidated locally after commit; on PostgreSQL each also gets
    its row in the cache invalidation stream, which other workers follow. The
    rows of every cache share one stream-id allocation and one INSERT, added
    to ``batch`` (sent with the forget's own writes).

    Why: Synapse's helper takes two round trips per cache on PostgreSQL (ids,
    then insert) and a forget invalidates three caches: six of a lone
    forget's round trips, now one. The rows, the local invalidation and the
    replication poke are what the helper writes (1.98 and newer;
    tests/integration/test_audit_routes.py compares the stream rows of a
    module forget with Synapse's own).
    """
    if not is_postgres(txn):
        for cache_func, keys in invalidations:
            store._invalidate_cache_and_stream_bulk(txn, cache_func, keys)
        return
    for cache_func, keys in invalidations:
        for key in keys:
            txn.call_after(cache_func.invalidate, key)
    rows = [(cache_func.__name__, key) for cache_func, keys in invalidations for key in keys]
    stream_ids = store._cache_id_gen.get_next_mult_txn(txn, len(rows))
    ts = store.hs.get_clock().time_msec()
    txn.call_after(store.hs.get_notifier().on_new_replication_data)
    batch.add_each(
        _CACHE_STREAM_INSERT,
        [
            # A list, which psycopg2 sends as the text[] the column is.
            (stream_id, store._instance_name, name, list(key), ts)
            for stream_id, (name, key) in zip(stream_ids, rows, strict=True)
        ],
    )
