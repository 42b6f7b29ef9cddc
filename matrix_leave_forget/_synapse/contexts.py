"""Synapse's logcontexts and background processes: what runs where, for whom."""

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

# Why: the audit log's group commit wakes callers that wait in other requests'
# logcontexts; Synapse's rules say to fire their deferreds in the sentinel
# context, and ModuleApi exposes no way to enter it.
from synapse.logging.context import PreserveLoggingContext, run_in_background
from synapse.module_api import ModuleApi
from twisted.internet import defer

if TYPE_CHECKING:
    from typing_extensions import LiteralString

logger = logging.getLogger(__name__)


def run_in_background_process(
    api: ModuleApi, desc: "LiteralString", func: Callable[[], Awaitable[None]]
) -> None:
    """Start func as a Synapse background process (its own logcontext and metrics).

    Why: ModuleApi.run_as_background_process is newer than the oldest supported
    Synapse, where only the module-level function exists (newer Synapses log a
    deprecation warning on every call of that one).
    """
    method = getattr(api, "run_as_background_process", None)
    if method is not None:
        method(desc, func)
    else:  # pragma: no cover - Synapse before ModuleApi.run_as_background_process
        from synapse.module_api import run_as_background_process

        run_as_background_process(desc, func)


def wake(deferreds: "list[defer.Deferred[None]]") -> None:
    """Fire deferreds that other logcontexts wait on (through make_deferred_yieldable)."""
    with PreserveLoggingContext():
        for deferred in deferreds:
            deferred.callback(None)


def run_in_request_context(request: Any, func: Callable[[], Awaitable[None]]) -> None:
    """Run func in request's logging context, as the code that handles request does.

    Why: the history guard releases a response from ``request.finish``, which
    Synapse may call from the reactor (its byte producer) outside the request's
    logcontext; database lookups must run inside one, and ModuleApi exposes
    neither the request's logcontext nor a way to enter it.
    """
    context = getattr(request, "logcontext", None)
    if context is None:
        run_in_background(func)
        return
    with PreserveLoggingContext(context):
        run_in_background(func)


# Synapse's background process that forgets rooms on leave (forget_rooms_on_leave).
_ROOM_FORGETTER_PROCESS = "room_forgetter"

# Synapse's background process that parts deactivated users.
_USER_PARTER_PROCESS = "user_parter_loop"


def current_route() -> tuple[str | None, str | None]:
    """(method, path) of the client request this code runs for, and the background process.

    Returns:
        ``(request, None)`` with ``request`` as ``"PUT /_matrix/client/..."`` when
        running for an HTTP request, ``(None, name)`` in a background process,
        ``(None, None)`` when neither is known.

    Why: Synapse notifies modules of a new event (on_new_event) in the
    logcontext of the request or background process that created it, and the
    module API gives no other way to tell a state-API leave from a self-kick,
    or Synapse's own forget-on-leave from a client's forget.
    """
    from synapse.logging.context import current_context

    context: Any = current_context()
    request = getattr(context, "request", None)
    if request is not None:
        return f"{request.method} {request.url}", None
    name = getattr(context, "name", None)
    return None, str(name) if name else None


def current_requester() -> str | None:
    """The user id that authenticated the request this code runs for, if any.

    Why: on_user_deactivation_status_changed says an admin deactivated the
    user, not which admin; the request's logcontext knows.
    """
    from synapse.logging.context import current_context

    request = getattr(current_context(), "request", None)
    requester = getattr(request, "requester", None)
    return str(requester) if requester else None


def on_new_event_is_safe() -> bool:
    """Whether this Synapse can run an on_new_event callback without breaking remote joins.

    Why: from Synapse 1.76 to 1.102, registering any on_new_event callback
    deadlocks every join of a remote room: the callback's state lookup waits
    for the full state of the partial-state room being joined
    (element-hq/synapse#16973, fixed in 1.103). The module then reads
    departures from the events stream instead (membership/reconcile.py).
    """
    from synapse import __version__

    match = re.match(r"(\d+)\.(\d+)", __version__)
    return match is None or (int(match.group(1)), int(match.group(2))) >= (1, 103)


def in_background_process(name: str | None, process: str) -> bool:
    return name is not None and name.startswith(process)


def in_room_forgetter(name: str | None) -> bool:
    return in_background_process(name, _ROOM_FORGETTER_PROCESS)


def in_user_parter(name: str | None) -> bool:
    return in_background_process(name, _USER_PARTER_PROCESS)
