"""What a room purge leaves in Synapse's tables, and the room's footprint before it.

Why: ModuleApi.delete_room runs Synapse's own room purge, whose table lists
(``purge_room_tables_with_event_id_index`` and ``..._with_room_id_column``
in synapse/storage/databases/main/purge_events.py) miss two tables that hold
the room's event ids: ``threads`` (each thread's root and latest event) and
``current_state_delta_stream`` (the event ids of each state change). No
ModuleApi method reaches either, so the module clears them itself once
Synapse's purge is done (docs/retention.md "What a purge leaves").
"""

import inspect
from typing import Any

import attr
from synapse.module_api import LoggingTransaction, ModuleApi


@attr.s(frozen=True, auto_attribs=True)
class RoomFootprint:
    """What Synapse holds of a room just before its purge.

    Attributes:
        events: Its events (rows of ``events``).
        state_groups: Its state groups (rows of ``state_groups``).
        min_stream: The lowest stream ordering of its events (None: none):
            where its rows in the state-delta stream can start.
    """

    events: int
    state_groups: int
    min_stream: int | None


def room_footprint_txn(txn: LoggingTransaction, room_id: str) -> RoomFootprint:
    """Count the room's events and state groups (both through a room_id index)."""
    txn.execute("SELECT COUNT(*), MIN(stream_ordering) FROM events WHERE room_id = ?", (room_id,))
    row = txn.fetchone()
    events, min_stream = (int(row[0]), row[1]) if row else (0, None)
    txn.execute("SELECT COUNT(*) FROM state_groups WHERE room_id = ?", (room_id,))
    groups = txn.fetchone()
    return RoomFootprint(
        events, int(groups[0]) if groups else 0, None if min_stream is None else int(min_stream)
    )


def purge_leftovers_txn(
    txn: LoggingTransaction, room_id: str, min_stream: int | None
) -> dict[str, int]:
    """Clear the purged room's event ids from the tables Synapse's purge misses.

    ``threads`` rows go (the room has no threads any more). The state-delta
    stream's rows stay — other processes and /sync read that stream by
    position, and a row gone would be a gap — but lose their event ids: a
    row whose ``event_id`` is null already means "this state was removed",
    which is what became of it.

    Args:
        min_stream: Where the room's rows start in the stream (the footprint's
            min_stream), so that the update reads a range of the stream's
            stream_id index; None scans for the room (older Synapse has no
            room index on that table).

    Returns:
        Rows changed, by table.
    """
    txn.execute("DELETE FROM threads WHERE room_id = ?", (room_id,))
    threads = max(txn.rowcount, 0)
    where = "room_id = ? AND (event_id IS NOT NULL OR prev_event_id IS NOT NULL)"
    args: list[object] = [room_id]
    if min_stream is not None:
        where = f"stream_id >= ? AND {where}"
        args.insert(0, min_stream)
    txn.execute(
        "UPDATE current_state_delta_stream SET event_id = NULL, prev_event_id = NULL "
        f"WHERE {where}",
        args,
    )
    return {"threads": threads, "current_state_delta_stream": max(txn.rowcount, 0)}


async def purge_remaining_state_groups(api: ModuleApi, room_id: str) -> int:
    """Delete the purged room's state groups Synapse's purge left, with Synapse's own method.

    Why: up to some release after 1.98, Synapse's room purge deletes only the
    state groups its events point at (``event_to_state_groups``); a state
    group no event points at (one computed for an event that was then not
    persisted) stays, with the room id and an event id. The state tables may
    live in a database of their own, so this goes through Synapse's state
    store (``purge_room_state``, whose signature differs across versions),
    not through the module's transactions. Newer Synapse leaves none: 0.

    Returns:
        How many state groups were deleted.
    """
    state = api._hs.get_datastores().state
    groups = await state.db_pool.simple_select_onecol(
        table="state_groups",
        keyvalues={"room_id": room_id},
        retcol="id",
        desc="leave_forget_remaining_state_groups",
    )
    if not groups:
        return 0
    purge: Any = state.purge_room_state
    if len(inspect.signature(purge).parameters) >= 2:
        await purge(room_id, groups)  # Synapse 1.98: the groups to delete
    else:
        await purge(room_id)  # later: every state group of the room
    return len(groups)
