"""Reading Synapse's events for the media they reference, and its stream bounds."""

from synapse.module_api import LoggingTransaction

# One row per event: stream ordering, event id, room id, type, event JSON.
EventRow = tuple[int, str, str, str, str]


def events_with_mxc_txn(txn: LoggingTransaction, after: int, upto: int) -> list[EventRow]:
    """The events in stream range (after, upto] whose JSON holds an ``mxc://`` URI.

    Why: no module API reads events by stream position; the module reads
    ``events`` and ``event_json`` (the same columns on Synapse 1.98 and
    1.163). The LIKE keeps the JSON of events without media (nearly all of
    them) in the database; the range is one scan of the stream-ordering index.
    """
    txn.execute(
        "SELECT e.stream_ordering, e.event_id, e.room_id, e.type, j.json"
        " FROM events AS e JOIN event_json AS j ON j.event_id = e.event_id"
        " WHERE e.stream_ordering > ? AND e.stream_ordering <= ?"
        " AND j.json LIKE '%mxc://%'",
        (after, upto),
    )
    return [(int(r[0]), r[1], r[2], r[3], r[4]) for r in txn.fetchall()]


def stream_bounds_txn(txn: LoggingTransaction) -> tuple[int, int]:
    """(lowest, highest) stream ordering of Synapse's events; (0, 0) on an empty server.

    Why: events back-filled over federation take negative stream orderings,
    so the lowest one is where a back-fill over every event starts.
    """
    txn.execute(
        "SELECT COALESCE(MIN(stream_ordering), 0), COALESCE(MAX(stream_ordering), 0) FROM events"
    )
    row = txn.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)
