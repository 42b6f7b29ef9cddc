"""Every route of leave and forget besides the module's own endpoints.

Synapse leaves and forgets on many routes: the state API, /kick, bans by
other members (local or remote), account deactivation, the admin room
deletion, its own ``forget_rooms_on_leave``. This observer records each of
them in the audit log, saying how (``via``) and who acted (``actor``):

* departures from every new event (``_synapse.new_events``, on the process
  that runs background tasks, which every event reaches);
* forgets through Synapse's forget, which the module takes over
  (``_synapse.SynapseRoutes.take_over_forget``) so that each is written with
  its entry and retention state in one transaction (``MembershipHandler.forget_as``);
* the admin behind a room deletion or a deactivation from the
  ``check_can_shutdown_room`` and ``on_user_deactivation_status_changed``
  callbacks.

The vocabulary of ``via`` is documented in docs/audit.md "Routes".
"""

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import ModuleApi

from matrix_leave_forget._synapse.contexts import (
    current_requester,
    current_route,
    in_room_forgetter,
    in_user_parter,
)
from matrix_leave_forget._synapse.new_events import Route
from matrix_leave_forget._synapse.routes import SynapseRoutes
from matrix_leave_forget.audit.entry import (
    VIA_ADMIN_ROOM_DELETE,
    VIA_BAN,
    VIA_CLIENT,
    VIA_DEACTIVATION,
    VIA_FORGET_ON_LEAVE,
    VIA_KICK,
    VIA_STATE_API,
)
from matrix_leave_forget.audit.log import AuditFields
from matrix_leave_forget.membership.handler import MembershipHandler
from matrix_leave_forget.retention.store import DepartureEvent, RetentionStore
from matrix_leave_forget.timestamps import now_ms

logger = logging.getLogger(__name__)

# Memberships that end a local user's presence in a room.
DEPARTURES = frozenset({"leave", "ban"})

# How long a self-leave whose route this process cannot see (it was served by
# another worker) waits for that worker to record it before it is recorded
# here as ``client``.
UNSEEN_ROUTE_GRACE_MS = 5_000
# How long an admin's room deletion names them as the actor of its leaves.
SHUTDOWN_ACTOR_MS = 60 * 60 * 1000

_STATE_API = re.compile(r"/rooms/[^/]+/state/m\.room\.member/")
_KICK = re.compile(r"/rooms/[^/]+/kick(/|$|\?)")


def departure_fields(departure: DepartureEvent, via: str, actor: str | None) -> AuditFields:
    """The audit entry of a departure read from Synapse's events."""
    return AuditFields(
        action="leave",
        outcome="ok",
        user_id=departure.user_id,
        room_id=departure.room_id,
        reason=departure.reason,
        event_id=departure.event_id,
        via=via,
        actor=actor,
        event_ts=departure.origin_server_ts,
    )


def departure_from_row(row: tuple[int, str, str, str, str, str, int, str | None]) -> DepartureEvent:
    """A departure from a row of SynapseRoutes.departures_txn."""
    return DepartureEvent(
        stream_ordering=row[0],
        event_id=row[1],
        room_id=row[2],
        user_id=row[3],
        sender=row[4],
        membership=row[5],
        origin_server_ts=row[6],
        reason=row[7],
    )


def _reason(content: Any) -> str | None:
    reason = content.get("reason") if hasattr(content, "get") else None
    return reason if isinstance(reason, str) else None


