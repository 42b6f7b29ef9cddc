"""Every route of leave and forget: Synapse's forget taken over, departures read."""

import json
import logging
from typing import TYPE_CHECKING, Any

# Why: ModuleApi.delete_room schedules Synapse's purge task under these names
# and offers no way to follow it; the sweep reads the tasks to know.
from synapse.handlers.pagination import PURGE_ROOM_ACTION_NAME
from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget._synapse.forget import ForgetCallback

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


class SynapseRoutes:
    """What the module needs to see every route of leave and forget.

    Args:
        api: The module API handed to the module by Synapse.
    """

    def __init__(self, api: ModuleApi) -> None:
        self._hs: HomeServer = api._hs
        self._api = api

    @property
    def store(self) -> Any:
        return self._hs.get_datastores().main

    def take_over_forget(self, callback: ForgetCallback) -> None:
        """Route every call of Synapse's RoomMemberHandler.forget to callback.

        callback(user_id, room_id, schedule_purge) must do what Synapse's
        forget does (refuse a member, forget, schedule Synapse's own purge).

        Why: see the section comment; handlers hold the room-member handler
        object itself, so replacing the method on that one object reaches
        every caller.
        """
        handler = self._hs.get_room_member_handler()

        async def forget(user: Any, room_id: str, do_not_schedule_purge: bool = False) -> None:
            await callback(user.to_string(), room_id, not do_not_schedule_purge)

        handler.forget = forget  # type: ignore[method-assign]

    def forget_on_leave(self) -> bool:
        """Whether Synapse's own ``forget_rooms_on_leave`` is on (ModuleApi has no config)."""
        return bool(getattr(getattr(self._hs.config, "room", None), "forget_on_leave", False))

    async def schedule_forgotten_purge(self, room_id: str) -> None:
        """Schedule Synapse's own purge as its forget does, when the room is forgotten by all.

        Why: Synapse's handler does this after its forget transaction; the
        module's forget replaces that handler method.
        """
        period = getattr(self._hs.config.server, "forgotten_room_retention_period", None)
        if period and await self.store.is_locally_forgotten_room(room_id):
            await self._hs.get_task_scheduler().schedule_task(
                PURGE_ROOM_ACTION_NAME,
                resource_id=room_id,
                timestamp=self._hs.get_clock().time_msec() + period,
            )

    @staticmethod
    def user_departing_txn(txn: LoggingTransaction, user_id: str) -> bool:
        """Whether user_id is deactivated or being parted from its rooms by deactivation."""
        txn.execute("SELECT deactivated FROM users WHERE name = ?", (user_id,))
        row = txn.fetchone()
        if row is not None and row[0]:
            return True
        txn.execute("SELECT 1 FROM users_pending_deactivation WHERE user_id = ?", (user_id,))
        return txn.fetchone() is not None

    @staticmethod
    def max_stream_ordering_txn(txn: LoggingTransaction) -> int:
        """The newest position of Synapse's events stream (0 on an empty server)."""
        txn.execute("SELECT COALESCE(MAX(stream_ordering), 0) FROM events")
        row = txn.fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def current_departure_txn(
        txn: LoggingTransaction, room_id: str, user_id: str
    ) -> tuple[int, str, str, str, str, str, int, str | None] | None:
        """The leave or ban event that is user_id's current membership of room_id, if any.

        Returns:
            A row as departures_txn returns them.
        """
        txn.execute(
            """
            SELECT e.stream_ordering, e.event_id, e.room_id, rm.user_id, rm.sender,
                rm.membership, e.origin_server_ts, ej.json
            FROM local_current_membership AS lcm
            JOIN events AS e ON e.event_id = lcm.event_id
            JOIN room_memberships AS rm ON rm.event_id = lcm.event_id
            JOIN event_json AS ej ON ej.event_id = lcm.event_id
            WHERE lcm.room_id = ? AND lcm.user_id = ? AND lcm.membership IN ('leave', 'ban')
            """,
            (room_id, user_id),
        )
        rows = _departure_rows(txn.fetchall())
        return rows[0] if rows else None

    @staticmethod
    def departures_txn(
        txn: LoggingTransaction, after: int, upto: int, server_name: str, limit: int
    ) -> list[tuple[int, str, str, str, str, str, int, str | None]]:
        """Leave and ban events of local users in the events stream range (after, upto].

        Reads a range of the events stream through its stream_ordering index,
        so the cost follows the events in the range, not the memberships.

        Returns:
            (stream_ordering, event_id, room_id, user_id, sender, membership,
            origin_server_ts, reason), in stream order, at most ``limit``.
        """
        txn.execute(
            """
            SELECT e.stream_ordering, e.event_id, e.room_id, rm.user_id, rm.sender,
                rm.membership, e.origin_server_ts, ej.json
            FROM events AS e
            JOIN room_memberships AS rm ON rm.event_id = e.event_id
            JOIN event_json AS ej ON ej.event_id = e.event_id
            WHERE e.stream_ordering > ? AND e.stream_ordering <= ?
                AND e.type = 'm.room.member' AND rm.membership IN ('leave', 'ban')
                AND rm.user_id LIKE ?
                AND NOT EXISTS (SELECT 1 FROM rejections AS r WHERE r.event_id = e.event_id)
            ORDER BY e.stream_ordering
            LIMIT ?
            """,
            (after, upto, "%:" + server_name, limit),
        )
        return _departure_rows(txn.fetchall())


def _departure_rows(fetched: Any) -> list[tuple[int, str, str, str, str, str, int, str | None]]:
    """(stream_ordering, event_id, room_id, user_id, sender, membership, ts, reason) rows,
    from rows whose last column is the event's JSON."""
    rows = []
    for pos, event_id, room_id, user_id, sender, membership, ts, event_json in fetched:
        try:
            reason = json.loads(event_json).get("content", {}).get("reason")
        except (ValueError, AttributeError):
            reason = None
        rows.append(
            (
                int(pos),
                str(event_id),
                str(room_id),
                str(user_id),
                str(sender),
                str(membership),
                int(ts),
                reason if isinstance(reason, str) else None,
            )
        )
    return rows
