"""Synapse's forget rows and cache invalidations, inside the module's transactions."""

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from synapse.module_api import LoggingTransaction

from matrix_leave_forget.db.schema import is_postgres
from matrix_leave_forget.db.statements import StatementBatch

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
    together: StatementBatch | None = None,
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
    batch = together or StatementBatch()
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


# Synapse's stream of cache invalidations for other workers (PostgreSQL only).
_CACHE_STREAM_INSERT = (
    "INSERT INTO cache_invalidation_stream_by_instance "
    "(stream_id, instance_name, cache_func, keys, invalidation_ts) VALUES (?, ?, ?, ?, ?)"
)


def _invalidate_and_stream_txn(
    store: Any,
    txn: LoggingTransaction,
    invalidations: Sequence[tuple[Any, Sequence[tuple[str, ...]]]],
    batch: StatementBatch,
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
