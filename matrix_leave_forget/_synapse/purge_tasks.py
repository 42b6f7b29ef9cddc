"""Where Synapse's purge task of each room stands (retention)."""

import logging
from collections.abc import Sequence

import attr

# Why: ModuleApi.delete_room schedules Synapse's purge task under these names
# and offers no way to follow it; the sweep reads the tasks to know.
from synapse.handlers.pagination import PURGE_ROOM_ACTION_NAME, SHUTDOWN_AND_PURGE_ROOM_ACTION_NAME
from synapse.module_api import LoggingTransaction

from matrix_leave_forget._synapse.sql import IN_LIST_MAX

logger = logging.getLogger(__name__)


# -- purge tasks (retention) ---------------------------------------------------
# Why: ModuleApi.delete_room schedules Synapse's purge task and returns nothing
# to follow it by; Synapse's TaskScheduler.get_tasks can filter by one room
# only, and scheduled_tasks has no index on resource_id, so following N rooms
# that way scans the table N times. One query through the status index reads
# the unfinished (and failed) purge tasks of every room in flight at once.

# Task states (synapse.types.TaskStatus values, the same from 1.98 to today).
TASK_ACTIVE_STATES = ("scheduled", "active")

TASK_FAILED = "failed"


@attr.s(frozen=True, auto_attribs=True)
class PurgeTaskView:
    """Where Synapse's purge of one room stands, as read in one transaction.

    Attributes:
        status: ``active`` (scheduled or running), ``failed``, or None when
            Synapse has no unfinished or failed purge task for the room.
        error: The failed task's error.
        task_ts: The task's last update (ms), to tell a failure from before a
            request from one after it.
        room_exists: Whether Synapse still has the room's row.
    """

    status: str | None
    error: str | None
    task_ts: int | None
    room_exists: bool


def purge_tasks_txn(txn: LoggingTransaction, room_ids: Sequence[str]) -> dict[str, PurgeTaskView]:
    """Synapse's purge state of each room in room_ids: two indexed queries per 500 rooms."""
    actions = (PURGE_ROOM_ACTION_NAME, SHUTDOWN_AND_PURGE_ROOM_ACTION_NAME)
    statuses = (*TASK_ACTIVE_STATES, TASK_FAILED)
    latest: dict[str, tuple[int, str, str | None]] = {}
    exists: set[str] = set()
    for start in range(0, len(room_ids), IN_LIST_MAX):
        chunk = list(room_ids[start : start + IN_LIST_MAX])
        marks = ", ".join("?" for _ in chunk)
        txn.execute(
            "SELECT resource_id, status, error, timestamp FROM scheduled_tasks "
            f"WHERE status IN (?, ?, ?) AND action IN (?, ?) AND resource_id IN ({marks})",
            (*statuses, *actions, *chunk),
        )
        for room_id, status, error, ts in txn.fetchall():
            room_id, ts = str(room_id), int(ts)
            # An unfinished task wins over an older failure of the same room.
            rank = (status != TASK_FAILED, ts)
            current = latest.get(room_id)
            if current is None or rank > (current[1] != TASK_FAILED, current[0]):
                latest[room_id] = (ts, str(status), error)
        txn.execute(f"SELECT room_id FROM rooms WHERE room_id IN ({marks})", chunk)
        exists.update(str(r[0]) for r in txn.fetchall())
    views: dict[str, PurgeTaskView] = {}
    for room_id in room_ids:
        task = latest.get(room_id)
        if task is None:
            views[room_id] = PurgeTaskView(None, None, None, room_id in exists)
            continue
        ts, status, error = task
        views[room_id] = PurgeTaskView(
            "active" if status in TASK_ACTIVE_STATES else TASK_FAILED,
            None if status in TASK_ACTIVE_STATES else (str(error) if error else None),
            ts,
            room_id in exists,
        )
    return views