class RouteObserver:
    """Records departures and forgets that did not come through the module's endpoints.

    Args:
        api: The module API.
        handler: Performs forgets (atomically with their entries) and knows
            which leaves this process's endpoint is serving.
        store: The retention store.
        ready: Resolves once the module's tables are in place (Synapse may
            forget, e.g. for a deactivation, right after start-up).
    """

    def __init__(
        self,
        api: ModuleApi,
        handler: MembershipHandler,
        store: RetentionStore,
        ready: Callable[[], Awaitable[None]],
    ) -> None:
        self._api = api
        self._ready = ready
        self._handler = handler
        self._store = store
        # Rooms an admin is deleting on this process: room_id -> (admin, since).
        self._shutdowns: dict[str, tuple[str, int]] = {}
        # Users an admin deactivated on this process: user_id -> admin.
        self._deactivated_by: dict[str, str] = {}

    async def synapse_forget(self, user_id: str, room_id: str, schedule_purge: bool) -> None:
        """Synapse's own forget, from any of its routes (SynapseRoutes.take_over_forget)."""
        await self._ready()
        _, process = current_route()
        via, actor = VIA_CLIENT, None
        shutdown = self._shutdown_actor(room_id)
        if shutdown is not None:
            via, actor = VIA_ADMIN_ROOM_DELETE, shutdown
        elif in_room_forgetter(process):
            via = VIA_FORGET_ON_LEAVE
        elif in_user_parter(process) or await self._is_departing(user_id):
            via, actor = VIA_DEACTIVATION, self._deactivated_by.get(user_id)
        if not self._handler.is_serving(user_id, room_id):
            await self._record_leave_before_forget(user_id, room_id, via, actor)
        await self._handler.forget_as(
            user_id, room_id, via=via, actor=actor, schedule_purge=schedule_purge
        )

    async def _record_leave_before_forget(
        self, user_id: str, room_id: str, via: str, actor: str | None
    ) -> None:
        """Make sure the leave a Synapse route forgets after is in the log first.

        Synapse forgets right after the leave it made (room deletion,
        deactivation, forget_rooms_on_leave); the room deletion may purge the
        leave's event before the events stream is read, and on Synapses
        without a safe on_new_event the stream is read only every few seconds.
        The entry is unique per event, so a leave already recorded is skipped.
        """
        row = await self._api.run_db_interaction(
            "leave_forget_current_departure",
            SynapseRoutes.current_departure_txn,
            room_id,
            user_id,
        )
        if row is None:
            return
        departure = departure_from_row(row)
        if via == VIA_FORGET_ON_LEAVE or via == VIA_CLIENT:
            via, actor = await self.stream_route(departure)
        elif departure.sender != user_id:
            via, actor = await self.stream_route(departure)
        await self._record_departure(departure, via, actor)

    async def on_new_event(self, event: Any, route: Route) -> None:
        """Record a local user's departure that did not come through the module's endpoint.

        Called (``_synapse.new_events.observe_new_events``) for every event a
        process persists or hears of, with the request or background process
        that created it; observed on the process that runs background tasks
        only, so that each event is recorded once.
        """
        if event.type != "m.room.member":
            return
        membership = event.content.get("membership")
        target = event.state_key
        if membership not in DEPARTURES or not target or not self._api.is_mine(target):
            return
        departure = DepartureEvent(
            event_id=event.event_id,
            room_id=event.room_id,
            user_id=target,
            sender=event.sender,
            membership=membership,
            origin_server_ts=int(event.origin_server_ts),
            reason=_reason(event.content),
        )
        if departure.sender != target:
            via = VIA_BAN if membership == "ban" else VIA_KICK
            await self._record_departure(departure, via, departure.sender)
            return
        if self._handler.is_serving(target, event.room_id):
            return  # the module's endpoint records it, with the device
        seen = await self._self_departure_route(target, event.room_id, route)
        if seen is not None:
            await self._record_departure(departure, *seen)
            return
        # Served by another process (a worker, through replication): if that
        # was the module's endpoint, it records the leave; give it time.
        self._api.delayed_background_call(
            UNSEEN_ROUTE_GRACE_MS,
            self._record_departure,
            departure,
            VIA_CLIENT,
            None,
            desc="leave_forget_unseen_route",
        )

    async def stream_route(self, departure: DepartureEvent) -> tuple[str, str | None]:
        """(via, actor) of a departure read from the events stream, without its request.

        Used where Synapse cannot run on_new_event safely (see
        ``_synapse.on_new_event_is_safe``): a self-leave's client route is
        then ``client``.
        """
        if departure.sender != departure.user_id:
            via = VIA_BAN if departure.membership == "ban" else VIA_KICK
            return via, departure.sender
        shutdown = self._shutdown_actor(departure.room_id)
        if shutdown is not None:
            return VIA_ADMIN_ROOM_DELETE, shutdown
        if await self._is_departing(departure.user_id):
            return VIA_DEACTIVATION, self._deactivated_by.get(departure.user_id)
        return VIA_CLIENT, None

    async def _self_departure_route(
        self, user_id: str, room_id: str, route: Route
    ) -> tuple[str, str | None] | None:
        """(via, actor) of a leave a user sent themselves, None if not visible here."""
        shutdown = self._shutdown_actor(room_id)
        if shutdown is not None:
            return VIA_ADMIN_ROOM_DELETE, shutdown
        request, process = route
        if in_user_parter(process) or await self._is_departing(user_id):
            return VIA_DEACTIVATION, self._deactivated_by.get(user_id)
        if request is None:
            return None
        if "/_synapse/replication/" in request:
            return None  # created by a worker: the route is the worker's
        if _STATE_API.search(request):
            return VIA_STATE_API, None
        if _KICK.search(request):
            return VIA_KICK, None
        return VIA_CLIENT, None

    async def _record_departure(
        self, departure: DepartureEvent, via: str, actor: str | None
    ) -> None:
        fields = departure_fields(departure, via, actor)
        try:
            await self._store.record_departure(fields)
        except Exception:
            # The catch-up (reconcile.py) records it from the events stream.
            logger.exception(
                "Could not record %s of %s from %s",
                departure.membership,
                departure.user_id,
                departure.room_id,
            )

    async def _is_departing(self, user_id: str) -> bool:
        return await self._api.run_db_interaction(
            "leave_forget_user_departing", SynapseRoutes.user_departing_txn, user_id
        )

    def _shutdown_actor(self, room_id: str) -> str | None:
        shutdown = self._shutdowns.get(room_id)
        if shutdown is None:
            return None
        if now_ms() - shutdown[1] > SHUTDOWN_ACTOR_MS:
            del self._shutdowns[room_id]
            return None
        return shutdown[0]

    async def check_can_shutdown_room(self, user_id: str | None, room_id: str) -> bool:
        """Note an admin's room deletion (always allowed): its leaves and forgets name them."""
        if user_id is not None:
            self._shutdowns[room_id] = (user_id, now_ms())
        return True

    async def on_user_deactivation_status_changed(
        self, user_id: str, deactivated: bool, by_admin: bool
    ) -> None:
        """Note which admin deactivated a user: the parting's entries name them."""
        if deactivated and by_admin:
            admin = current_requester()
            if admin and admin != user_id:
                self._deactivated_by[user_id] = admin
        elif not deactivated:
            self._deactivated_by.pop(user_id, None)
