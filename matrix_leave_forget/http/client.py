"""The HTTP side: authenticate, parse, validate, hand to the membership handler.

Two ways to reach the servlet (see docs/mounting.md):

* ``listener``: :class:`LeaveForgetServlet` is registered at
  ``/_matrix/client/{api/v1,r0,v3,unstable}/rooms`` and served by a Synapse
  listener with ``resources: []``, to which the reverse proxy routes leave and
  forget.
* ``intercept``: :class:`InterceptingMatrixResource` is registered at
  ``/_matrix``. Synapse's resource tree builder hands it the ``client``,
  ``federation``, ``key`` and ``media`` children of each listener; it routes
  POST/PUT leave and forget to the servlet and everything else to those
  children, untouched.
"""

import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Optional

from synapse.module_api import (
    DirectServeJsonResource,
    ModuleApi,
    Requester,
    SynapseRequest,
    parse_json_object_from_request,
)
from synapse.module_api.errors import Codes, SynapseError
from twisted.web.resource import IResource, Resource

from matrix_leave_forget import metrics
from matrix_leave_forget.membership.handler import MembershipHandler, client_errcode

if TYPE_CHECKING:
    from matrix_leave_forget._synapse.internals import SynapseInternals
    from matrix_leave_forget.history.guard import HistoryGuard
    from matrix_leave_forget.http.capabilities import CapabilitiesRewrite

logger = logging.getLogger(__name__)

# The versions under which Synapse serves these two endpoints (its servlets
# register with v1=True, so api/v1 and unstable too): every one is served here,
# so that no client path skips the audit.
CLIENT_VERSIONS = ("api/v1", "r0", "v3", "unstable")
ROOMS_PREFIXES = tuple(f"/_matrix/client/{v}/rooms" for v in CLIENT_VERSIONS)

LEAVE_FORGET_PATH = re.compile(
    r"^/_matrix/client/(?:api/v1|r0|v3|unstable)/rooms/(?P<room_id>[^/]*)/"
    r"(?P<action>leave|forget)(?:/(?P<txn_id>[^/]*))?$"
)


# A download or thumbnail of a medium, under every prefix Synapse serves
# media at (the legacy media API's versions and the authenticated client one);
# read by the media reaper (a read cancels a pending deletion).
MEDIA_READ_PATH = re.compile(
    r"^/_matrix/(?:media/[^/]+|client/[^/]+/media)/(?:download|thumbnail)/"
    r"(?P<origin>[^/?]+)/(?P<media_id>[^/?]+)"
)

# Called with (server name, media id) of each media read seen.
MediaReads = Callable[[str, str], None]


