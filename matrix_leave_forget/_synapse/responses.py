"""Holding back Synapse's answer to a request until the module has seen it.

Why: the history guard and the forget-on-leave capability change answers that
Synapse's own servlets write, and ModuleApi has no hook on a response. Synapse
writes a JSON answer through ``request.write`` (at once, or in chunks through a
producer) and then calls ``request.finish``; nothing reaches the transport,
headers included, before ``finish``, so the status and Content-Length can still
change there. The listener's gzip encoder, if any, sits below ``write`` and
still applies.
"""

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def hold_response(request: Any, on_finish: Callable[[bytes], None]) -> None:
    """Collect what Synapse writes to request; on ``finish``, hand the body to on_finish.

    on_finish owns the answer from then on: it sends it with :func:`send_response`
    (now or later), changing the status and headers first if it must.
    """
    chunks: list[bytes] = []

    def write(data: bytes) -> None:
        chunks.append(data)

    def finish() -> None:
        # Back to the class's own methods for the real write and finish.
        del request.write
        del request.finish
        on_finish(b"".join(chunks))

    request.write = write
    request.finish = finish


def send_response(request: Any, body: bytes) -> None:
    """Write body and finish request, unless the client went away meanwhile."""
    if getattr(request, "_disconnected", False):
        return
    try:
        if body:
            request.write(body)
        request.finish()
    except RuntimeError as exc:  # the connection went away meanwhile
        logger.info("Connection closed before the response was written: %r", exc)
