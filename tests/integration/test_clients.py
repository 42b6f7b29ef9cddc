"""Real Matrix client libraries against the module: matrix-nio and mautrix.

Each library is used as an application would use it, unchanged: it logs in,
creates a room, syncs, leaves (with and without a reason) and forgets through
its own API (nio ``AsyncClient.room_leave`` / ``room_forget``, mautrix
``ClientAPI.leave_room`` / ``forget_room``), and the tests check what the
library makes of the module's answers: its success types, the errors it
surfaces, and what its /sync then shows. The server side is checked
independently (admin API state, the module's audit log), so a test only passes
if the module really served the call.

Both mount modes:

* ``intercept``: the clients talk straight to Synapse's client listener.
* ``listener``: the clients talk to a small routing proxy started by the test
  (:class:`RoutingProxy`), which forwards leave and forget to the module's
  ``resources: []`` listener and everything else to the client listener, as
  the nginx rule in docs/mounting.md does. The proxy records what it forwarded,
  which also shows the exact bytes each library sends.

The libraries are asyncio code: each test body runs under ``asyncio.run`` in a
synchronous trial test; Twisted's reactor is not involved.
"""

import asyncio
import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import (
    TYPE_CHECKING,
    Any,
)

import aiohttp
import attr
import nio
import yarl
from aiohttp import web
from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError, MForbidden, MUnknown
from mautrix.types import Filter, RoomFilter, RoomID, SyncToken, UserID

from tests.integration.base import SynapseTestCase, password, unique
from tests.support.harness import User

# The route from docs/mounting.md: these go to the module's listener.
MODULE_ROUTE = re.compile(
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/[^/]+/(leave|forget)(/[^/]+)?$"
)
ADMIN_AUDIT = "/_synapse/client/leave_forget/v1/admin/audit"
INCLUDE_LEAVE = {"room": {"include_leave": True}}
# Room ids of room versions before 12 end in ":server" (a colon in the path
# segment); Synapse 1.163's default version 12 has none. Some tests use both.
CLASSIC_ROOM_VERSION = "10"

# Headers that describe one hop, not the request (RFC 9110 section 7.6.1), and
# the framing headers aiohttp recomputes for the forwarded body.
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
    )
)

# Generous: each test does a few dozen local requests.
TEST_TIMEOUT = 120.0

# -- the routing proxy ------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class Forwarded:
    """One request the proxy forwarded, as it received it, and the answer."""

    method: str
    raw_path: str  # path and query exactly as the client sent them
    headers: dict[str, str]
    body: bytes
    upstream: str  # "module" or "client"
    status: int
    response: bytes

    @property
    def path(self) -> str:
        return self.raw_path.split("?", 1)[0]


class RoutingProxy:
    """A minimal reverse proxy on 127.0.0.1 that routes like docs/mounting.md.

    Requests whose raw path matches :data:`MODULE_ROUTE` go to the module's
    listener, all others to Synapse's client listener. Method, raw path
    (percent-encoding untouched), query, headers and body are forwarded as
    received; ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are added, as nginx
    does. Runs on the caller's asyncio loop.
    """

    def __init__(self, client_port: int, module_port: int) -> None:
        self._ports = {"client": client_port, "module": module_port}
        self.log: list[Forwarded] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        # Pass bodies and headers through as they are: no decompression, and
        # none of the headers aiohttp would otherwise add on its own.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=TEST_TIMEOUT),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        raw_path = request.raw_path
        upstream = "module" if MODULE_ROUTE.match(raw_path.split("?", 1)[0]) else "client"
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        peer = request.remote or "127.0.0.1"
        headers += [("X-Forwarded-For", peer), ("X-Forwarded-Proto", "http")]
        url = yarl.URL(f"http://127.0.0.1:{self._ports[upstream]}{raw_path}", encoded=True)
        async with self._session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as resp:
            answer = await resp.read()
            out_headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS]
            status = resp.status
        self.log.append(
            Forwarded(
                request.method, raw_path, dict(request.headers), body, upstream, status, answer
            )
        )
        response = web.Response(status=status, body=answer)
        for key, value in out_headers:
            response.headers.add(key, value)
        return response

    def leave_forget_calls(self) -> list[Forwarded]:
        return [f for f in self.log if MODULE_ROUTE.match(f.path)]


