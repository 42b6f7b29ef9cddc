"""Being told of every new event without running in the logcontext of its request."""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import ModuleApi

from matrix_leave_forget._synapse.contexts import current_route, run_in_background_process

logger = logging.getLogger(__name__)

# (method and path of the request, background process) that created an event:
# see contexts.current_route.
Route = tuple[str | None, str | None]


def observe_new_events(api: ModuleApi, observer: Callable[[Any, Route], Awaitable[None]]) -> None:
    """Call ``observer(event, route)`` for every event this process persists or hears of.

    The route is taken when Synapse announces the event, in the logcontext of
    the request or background process that created it; the observer then runs
    in a background process of its own.

    Why: ``register_third_party_rules_callbacks(on_new_event=...)`` makes
    Synapse load the event and the room's whole current state for every event
    on the server, in the logcontext of the request that sent it, from a task
    (``run_in_background`` in ``EventCreationHandler``) that outlives the
    request: Synapse logs "Re-starting finished log context POST-n" / "Called
    stop on logcontext POST-n without recording a start rusage" by the dozen
    per request and charges the lookups to a request already logged (a module
    whose callback does nothing does the same, on 1.98 and 1.163). Wrapping the
    dispatcher Synapse calls keeps other modules' callbacks as they are, skips
    the state load the module never used, and runs our lookups in our own
    logcontext.
    """
    rules: Any = api._hs.get_module_api_callbacks().third_party_event_rules
    store = api._hs.get_datastores().main
    dispatch = rules.on_new_event

    async def observe(event_id: str, route: Route) -> None:
        event = await store.get_event(event_id, allow_none=True)
        if event is not None:
            await observer(event, route)

    async def on_new_event(event_id: str) -> None:
        route = current_route()
        run_in_background_process(api, "leave_forget_new_event", lambda: observe(event_id, route))
        await dispatch(event_id)

    rules.on_new_event = on_new_event
