"""MSC4267 (Matrix 1.18): ``GET /capabilities`` says whether leave forgets the room.

Synapse forgets every room a local user leaves, is kicked or banned from when
``forget_rooms_on_leave`` is on, but advertises it only under MSC4267's
unstable name and only with ``experimental_features.msc4267_enabled``. In
``mount: intercept`` every client request passes the module's ``/_matrix``
node, which hands the capabilities request here: Synapse answers as usual and
its answer gets the stable ``m.forget_forced_upon_leave`` (and the unstable
name where Synapse's own settings call for it) appended inside
``capabilities``; every other byte is Synapse's. A name Synapse already
advertises is left as Synapse wrote it.
"""

import json
import re
from typing import Any

from matrix_leave_forget._synapse.capabilities import ForgetOnLeaveSettings
from matrix_leave_forget._synapse.responses import hold_response, send_response

STABLE = "m.forget_forced_upon_leave"
UNSTABLE = "org.matrix.msc4267.forget_forced_upon_leave"

# Synapse serves /capabilities under r0, v3 and unstable; api/v1 is matched too
# so that a Synapse that adds it is covered (its 404 today passes untouched).
CAPABILITIES_PATH = re.compile(rb"^/_matrix/client/(?:api/v1|r0|v3|unstable)/capabilities$")


def with_forget_on_leave(body: bytes, settings: ForgetOnLeaveSettings) -> bytes | None:
    """Synapse's capabilities answer with the forget-on-leave capability added.

    Args:
        body: Synapse's 200 answer.
        settings: What to advertise.

    Returns:
        The new body, or None when body is to be sent unchanged (not a
        capabilities object, or every name already there).
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    capabilities = data.get("capabilities") if isinstance(data, dict) else None
    if not isinstance(capabilities, dict):
        return None
    names = (STABLE, UNSTABLE) if settings.unstable else (STABLE,)
    missing = {name: {"enabled": settings.enabled} for name in names if name not in capabilities}
    if not missing:
        return None
    members = json.dumps(missing, separators=(",", ":"))[1:-1].encode()
    # Synapse's answer is compact JSON whose one member is `capabilities`:
    # the last two bytes close that object and the answer. Appending there
    # keeps every byte Synapse wrote.
    if next(reversed(data)) == "capabilities" and body.endswith(b"}}"):
        return body[:-2] + (b"," if capabilities else b"") + members + b"}}"
    capabilities.update(missing)
    return json.dumps(data, separators=(",", ":")).encode()


class CapabilitiesRewrite:
    """Adds the forget-on-leave capability to Synapse's ``/capabilities`` answers.

    Args:
        settings: Synapse's forget-on-leave settings.
    """

    def __init__(self, settings: ForgetOnLeaveSettings) -> None:
        self._settings = settings

    def watch(self, request: Any) -> None:
        """Rewrite the answer to request when it is a capabilities request."""
        try:
            if request.method not in (b"GET", b"HEAD") or not CAPABILITIES_PATH.match(request.path):
                return
        except (AttributeError, TypeError):
            return

        def finished(body: bytes) -> None:
            if request.code == 200:
                rewritten = with_forget_on_leave(body, self._settings)
                if rewritten is not None:
                    body = rewritten
                    request.setHeader(b"Content-Length", b"%d" % (len(body),))
            send_response(request, body)

        hold_response(request, finished)