# -- the tests --------------------------------------------------------------


if TYPE_CHECKING:
    _MixinBase = SynapseTestCase
else:
    _MixinBase = object


class ClientScenarios(_MixinBase):
    """Scenarios run in both mount modes; mixed into a SynapseTestCase below."""

    # -- plumbing --------------------------------------------------------

    def run_async(self, body: Callable[[str, RoutingProxy | None], Awaitable[None]]) -> None:
        """Run ``body(base_url, proxy)`` on a fresh asyncio loop, with a deadline.

        The harness's blocking HTTP helpers (admin API, audit, joins by other
        users) may be called inside ``body``: they stall the loop, proxy
        included, but go straight to Synapse's ports, never through the proxy.
        """

        async def main() -> None:
            async with self.homeserver_url() as (url, proxy):
                await asyncio.wait_for(body(url, proxy), TEST_TIMEOUT)

        asyncio.run(main())

    @asynccontextmanager
    async def homeserver_url(self) -> AsyncIterator[tuple[str, RoutingProxy | None]]:
        """The URL clients are given: the client listener, or the routing proxy."""
        if self.MODE == "intercept":
            yield f"http://127.0.0.1:{self.hs.client_port}", None
            return
        proxy = RoutingProxy(self.hs.client_port, self.hs.module_port)
        await proxy.start()
        try:
            yield proxy.url, proxy
        finally:
            await proxy.close()

    def audit(self, admin: User, user_id: str) -> list[dict[str, Any]]:
        """The module's audit entries for user_id, oldest first."""
        resp = self.hs.client(
            "GET",
            f"{ADMIN_AUDIT}?user_id={urllib.parse.quote(user_id)}",
            token=admin.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        return list(resp.body["entries"])

    def member_content(self, admin: User, room_id: str, user_id: str) -> dict[str, Any]:
        """The content of user_id's current m.room.member event (admin API)."""
        event = self.hs.member_event(admin, room_id, user_id)
        assert event is not None, (room_id, user_id)
        return dict(event["content"])

    def assert_routed(
        self,
        proxy: RoutingProxy | None,
        expected: list[tuple[str, int]],
        via_client: tuple[str, ...] = ("/login", "/createRoom"),
    ) -> None:
        """Listener mode: leave/forget, and only they, went to the module's listener.

        ``expected`` lists (action, status) for the leave/forget calls the test
        made, in order; ``via_client`` endpoints the client also called, which
        must have gone to the client listener.
        """
        if proxy is None:
            return
        calls = proxy.leave_forget_calls()
        self.assertEqual(
            [(MODULE_ROUTE.match(c.path).group(2), c.status) for c in calls],  # type: ignore[union-attr]
            expected,
        )
        self.assertEqual({c.upstream for c in calls}, {"module"})
        others = [f for f in proxy.log if f not in calls]
        self.assertEqual({f.upstream for f in others}, {"client"})
        # The rest of the client's traffic did go through the proxy.
        paths = " ".join(f.path for f in others)
        for endpoint in via_client:
            self.assertIn(endpoint, paths)

    # -- nio -------------------------------------------------------------

    async def nio_login(self, url: str, user: User) -> nio.AsyncClient:
        client = nio.AsyncClient(url, user.user_id)
        resp = await client.login(password(user), device_name="nio test")
        self.assertIsInstance(resp, nio.LoginResponse, resp)
        return client

    async def nio_create_room(
        self, client: nio.AsyncClient, other: User, room_version: str | None = None
    ) -> str:
        """A room created by the nio client, which ``other`` joins too.

        With another local member in it, the server stays in the room after the
        client leaves, so the room's state stays readable through the admin API.
        """
        resp = await client.room_create(name="nio room", room_version=room_version)
        self.assertIsInstance(resp, nio.RoomCreateResponse, resp)
        room_id = str(resp.room_id)
        invited = await client.room_invite(room_id, other.user_id)
        self.assertIsInstance(invited, nio.RoomInviteResponse, invited)
        self.assertEqual(self.hs.membership(other, room_id, "join").status, 200)
        return room_id

    async def nio_sync_until(
        self, client: nio.AsyncClient, section: str, room_id: str
    ) -> nio.SyncResponse:
        """Incremental syncs (long-polling) until room_id shows in rooms.<section>."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            resp = await client.sync(timeout=5000)
            self.assertIsInstance(resp, nio.SyncResponse, resp)
            if room_id in getattr(resp.rooms, section):
                return resp
            if loop.time() > deadline:
                self.fail(f"{room_id} not in rooms.{section} of any sync within 30 s")

    async def nio_fresh_sync(self, url: str, client: nio.AsyncClient) -> nio.SyncResponse:
        """An initial sync (no since token) of a new nio client on the same login,
        with left rooms included."""
        fresh = nio.AsyncClient(url, client.user_id)
        fresh.restore_login(client.user_id, client.device_id, client.access_token)
        try:
            resp = await fresh.sync(timeout=0, sync_filter=INCLUDE_LEAVE, full_state=True)
            self.assertIsInstance(resp, nio.SyncResponse, resp)
            return resp
        finally:
            await fresh.close()

    # -- mautrix ---------------------------------------------------------

    async def mautrix_login(self, url: str, user: User) -> ClientAPI:
        client = ClientAPI(UserID(user.user_id), base_url=url)
        resp = await client.login(
            password=password(user), device_name="mautrix test", store_access_token=True
        )
        self.assertEqual(resp.user_id, user.user_id)
        return client

    async def mautrix_create_room(
        self, client: ClientAPI, other: User, room_version: str | None = None
    ) -> RoomID:
        """A room created by the mautrix client, which ``other`` joins too
        (see nio_create_room)."""
        options: dict[str, Any] = {"room_version": room_version} if room_version else {}
        room_id = await client.create_room(name="mautrix room", **options)
        await client.invite_user(room_id, UserID(other.user_id))
        self.assertEqual(self.hs.membership(other, room_id, "join").status, 200)
        return room_id

    async def mautrix_sync_until(
        self, client: ClientAPI, since: SyncToken, section: str, room_id: str
    ) -> dict[str, Any]:
        """Incremental syncs (long-polling) until room_id shows in rooms.<section>."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            resp = await client.sync(since=since, timeout=5000)
            if room_id in resp.get("rooms", {}).get(section, {}):
                return dict(resp)
            if loop.time() > deadline:
                self.fail(f"{room_id} not in rooms.{section} of any sync within 30 s")
            since = SyncToken(resp["next_batch"])

    async def mautrix_fresh_sync(self, client: ClientAPI) -> dict[str, Any]:
        """An initial sync (no since token) with a filter that includes left rooms."""
        filter_id = await client.create_filter(Filter(room=RoomFilter(include_leave=True)))
        return dict(await client.sync(timeout=0, filter_id=filter_id, full_state=True))

    # -- nio scenarios ---------------------------------------------------

    def test_nio_leave_forget_lifecycle(self) -> None:
        """matrix-nio, unchanged, against the module: forget while joined comes
        back as a RoomForgetError with status_code M_UNKNOWN; room_leave returns
        a RoomLeaveResponse and room_forget a RoomForgetResponse (nio accepts
        only an exact {} for both, so the module answers exactly {}); the leave
        shows in rooms.leave of nio's next sync, and after the forget an initial
        sync, even with left rooms included, no longer lists the room; the
        audit log records all three calls with the nio device; in listener mode
        the calls reached the module's listener and nothing else did."""
        admin = self.hs.register(unique("admin"), admin=True)
        alice = self.hs.register(unique("nioalice"))
        bob = self.hs.register(unique("niobob"))

        async def body(url: str, proxy: RoutingProxy | None) -> None:
            client = await self.nio_login(url, bob)
            try:
                room_id = await self.nio_create_room(client, alice)
                await self.nio_sync_until(client, "join", room_id)

                refused = await client.room_forget(room_id)
                self.assertIsInstance(refused, nio.RoomForgetError, refused)
                self.assertEqual(refused.status_code, "M_UNKNOWN")
                self.assertEqual(refused.room_id, room_id)
                self.assertEqual(refused.transport_response.status, 400)

                left = await client.room_leave(room_id)
                self.assertIsInstance(left, nio.RoomLeaveResponse, left)
                self.assertEqual(
                    self.member_content(admin, room_id, bob.user_id), {"membership": "leave"}
                )
                await self.nio_sync_until(client, "leave", room_id)
                before = await self.nio_fresh_sync(url, client)
                self.assertIn(room_id, before.rooms.leave)

                forgot = await client.room_forget(room_id)
                self.assertIsInstance(forgot, nio.RoomForgetResponse, forgot)
                self.assertEqual(forgot.room_id, room_id)
                self.assertNotIn(room_id, client.rooms)  # nio dropped its copy
                after = await self.nio_fresh_sync(url, client)
                for section in ("join", "invite", "leave"):
                    self.assertNotIn(room_id, getattr(after.rooms, section), section)

                entries = self.audit(admin, bob.user_id)
                self.assertEqual(
                    [
                        (e["action"], e["outcome"], e["room_id"], e["reason"], e["device_id"])
                        for e in entries
                    ],
                    [
                        ("forget", "M_UNKNOWN", room_id, None, client.device_id),
                        ("leave", "ok", room_id, None, client.device_id),
                        ("forget", "ok", room_id, None, client.device_id),
                    ],
                )
                self.assert_routed(
                    proxy,
                    [("forget", 400), ("leave", 200), ("forget", 200)],
                    ("/login", "/createRoom", "/sync"),
                )
            finally:
                await client.close()

        self.run_async(body)

    def test_nio_leave_without_reason(self) -> None:
        """nio's room_leave has no reason parameter: it POSTs leave with an empty
        body (listener mode: the proxy saw zero bytes with Content-Type
        application/json and the token in the Authorization header), the module
        accepts that as "no reason", nio gets a RoomLeaveResponse, and the event
        and audit entry carry no reason. The room id is a classic "!x:server"
        one, so the path segment nio builds holds a colon; the module decodes it
        to the right room."""
        admin = self.hs.register(unique("admin"), admin=True)
        alice = self.hs.register(unique("nioalice"))
        bob = self.hs.register(unique("nioquiet"))

        async def body(url: str, proxy: RoutingProxy | None) -> None:
            client = await self.nio_login(url, bob)
            try:
                room_id = await self.nio_create_room(client, alice, CLASSIC_ROOM_VERSION)
                left = await client.room_leave(room_id)
                self.assertIsInstance(left, nio.RoomLeaveResponse, left)
            finally:
                await client.close()
            self.assertEqual(
                self.member_content(admin, room_id, bob.user_id), {"membership": "leave"}
            )
            [entry] = self.audit(admin, bob.user_id)
            self.assertEqual(
                (entry["action"], entry["outcome"], entry["reason"]), ("leave", "ok", None)
            )
            self.assert_routed(proxy, [("leave", 200)])
            if proxy is not None:
                [call] = proxy.leave_forget_calls()
                self.assertEqual(call.method, "POST")
                self.assertEqual(
                    urllib.parse.unquote(call.raw_path), f"/_matrix/client/v3/rooms/{room_id}/leave"
                )
                self.assertEqual(call.body, b"")
                self.assertEqual(call.headers.get("Content-Type"), "application/json")
                self.assertEqual(call.headers.get("Authorization"), f"Bearer {client.access_token}")
                self.assertEqual(json.loads(call.response), {})

        self.run_async(body)

    def test_nio_leave_refused_and_repeated(self) -> None:
        """nio's room_leave on a room the user was never in surfaces the module's
        refusal as a RoomLeaveError with status_code M_FORBIDDEN (HTTP 403, as
        from Synapse), not as a success; a repeated leave of a room already left
        is a RoomLeaveResponse (Synapse answers it 200 {} too)."""
        alice = self.hs.register(unique("nioalice"))
        bob = self.hs.register(unique("niotwice"))
        foreign = self.hs.create_room(alice, preset="public_chat")

        async def body(url: str, proxy: RoutingProxy | None) -> None:
            client = await self.nio_login(url, bob)
            try:
                refused = await client.room_leave(foreign)
                self.assertIsInstance(refused, nio.RoomLeaveError, refused)
                self.assertEqual(refused.status_code, "M_FORBIDDEN")
                self.assertEqual(refused.transport_response.status, 403)
                room_id = await self.nio_create_room(client, alice)
                for _ in range(2):
                    left = await client.room_leave(room_id)
                    self.assertIsInstance(left, nio.RoomLeaveResponse, left)
            finally:
                await client.close()
            self.assert_routed(proxy, [("leave", 403), ("leave", 200), ("leave", 200)])

        self.run_async(body)

    # -- mautrix scenarios -----------------------------------------------

    def test_mautrix_leave_forget_lifecycle(self) -> None:
        """mautrix, unchanged, against the module: forget_room while joined
        raises MUnknown (a MatrixRequestError, errcode M_UNKNOWN, HTTP 400);
        leave_room(reason=...) and forget_room return normally; the reason is in
        the m.room.member event (admin API) and in what a second member sees in
        their sync; the leave shows in rooms.leave of the next sync, and after the
        forget an initial sync with include_leave no longer lists the room; the
        audit log records the calls with the reason; in listener mode they went
        to the module's listener, and the leave body was {"reason": ...}."""
        admin = self.hs.register(unique("admin"), admin=True)
        alice = self.hs.register(unique("mxalice"))
        bob = self.hs.register(unique("mxbob"))
        reason = "Off to bed \N{SLEEPING SYMBOL}"

        async def body(url: str, proxy: RoutingProxy | None) -> None:
            client = await self.mautrix_login(url, bob)
            watcher = await self.mautrix_login(url, alice)
            try:
                room_id = await self.mautrix_create_room(client, alice)
                watch_since = (await watcher.sync(timeout=0))["next_batch"]
                since = (await client.sync(timeout=0))["next_batch"]

                with self.assertRaises(MUnknown) as refused:
                    await client.forget_room(room_id)
                self.assertIsInstance(refused.exception, MatrixRequestError)
                self.assertEqual(refused.exception.errcode, "M_UNKNOWN")
                self.assertEqual(refused.exception.http_status, 400)

                await client.leave_room(room_id, reason=reason)  # returns None: no error
                self.assertEqual(
                    self.member_content(admin, room_id, bob.user_id),
                    {"membership": "leave", "reason": reason},
                )
                seen = await self.mautrix_sync_until(watcher, watch_since, "join", room_id)
                timeline = seen["rooms"]["join"][room_id]["timeline"]["events"]
                self.assertIn(
                    {"membership": "leave", "reason": reason},
                    [
                        e["content"]
                        for e in timeline
                        if e["type"] == "m.room.member" and e["state_key"] == bob.user_id
                    ],
                )
                await self.mautrix_sync_until(client, since, "leave", room_id)
                before = await self.mautrix_fresh_sync(client)
                self.assertIn(room_id, before["rooms"]["leave"])

                await client.forget_room(room_id)  # returns None: no error
                after = await self.mautrix_fresh_sync(client)
                for section in ("join", "invite", "leave"):
                    self.assertNotIn(room_id, after.get("rooms", {}).get(section, {}), section)

                entries = self.audit(admin, bob.user_id)
                self.assertEqual(
                    [
                        (e["action"], e["outcome"], e["room_id"], e["reason"], e["device_id"])
                        for e in entries
                    ],
                    [
                        ("forget", "M_UNKNOWN", room_id, None, client.device_id),
                        ("leave", "ok", room_id, reason, client.device_id),
                        ("forget", "ok", room_id, None, client.device_id),
                    ],
                )
                self.assert_routed(
                    proxy,
                    [("forget", 400), ("leave", 200), ("forget", 200)],
                    ("/login", "/createRoom", "/sync"),
                )
                if proxy is not None:
                    forget_refused, leave, forget = proxy.leave_forget_calls()
                    self.assertEqual(json.loads(leave.body), {"reason": reason})
                    self.assertEqual(forget.body, b"{}")
                    self.assertEqual(json.loads(leave.response), {})
                    self.assertEqual(json.loads(forget.response), {})
                    self.assertEqual(json.loads(forget_refused.response)["errcode"], "M_UNKNOWN")
            finally:
                await client.api.session.close()
                await watcher.api.session.close()

        self.run_async(body)

    def test_mautrix_leave_reason_none(self) -> None:
        """mautrix's leave_room(room_id, reason=None) sends {} (not
        {"reason": null}; listener mode checks the bytes), the module accepts it,
        leave_room returns normally, and the event and audit entry carry no
        reason. An empty-string reason is dropped by mautrix the same way. One
        room has a version-12 id, the other a classic "!x:server" id."""
        admin = self.hs.register(unique("admin"), admin=True)
        alice = self.hs.register(unique("mxalice"))
        bob = self.hs.register(unique("mxquiet"))

        async def body(url: str, proxy: RoutingProxy | None) -> None:
            client = await self.mautrix_login(url, bob)
            try:
                rooms = [
                    await self.mautrix_create_room(client, alice, version)
                    for version in (None, CLASSIC_ROOM_VERSION)
                ]
                await client.leave_room(rooms[0], reason=None)  # returns None: no error
                await client.leave_room(rooms[1], reason="")  # returns None: no error
            finally:
                await client.api.session.close()
            for room_id in rooms:
                self.assertEqual(
                    self.member_content(admin, room_id, bob.user_id), {"membership": "leave"}
                )
            self.assertEqual(
                [
                    (e["action"], e["outcome"], e["room_id"], e["reason"])
                    for e in self.audit(admin, bob.user_id)
                ],
                [("leave", "ok", room_id, None) for room_id in rooms],
            )
            self.assert_routed(proxy, [("leave", 200), ("leave", 200)])
            if proxy is not None:
                for call in proxy.leave_forget_calls():
                    self.assertEqual(call.body, b"{}")
                    self.assertEqual(call.headers.get("Content-Type"), "application/json")

        self.run_async(body)

    def test_mautrix_leave_not_in_room(self) -> None:
        """mautrix's leave_room swallows errors whose message says "not in room"
        (its pre-MSC3848 heuristic): leaving a room the user was never in returns
        quietly because the module answers with Synapse's own 403 M_FORBIDDEN
        "<user> not in room <room>." error, and with raise_not_in_room=True the
        same answer is raised as MForbidden. The audit log records both refusals."""
        admin = self.hs.register(unique("admin"), admin=True)
        alice = self.hs.register(unique("mxalice"))
        bob = self.hs.register(unique("mxtwice"))
        foreign = RoomID(self.hs.create_room(alice, preset="public_chat"))

        async def body(url: str, proxy: RoutingProxy | None) -> None:
            client = await self.mautrix_login(url, bob)
            try:
                await client.leave_room(foreign)  # returns None: no error
                with self.assertRaises(MForbidden) as raised:
                    await client.leave_room(foreign, raise_not_in_room=True)
                self.assertEqual(raised.exception.errcode, "M_FORBIDDEN")
                self.assertEqual(raised.exception.http_status, 403)
                self.assertIn("not in room", raised.exception.message)
            finally:
                await client.api.session.close()
            self.assertEqual(
                [(e["action"], e["outcome"], e["room_id"]) for e in self.audit(admin, bob.user_id)],
                [("leave", "M_FORBIDDEN", foreign)] * 2,
            )
            self.assert_routed(proxy, [("leave", 403), ("leave", 403)], ("/login",))

        self.run_async(body)


BASE_CONFIG: dict[str, Any] = {
    "bcrypt_rounds": 4,
    # Synapse answers an identical /sync from a response cache for 2 minutes
    # by default; the initial sync after forget must be computed afresh.
    "caches": {"sync_response_cache_duration": 0},
}


class InterceptClientTests(ClientScenarios, SynapseTestCase):
    """mount: intercept — the clients talk straight to Synapse's client listener."""

    MODE = "intercept"
    EXTRA_CONFIG = BASE_CONFIG


class ListenerClientTests(ClientScenarios, SynapseTestCase):
    """mount: listener — the clients talk to the routing proxy in front of both listeners."""

    MODE = "listener"
    EXTRA_CONFIG = BASE_CONFIG