def media_read(request: Any) -> tuple[str, str] | None:
    """(server name, media id) of a media download or thumbnail request, else None."""
    try:
        match = MEDIA_READ_PATH.match(request.path.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if match is None:
        return None
    return urllib.parse.unquote(match["origin"]), urllib.parse.unquote(match["media_id"])


def _unquote(value: str | None) -> str | None:
    # Exactly what Synapse's JsonResource does with path groups.
    return urllib.parse.unquote(value) if value else value


def _is_served_shape(method: bytes, txn_id: str | None) -> bool:
    """POST .../leave and PUT .../leave/{txnId}: the two shapes Synapse registers."""
    return (method == b"POST" and txn_id is None) or (method == b"PUT" and txn_id is not None)


class LeaveForgetServlet(DirectServeJsonResource):
    """Serves POST /rooms/{roomId}/(leave|forget) and PUT .../{txnId}, as Synapse does.

    Args:
        api: The module API (authentication).
        handler: The membership handler that does the work.
        internals: Source of the transaction cache for PUT replays.
        ready: Resolves once the module's tables are in place.
    """

    isLeaf = True

    def __init__(
        self,
        api: ModuleApi,
        handler: MembershipHandler,
        internals: "SynapseInternals",
        ready: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__()
        self._api = api
        self._ready = ready
        self._handler = handler
        self._txns = internals.new_transaction_cache()
        self._extra_content_keys = internals.extra_leave_content_keys()

    async def _async_render(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        await self._ready()
        try:
            path = request.path.decode("ascii")
        except UnicodeDecodeError:
            raise SynapseError(404, "Unrecognized request", Codes.UNRECOGNIZED)
        match = LEAVE_FORGET_PATH.match(path)
        if match is None:
            raise SynapseError(404, "Unrecognized request", Codes.UNRECOGNIZED)
        txn_id = match.group("txn_id")
        if not _is_served_shape(request.method, txn_id):
            raise SynapseError(405, "Unrecognized request", Codes.UNRECOGNIZED)
        action = match.group("action")
        room_id = _unquote(match.group("room_id")) or ""

        started = time.monotonic()
        outcome = "error"
        try:
            requester = await self._api.get_user_by_req(request, allow_guest=action == "leave")
            if txn_id is None:
                result = await self._do(request, requester, action, room_id, None)
            else:
                result = await self._txns.fetch_or_execute_request(
                    request,
                    requester,
                    self._do,
                    request,
                    requester,
                    action,
                    room_id,
                    _unquote(txn_id),
                )
            outcome = "ok"
            return result
        except SynapseError as error:
            outcome = client_errcode(error)
            raise
        finally:
            labels = (self._api.server_name, action, outcome)
            metrics.requests_total.labels(*labels).inc()
            metrics.request_seconds.labels(*labels).observe(time.monotonic() - started)

    async def _do(
        self,
        request: SynapseRequest,
        requester: Requester,
        action: str,
        room_id: str,
        txn_id: str | None,
    ) -> tuple[int, dict[str, Any]]:
        if action == "forget":
            await self._handler.forget(requester, room_id)
            return 200, {}
        body = parse_json_object_from_request(request, allow_empty_body=True)
        reason = body.get("reason")
        # Deliberately stricter than Synapse, which copies any JSON value into
        # the event: the spec types `reason` as a string. null means absent.
        if reason is not None and not isinstance(reason, str):
            raise SynapseError(400, "'reason' must be a string", Codes.BAD_JSON)
        extra_content = {key: body[key] for key in self._extra_content_keys if key in body}
        await self._handler.leave(requester, room_id, reason, txn_id, extra_content)
        return 200, {}


class MatrixNode(Resource):
    """One listener's ``/_matrix`` node: leave and forget go to the servlet, the rest passes.

    With a history guard set (:meth:`guard_reads`), the answers to the client
    reads it guards are checked on their way out (docs/history.md).

    Args:
        servlet: The leave/forget servlet.
        unrecognized: What Synapse serves for unknown children (404 M_UNRECOGNIZED).
        children: The listener's own children of /_matrix (client, federation…).
    """

    def __init__(
        self,
        servlet: IResource,
        unrecognized: Resource,
        children: dict[bytes, IResource] | None = None,
    ) -> None:
        super().__init__()
        self._servlet = servlet
        self._unrecognized = unrecognized
        self._history_guard: HistoryGuard | None = None
        self._routing_watched = False
        self._capabilities: CapabilitiesRewrite | None = None
        self._media_reads: MediaReads | None = None
        for name, child in (children or {}).items():
            Resource.putChild(self, name, child)

    def guard_reads(self, guard: Optional["HistoryGuard"]) -> bool:
        """Check the answers to guarded client reads with guard (None: pass them untouched).

        Returns:
            False if the guard cannot see how Synapse routes this node's client
            requests (then it could not tell which answers to check).
        """
        self._history_guard = guard
        self._routing_watched = False
        return guard is None or b"client" not in self.children or self._watch_routing()

    def _watch_routing(self) -> bool:
        assert self._history_guard is not None
        self._routing_watched = self._history_guard.watch_routing(self.children[b"client"])
        return self._routing_watched

    def rewrite_capabilities(self, rewrite: Optional["CapabilitiesRewrite"]) -> None:
        """Add MSC4267's capability to /capabilities answers with rewrite (http/capabilities.py)."""
        self._capabilities = rewrite

    def watch_media_reads(self, on_read: MediaReads | None) -> None:
        """Tell on_read of every media download or thumbnail request (media/reaper.py)."""
        self._media_reads = on_read

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        if (
            self._media_reads is not None
            and path in (b"media", b"client")
            and request.method in (b"GET", b"HEAD")
        ):
            read = media_read(request)
            if read is not None:
                self._media_reads(*read)
        if path == b"client" and self._capabilities is not None:
            self._capabilities.watch(request)
        if path == b"client" and b"client" in self.children and request.method in (b"POST", b"PUT"):
            try:
                match = LEAVE_FORGET_PATH.match(request.path.decode("ascii"))
            except UnicodeDecodeError:
                match = None
            if match is not None and _is_served_shape(request.method, match.group("txn_id")):
                return self._servlet
        if (
            path == b"client"
            and self._history_guard is not None
            and not self._routing_watched
            and b"client" in self.children
        ):
            # Before install() (the shared node of the first requests) or a new child.
            self._watch_routing()
        child = self.children.get(path)
        return child if child is not None else self._unrecognized

    def render(self, request: Any) -> Any:
        return self._unrecognized.render(request)  # type: ignore[no-untyped-call]


class InterceptingMatrixResource(MatrixNode):
    """The resource registered at ``/_matrix`` in ``intercept`` mode.

    Synapse attaches this one object to every listener, handing it each
    listener's ``/_matrix`` children in turn. Serving the union would expose,
    say, the client API on a federation-only listener, so children are kept in
    one batch per listener (a batch closes when the listener's root adopts this
    resource, which Twisted signals by setting ``server``), and
    :meth:`install` gives each listener a :class:`MatrixNode` of its own.
    """

    def __init__(self, servlet: IResource, unrecognized: Resource) -> None:
        self._server: Any = None
        self._batches: list[dict[bytes, IResource]] = []
        self._pending: dict[bytes, IResource] = {}
        super().__init__(servlet, unrecognized)

    def putChild(self, path: bytes, child: IResource) -> None:
        self._pending[path] = child
        super().putChild(path, child)

    @property
    def server(self) -> Any:
        return self._server

    @server.setter
    def server(self, value: Any) -> None:
        # Twisted's Resource.putChild sets child.server right after a parent
        # adopts a child: here, a listener's root adopting /_matrix.
        self._server = value
        self._batches.append(self._pending)
        self._pending = {}

    def install(self, roots: list[Resource]) -> list[str]:
        """Give each listener root that adopted this resource its own MatrixNode.

        Args:
            roots: Each listener's root resource, in the order Synapse built them.

        Returns:
            Problems that mean interception is not what it should be.
        """
        adopters = [root for root in roots if root.children.get(b"_matrix") is self]
        problems: list[str] = []
        if self._pending:
            names = ", ".join(sorted(n.decode() for n in self._pending))
            problems.append(
                f"resources registered under /_matrix after matrix_leave_forget ({names}): "
                "list the modules that register them before matrix_leave_forget"
            )
        if len(adopters) != len(self._batches):
            problems.append(
                f"{len(adopters)} listeners adopted /_matrix but {len(self._batches)} "
                "child batches were seen: this Synapse builds its resource tree differently"
            )
            return problems
        for root, batch in zip(adopters, self._batches, strict=True):
            root.putChild(b"_matrix", MatrixNode(self._servlet, self._unrecognized, batch))
        return problems
