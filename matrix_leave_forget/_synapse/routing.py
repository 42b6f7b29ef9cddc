"""Which servlet Synapse routes a client request to: the history guard's classification.

The history guard must hold back the answer of every request Synapse serves with
a guarded servlet, however the path is spelt. A second, hand-written copy of
Synapse's path patterns would drift from them (a pattern's ``.`` matches any
character; new version prefixes appear), so the guard takes Synapse's own
routing decision instead.
"""

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Called with the request, the servlet's class name and the path's named groups
# (percent-decoded, as Synapse hands them to the servlet).
OnRouted = Callable[[Any, str, dict[str, str]], None]

_HOOKED = "_matrix_leave_forget_routed"


def json_resource(resource: Any) -> Any | None:
    """The JsonResource under resource (gzip wrappers unwrapped), or None if there is none."""
    for _ in range(4):
        if hasattr(resource, "_get_handler_for_request") and hasattr(resource, "_routes"):
            return resource
        # Twisted's EncodingResourceWrapper (Synapse's gz_wrap) proxies the original.
        resource = getattr(resource, "original", None)
        if resource is None:
            return None
    return None


def watch_routing(resource: Any, on_routed: OnRouted) -> bool:
    """Call on_routed for every request resource's JsonResource routes to a servlet.

    on_routed runs synchronously, after Synapse chose the servlet and before the
    servlet runs, so it can still hold back what the servlet writes. Hooking the
    same resource again replaces the callback.

    Returns:
        False if resource is not a JsonResource this Synapse routes as expected.

    Why: ModuleApi has no view of the client API's routing. Synapse decides which
    servlet answers a request in ``JsonResource._get_handler_for_request``
    (the first of the servlets' ``PATTERNS``, every version prefix, that matches
    the raw path; HEAD as GET); wrapping that method on the listener's own
    client resource makes the guard's classification that decision itself, at
    no cost beyond one call per request. Same signature on Synapse 1.98 and 1.163.
    """
    target = json_resource(resource)
    if target is None:
        return False
    hooked = target.__dict__.get(_HOOKED)
    if hooked is not None:
        hooked[0] = on_routed
        return True
    original = target._get_handler_for_request
    current: list[OnRouted] = [on_routed]

    def get_handler_for_request(request: Any) -> Any:
        found = original(request)
        try:
            _callback, servlet_classname, groups = found
        except (TypeError, ValueError):
            logger.error("Unexpected routing result from Synapse: %r", type(found))
            raise
        current[0](request, servlet_classname, groups)
        return found

    # Why: Synapse's routing decision is only taken here (a private method of
    # JsonResource, same signature on 1.98 and 1.163); wrapping it on this one
    # resource instance classifies exactly the requests Synapse serves.
    target._get_handler_for_request = get_handler_for_request
    target.__dict__[_HOOKED] = current
    return True
