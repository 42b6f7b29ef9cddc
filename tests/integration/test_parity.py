"""Parity of the module's leave and forget with Synapse's own endpoints.

Native Synapse is the oracle. Every scenario is set up twice, identically: once
in front of Synapse's own servlets and once in front of the module's, each with
users and rooms of its own so that the two runs cannot interfere. The runs are
then compared on what a client can observe: the status, errcode and shape of
each answer, and the state that results (the user's ``m.room.member`` event as
the admin API shows it, which section of an initial /sync lists the room, and
whether /messages still serves it).

Both mount modes are covered, against one oracle: each class starts three
Synapses with the same homeserver configuration, a twin without the module
(native), one with the module in ``intercept`` mode (it takes leave and forget
over on the client listener) and one in ``listener`` mode (it answers on its
``resources: []`` listener). A scenario runs once natively and once per mount.

Deliberate deviations are asserted as such, not as parity:

* a ``reason`` that is not a string is refused by the module (400
  ``M_BAD_JSON``) where Synapse copies it into the event, and a ``null``
  reason is dropped by the module where Synapse writes ``"reason": null``;
* forget is limited per user by the module (``forget_rate_limit``); Synapse
  never limits it.
"""

import itertools
import json
import urllib.parse
from collections.abc import Callable, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
)

import attr

from tests.integration.base import SynapseTestCase
from tests.support.harness import Response, SynapseProcess, User, quote_room, request

BASE_CONFIG: dict[str, Any] = {
    # Registration hashes a password per user; the default cost would dominate
    # the run time of a suite that registers hundreds of users.
    "bcrypt_rounds": 4,
    # Synapse answers an identical /sync request from a response cache for 2
    # minutes by default, so a second initial sync (same user, same filter)
    # would show the state of the first one: turn that cache off.
    "caches": {"sync_response_cache_duration": 0},
}

UNKNOWN_ROOM = "!nope:test.local"
KNOCK_ROOM_VERSION = "10"
# Synapse refuses events whose canonical JSON exceeds 65536 bytes.
OVERSIZED_REASON = "x" * (65 * 1024)

_localparts = itertools.count(1)


def unique(prefix: str) -> str:
    """A localpart no other test of this process has used."""
    return f"{prefix}{next(_localparts)}"


def ok(resp: Response, step: str) -> Response:
    """Fail loudly if a setup step did not work, so a scenario never tests the wrong thing."""
    if resp.status != 200:
        raise AssertionError(f"setup step {step!r} failed: {resp.status} {resp.raw[:300]!r}")
    return resp


@attr.s(auto_attribs=True, frozen=True)
class Side:
    """One side of a comparison: a Synapse and the port serving leave/forget on it.

    Attributes:
        label: ``native``, or the module's mount (``intercept``, ``listener``).
        hs: The Synapse process that owns the users and rooms of this side.
        port: Where POST/PUT leave and forget are sent on this side.
        admin: A server admin of ``hs`` (reads state through the admin API).
    """

    label: str
    hs: SynapseProcess
    port: int
    admin: User

    def register(self, prefix: str = "user") -> User:
        return self.hs.register(unique(prefix))

    def call(
        self,
        token: str | None,
        method: str,
        room_id: str,
        action: str,
        body: Any = None,
        *,
        txn_id: str | None = None,
        version: str = "v3",
        encode: bool = True,
        query: str = "",
        raw_body: bytes | None = None,
    ) -> Response:
        """/_matrix/client/{version}/rooms/{roomId}/{action}[/{txnId}] on this side."""
        segment = quote_room(room_id) if encode else room_id
        path = f"/_matrix/client/{version}/rooms/{segment}/{action}"
        if txn_id is not None:
            path += "/" + txn_id
        if query:
            path += "?" + query
        return request(self.port, method, path, body, token=token, raw_body=raw_body)


@attr.s(auto_attribs=True)
class Scene:
    """A situation set up on one side: a user and the room the scenario is about.

    Attributes:
        notes: Facts an action records for comparison (e.g. "the event id did
            not change"); they are compared between the sides like the state.
    """

    side: Side
    user: User
    room_id: str
    owner: User | None = None
    rooms: list[str] = attr.Factory(list)
    notes: dict[str, Any] = attr.Factory(dict)

    def leave(self, body: Any = None, **kw: Any) -> Response:
        return self.side.call(self.user.access_token, "POST", self.room_id, "leave", body, **kw)

    def forget(self, **kw: Any) -> Response:
        return self.side.call(self.user.access_token, "POST", self.room_id, "forget", **kw)

    def put(self, action: str, txn_id: str, body: Any = None) -> Response:
        return self.side.call(
            self.user.access_token, "PUT", self.room_id, action, body, txn_id=txn_id
        )

    def join(self) -> Response:
        return self.side.hs.membership(self.user, self.room_id, "join")

    def member_event(self, room_id: str | None = None) -> dict[str, Any] | None:
        return self.side.hs.member_event(
            self.side.admin, room_id or self.room_id, self.user.user_id
        )

    def member_event_id(self) -> str | None:
        event = self.member_event()
        return None if event is None else str(event["event_id"])

    def leave_event_count(self) -> int:
        """How many leave events of the user the room's timeline holds (admin API)."""
        event_filter = urllib.parse.quote(json.dumps({"types": ["m.room.member"]}))
        resp = ok(
            self.side.hs.client(
                "GET",
                f"/_synapse/admin/v1/rooms/{quote_room(self.room_id)}/messages"
                f"?dir=b&limit=1000&filter={event_filter}",
                token=self.side.admin.access_token,
            ),
            "admin room messages",
        )
        return sum(
            1
            for event in resp.body["chunk"]
            if event.get("state_key") == self.user.user_id
            and event["content"].get("membership") == "leave"
        )

    def sync_sections(self, room_id: str | None = None) -> list[str]:
        """The sections (join, invite, leave, knock) of an initial /sync listing the room."""
        room_id = room_id or self.room_id
        rooms = self.side.hs.sync_rooms(self.user)
        return sorted(name for name, listed in rooms.items() if room_id in listed)

    def messages_status(self, room_id: str | None = None) -> int:
        room_id = room_id or self.room_id
        return self.side.hs.client(
            "GET",
            f"/_matrix/client/v3/rooms/{quote_room(room_id)}/messages?dir=b&limit=1",
            token=self.user.access_token,
        ).status

    def observe(self, room_id: str | None = None) -> dict[str, Any]:
        """What the scenario left behind, with nothing that differs by construction (ids)."""
        room_id = room_id or self.room_id
        event = self.member_event(room_id)
        content: dict[str, Any] | None = None
        if event is not None:
            # Profile fields carry the (unique) localpart: compare their presence only.
            content = {
                key: "<profile>" if key in ("displayname", "avatar_url") else value
                for key, value in event["content"].items()
            }
        return {
            "content": content,
            "sent_by_user": None if event is None else event["sender"] == self.user.user_id,
            "sync": self.sync_sections(room_id),
            "messages": self.messages_status(room_id),
            **self.notes,
        }


@attr.s(auto_attribs=True, frozen=True)
class Run:
    """One side's run of a scenario."""

    scene: Scene
    responses: list[Response]
    state: dict[str, Any]


Setup = Callable[[Side], Scene]
Action = Callable[[Scene], Any]


def outcome(resp: Response) -> tuple[Any, ...]:
    """What is compared of an answer: status, errcode and the answer's shape."""
    if 200 <= resp.status < 300:
        body = resp.body
        if isinstance(body, dict) and "room_id" in body:
            # A join answers with the room id, which differs between the sides.
            body = {**body, "room_id": "<room_id>"}
        return (resp.status, body)
    keys = sorted(resp.body) if isinstance(resp.body, dict) else None
    return (resp.status, resp.errcode, keys)


def leaving(body: Any = None, **kw: Any) -> Action:
    """The action "leave with this body" (usable in loops, unlike a late-binding lambda)."""

    def act(scene: Scene) -> Response:
        return scene.leave(body, **kw)

    return act


# -- scenes ---------------------------------------------------------------


def nowhere(room_id: str) -> Setup:
    """A user and a room id they have nothing to do with (unknown or malformed)."""

    def setup(side: Side) -> Scene:
        return Scene(side, side.register(), room_id)

    return setup


def stranger(side: Side) -> Scene:
    """A public room someone else created, which the user never entered."""
    owner = side.register("owner")
    room_id = side.hs.create_room(owner, preset="public_chat")
    return Scene(side, side.register(), room_id, owner)


def joined(side: Side) -> Scene:
    """The user joined a public room someone else created."""
    scene = stranger(side)
    ok(scene.join(), "join")
    return scene


def invited(side: Side) -> Scene:
    """The user is invited to a private room."""
    owner = side.register("owner")
    room_id = side.hs.create_room(owner, preset="private_chat")
    user = side.register()
    ok(side.hs.membership(owner, room_id, "invite", {"user_id": user.user_id}), "invite")
    return Scene(side, user, room_id, owner)


def knocking(side: Side) -> Scene:
    """The user knocked on a room whose join rule is knock."""
    owner = side.register("owner")
    room_id = side.hs.create_room(
        owner,
        preset="private_chat",
        room_version=KNOCK_ROOM_VERSION,
        initial_state=[
            {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
        ],
    )
    user = side.register()
    ok(side.hs.membership(user, room_id, "knock", {"reason": "let me in"}), "knock")
    return Scene(side, user, room_id, owner)


def kicked(side: Side) -> Scene:
    """The user joined, then was kicked by the room's creator."""
    scene = joined(side)
    assert scene.owner is not None
    ok(
        side.hs.membership(
            scene.owner, scene.room_id, "kick", {"user_id": scene.user.user_id, "reason": "out"}
        ),
        "kick",
    )
    return scene


def banned(side: Side) -> Scene:
    """The user joined, then was banned by the room's creator."""
    scene = joined(side)
    assert scene.owner is not None
    ok(
        side.hs.membership(
            scene.owner, scene.room_id, "ban", {"user_id": scene.user.user_id, "reason": "gone"}
        ),
        "ban",
    )
    return scene


def left(side: Side) -> Scene:
    """The user joined, then left through this side's own leave endpoint."""
    scene = joined(side)
    ok(scene.leave({"reason": "done"}), "leave")
    return scene


def notices_invited(side: Side) -> Scene:
    """The user is invited to their server-notices room (created by a notice)."""
    user = side.register()
    ok(
        side.hs.client(
            "POST",
            "/_synapse/admin/v1/send_server_notice",
            {"user_id": user.user_id, "content": {"msgtype": "m.text", "body": "hello"}},
            token=side.admin.access_token,
        ),
        "send_server_notice",
    )
    invites = list(side.hs.sync_rooms(user).get("invite", {}))
    if len(invites) != 1:
        raise AssertionError(f"expected one server-notices invite, got {invites}")
    return Scene(side, user, invites[0])


def notices_joined(side: Side) -> Scene:
    """The user accepted the invite to their server-notices room."""
    scene = notices_invited(side)
    ok(scene.join(), "join notices room")
    return scene


def guest_joined(side: Side) -> Scene:
    """A guest joined a public room that allows guests to join."""
    owner = side.register("owner")
    room_id = side.hs.create_room(
        owner,
        preset="public_chat",
        initial_state=[
            {
                "type": "m.room.guest_access",
                "state_key": "",
                "content": {"guest_access": "can_join"},
            }
        ],
    )
    guest = side.hs.register_guest()
    ok(side.hs.membership(guest, room_id, "join"), "guest join")
    return Scene(side, guest, room_id, owner)


# -- the two-sided test case ------------------------------------------------


class TwoSidedTestCase(SynapseTestCase):
    """Native Synapse on one side, the module in both mount modes on the other.

    The class's own Synapse runs the module in ``intercept`` mode; a second one
    runs it in ``listener`` mode (the module on its ``resources: []``
    listener); the oracle is a twin Synapse without the module. All three have
    the same homeserver configuration and live and die with the class
    (base.ClassFixtures runs setUpClass/tearDownClass). Natively a scenario
    runs once, not once per mount.
    """

    MODE = "intercept"
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = BASE_CONFIG
    # Exempt the admins from rc_message (they create the rooms of the limit tests).
    EXEMPT_ADMINS: ClassVar[bool] = False
    twin: ClassVar[SynapseProcess | None] = None
    listener_hs: ClassVar[SynapseProcess | None] = None
    native_side: ClassVar[Side]
    module_sides: ClassVar[tuple[Side, ...]]
    _up: ClassVar[bool] = False

    @classmethod
    def setUpClass(cls) -> None:
        # Idempotent, like the base class: a unittest-style runner may call it
        # before the first setUp does.
        if cls.__dict__.get("_up"):
            return
        super().setUpClass()
        try:
            cls.twin = SynapseProcess(None, dict(cls.EXTRA_CONFIG))
            cls.twin.start()
            cls.listener_hs = SynapseProcess(
                {**cls.MODULE_CONFIG, "mount": "listener"}, dict(cls.EXTRA_CONFIG)
            )
            cls.listener_hs.start()
            cls.native_side = Side("native", cls.twin, cls.twin.client_port, cls._admin(cls.twin))
            cls.module_sides = (
                Side("intercept", cls.hs, cls.hs.client_port, cls._admin(cls.hs)),
                Side(
                    "listener",
                    cls.listener_hs,
                    cls.listener_hs.module_port,
                    cls._admin(cls.listener_hs),
                ),
            )
        except Exception:
            cls._cleanup_others()
            super().tearDownClass()
            raise
        cls._up = True

    @classmethod
    def tearDownClass(cls) -> None:
        if not cls.__dict__.get("_up"):
            return
        cls._up = False
        cls._cleanup_others()
        super().tearDownClass()

    @classmethod
    def _cleanup_others(cls) -> None:
        for name in ("twin", "listener_hs"):
            hs = cls.__dict__.get(name)
            if hs is not None:
                hs.cleanup()
                setattr(cls, name, None)

    @classmethod
    def _admin(cls, hs: SynapseProcess) -> User:
        admin = hs.register(unique("admin"), admin=True)
        if cls.EXEMPT_ADMINS:
            ok(
                hs.client(
                    "POST",
                    f"/_synapse/admin/v1/users/{urllib.parse.quote(admin.user_id)}"
                    "/override_ratelimit",
                    {"messages_per_second": 0, "burst_count": 0},
                    token=admin.access_token,
                ),
                "override_ratelimit",
            )
        return admin

    def run_on(self, side: Side, setup: Setup, act: Action) -> Run:
        scene = setup(side)
        result = act(scene)
        responses = [result] if isinstance(result, Response) else list(result)
        return Run(scene, responses, scene.observe())

    def parity(
        self,
        setup: Setup,
        act: Action,
        expect: Sequence[tuple[int, str | None]] | None = None,
        label: str = "",
    ) -> tuple[Run, list[Run]]:
        """Run a scenario natively and on each mount; assert the module behaved as native did.

        Args:
            setup: Builds the situation on one side (fresh users and rooms).
            act: Does the requests under test; returns one Response or a list.
            expect: What native is expected to answer, (status, errcode) per
                response, to make sure the scenario exercises what it claims.
            label: Names the case in failure messages when a test loops.

        Returns:
            The native run and the module's runs (one per mount), for further
            assertions.
        """
        native = self.run_on(self.native_side, setup, act)
        if expect is not None:
            self.assertEqual(
                [(r.status, r.errcode) for r in native.responses],
                list(expect),
                f"{label} native Synapse did not answer as this scenario assumes",
            )
        modules = []
        for side in self.module_sides:
            module = self.run_on(side, setup, act)
            self.assertEqual(
                [outcome(r) for r in module.responses],
                [outcome(r) for r in native.responses],
                f"{label} the module ({side.label}) answered differently from native Synapse",
            )
            self.assertEqual(
                module.state, native.state, f"{label} the resulting state differs ({side.label})"
            )
            modules.append(module)
        return native, modules


if TYPE_CHECKING:
    _MixinBase = TwoSidedTestCase
else:
    _MixinBase = object


class ParityScenarios(_MixinBase):
    """The scenarios (the concrete class runs them natively and on both mounts)."""

    # -- leave ----------------------------------------------------------

    def test_leave_joined_with_reason(self) -> None:
        """Leaving a joined room with a reason: 200 {} and a leave event carrying the reason."""
        native, _ = self.parity(
            joined, lambda s: s.leave({"reason": "Saying farewell"}), [(200, None)]
        )
        self.assertEqual(
            native.state["content"], {"membership": "leave", "reason": "Saying farewell"}
        )

    def test_leave_joined_without_reason(self) -> None:
        """A body with other keys but no reason gives a leave event without a reason."""
        native, _ = self.parity(joined, lambda s: s.leave({"something": "else"}), [(200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave"})

    def test_leave_with_no_body(self) -> None:
        """No request body at all is accepted as an empty object, as Synapse does."""
        native, _ = self.parity(joined, lambda s: s.leave(None), [(200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave"})

    def test_leave_with_json_null_body(self) -> None:
        """A body of JSON null counts as no body (Synapse's parser), not as a non-object."""
        native, _ = self.parity(joined, lambda s: s.leave(raw_body=b"null"), [(200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave"})

    def test_leave_with_empty_object(self) -> None:
        """An empty JSON object leaves without a reason."""
        native, _ = self.parity(joined, lambda s: s.leave({}), [(200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave"})
        self.assertEqual(native.state["sync"], ["leave"])

    def test_reject_invite(self) -> None:
        """Leave while invited rejects the invite: the user's own leave event, reason kept."""
        native, _ = self.parity(invited, lambda s: s.leave({"reason": "no thanks"}), [(200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "no thanks"})
        self.assertTrue(native.state["sent_by_user"])

    def test_rescind_knock(self) -> None:
        """Leave while knocking rescinds the knock."""
        native, _ = self.parity(
            knocking, lambda s: s.leave({"reason": "never mind"}), [(200, None)]
        )
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "never mind"})

    def test_leave_twice_same_body(self) -> None:
        """A second identical leave is answered 200 and sends no new event (Synapse dedupes)."""

        def act(scene: Scene) -> list[Response]:
            first = scene.leave({"reason": "bye"})
            event_id = scene.member_event_id()
            second = scene.leave({"reason": "bye"})
            scene.notes["same_event"] = scene.member_event_id() == event_id
            return [first, second]

        native, _ = self.parity(joined, act, [(200, None), (200, None)])
        self.assertTrue(native.state["same_event"])

    def test_leave_twice_different_body(self) -> None:
        """A second leave with a different reason is refused (the user is not in the room)."""

        def act(scene: Scene) -> list[Response]:
            return [scene.leave({"reason": "bye"}), scene.leave({"reason": "really bye"})]

        native, _ = self.parity(joined, act, [(200, None), (403, "M_FORBIDDEN")])
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "bye"})

    def test_leave_unknown_room(self) -> None:
        """A well-formed id of a room the server does not know."""
        self.parity(nowhere(UNKNOWN_ROOM), lambda s: s.leave({}), [(404, "M_UNKNOWN")])

    def test_leave_malformed_room_ids(self) -> None:
        """Room ids that are not room ids ("garbage", empty, no server part) answer as native."""
        for room_id in ("garbage", "", "!nope"):
            self.parity(
                nowhere(room_id), lambda s: s.leave({}), [(404, "M_UNKNOWN")], label=repr(room_id)
            )

    def test_leave_room_never_in(self) -> None:
        """Leaving an existing room the user was never in is forbidden."""
        self.parity(stranger, lambda s: s.leave({}), [(403, "M_FORBIDDEN")])

    def test_leave_after_kick(self) -> None:
        """After a kick the user is no longer in the room: leave is forbidden, the kick stays."""
        native, _ = self.parity(
            kicked, lambda s: s.leave({"reason": "fine"}), [(403, "M_FORBIDDEN")]
        )
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "out"})
        self.assertFalse(native.state["sent_by_user"])

    def test_leave_after_ban(self) -> None:
        """A banned user cannot turn the ban into a leave."""
        native, _ = self.parity(banned, lambda s: s.leave({}), [(403, "M_FORBIDDEN")])
        self.assertEqual(native.state["content"]["membership"], "ban")

    def test_server_notices_invite_cannot_be_rejected(self) -> None:
        """The server-notices invite cannot be rejected: 403 M_CANNOT_LEAVE_SERVER_NOTICE_ROOM."""
        native, _ = self.parity(
            notices_invited, lambda s: s.leave({}), [(403, "M_CANNOT_LEAVE_SERVER_NOTICE_ROOM")]
        )
        self.assertEqual(native.state["content"]["membership"], "invite")

    def test_server_notices_room_leave_after_join(self) -> None:
        """Once joined, the server-notices room can be left, as natively."""
        native, _ = self.parity(notices_joined, lambda s: s.leave({}), [(200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave"})

    def test_server_notices_room_forget(self) -> None:
        """Forgetting the notices room is refused while invited or joined, allowed once left."""
        self.parity(notices_invited, lambda s: s.forget(), [(400, "M_UNKNOWN")])

        def leave_then_forget(scene: Scene) -> list[Response]:
            return [scene.forget(), scene.leave({}), scene.forget()]

        native, _ = self.parity(
            notices_joined, leave_then_forget, [(400, "M_UNKNOWN"), (200, None), (200, None)]
        )
        self.assertEqual(native.state["sync"], [])

    def test_leave_non_json_body(self) -> None:
        """A body that is not JSON is 400 M_NOT_JSON and the user stays joined."""
        native, _ = self.parity(joined, lambda s: s.leave(raw_body=b"nope"), [(400, "M_NOT_JSON")])
        self.assertEqual(native.state["content"]["membership"], "join")

    def test_leave_json_non_object_body(self) -> None:
        """JSON that is not an object ([1], "x", 5) is 400 M_BAD_JSON and the user stays."""
        for raw in (b"[1]", b'"x"', b"5"):
            native, _ = self.parity(
                joined,
                leaving(raw_body=raw),
                [(400, "M_BAD_JSON")],
                label=repr(raw),
            )
            self.assertEqual(native.state["content"]["membership"], "join")

    def test_leave_oversized_reason(self) -> None:
        """A reason that makes the event exceed 64 KiB is 413 M_TOO_LARGE; nothing is sent."""
        native, _ = self.parity(
            joined, lambda s: s.leave({"reason": OVERSIZED_REASON}), [(413, "M_TOO_LARGE")]
        )
        self.assertEqual(native.state["content"]["membership"], "join")

    # -- authentication ---------------------------------------------------

    def test_missing_token(self) -> None:
        """No access token: 401 M_MISSING_TOKEN for leave and forget, nothing changes."""

        def leave(scene: Scene) -> Response:
            return scene.side.call(None, "POST", scene.room_id, "leave", {})

        def forget(scene: Scene) -> Response:
            return scene.side.call(None, "POST", scene.room_id, "forget")

        native, _ = self.parity(joined, leave, [(401, "M_MISSING_TOKEN")])
        self.assertEqual(native.state["content"]["membership"], "join")
        native, _ = self.parity(left, forget, [(401, "M_MISSING_TOKEN")])
        self.assertEqual(native.state["sync"], ["leave"])

    def test_invalid_token(self) -> None:
        """An unknown access token: 401 M_UNKNOWN_TOKEN for leave and forget."""

        def leave(scene: Scene) -> Response:
            return scene.side.call("not-a-token", "POST", scene.room_id, "leave", {})

        def forget(scene: Scene) -> Response:
            return scene.side.call("not-a-token", "POST", scene.room_id, "forget")

        native, _ = self.parity(joined, leave, [(401, "M_UNKNOWN_TOKEN")])
        self.assertEqual(native.state["content"]["membership"], "join")
        native, _ = self.parity(left, forget, [(401, "M_UNKNOWN_TOKEN")])
        self.assertEqual(native.state["sync"], ["leave"])

    def test_token_in_query_string(self) -> None:
        """?access_token= authenticates leave and forget as the Authorization header does."""

        def leave_then_forget(scene: Scene) -> list[Response]:
            query = "access_token=" + urllib.parse.quote(scene.user.access_token)
            return [
                scene.side.call(None, "POST", scene.room_id, "leave", {}, query=query),
                scene.side.call(None, "POST", scene.room_id, "forget", query=query),
            ]

        native, _ = self.parity(joined, leave_then_forget, [(200, None), (200, None)])
        self.assertEqual(native.state["sync"], [])

    def test_guest_can_leave(self) -> None:
        """A guest may leave; the event is marked kind: guest as natively."""
        native, _ = self.parity(guest_joined, lambda s: s.leave({"reason": "bye"}), [(200, None)])
        self.assertEqual(
            native.state["content"], {"membership": "leave", "reason": "bye", "kind": "guest"}
        )

    def test_guest_cannot_forget(self) -> None:
        """A guest may not forget: 403 M_GUEST_ACCESS_FORBIDDEN, even after leaving."""

        def leave_then_forget(scene: Scene) -> list[Response]:
            return [scene.leave({}), scene.forget()]

        native, _ = self.parity(
            guest_joined, leave_then_forget, [(200, None), (403, "M_GUEST_ACCESS_FORBIDDEN")]
        )
        self.assertEqual(native.state["sync"], ["leave"])

    # -- forget -----------------------------------------------------------

    def test_forget_while_joined(self) -> None:
        """Forget while joined is 400 M_UNKNOWN and the room stays."""
        native, _ = self.parity(joined, lambda s: s.forget(), [(400, "M_UNKNOWN")])
        self.assertEqual(native.state["sync"], ["join"])

    def test_forget_while_invited(self) -> None:
        """Forget while invited is 400 M_UNKNOWN and the invite stays."""
        native, _ = self.parity(invited, lambda s: s.forget(), [(400, "M_UNKNOWN")])
        self.assertEqual(native.state["sync"], ["invite"])

    def test_forget_while_knocking(self) -> None:
        """Forget while knocking is 400 M_UNKNOWN and the knock stays."""
        native, _ = self.parity(knocking, lambda s: s.forget(), [(400, "M_UNKNOWN")])
        self.assertEqual(native.state["content"]["membership"], "knock")

    def test_forget_after_leave(self) -> None:
        """Forget after leave: 200, the room leaves /sync and /messages is refused."""
        native, _ = self.parity(left, lambda s: s.forget(), [(200, None)])
        self.assertEqual(native.state["sync"], [])
        self.assertEqual(native.state["messages"], 403)

    def test_forget_after_kick(self) -> None:
        """A kicked user may forget the room."""
        native, _ = self.parity(kicked, lambda s: s.forget(), [(200, None)])
        self.assertEqual(native.state["sync"], [])

    def test_forget_after_ban(self) -> None:
        """A banned user may forget the room."""
        native, _ = self.parity(banned, lambda s: s.forget(), [(200, None)])
        self.assertEqual(native.state["sync"], [])

    def test_forget_twice(self) -> None:
        """A second forget is answered 200 again."""
        self.parity(left, lambda s: [s.forget(), s.forget()], [(200, None), (200, None)])

    def test_forget_unknown_and_malformed_rooms(self) -> None:
        """Forget of a room the server does not know, or of a non-room-id, is 200 as natively."""
        for room_id in (UNKNOWN_ROOM, "garbage", ""):
            self.parity(nowhere(room_id), lambda s: s.forget(), [(200, None)], label=repr(room_id))

    def test_forget_ignores_body(self) -> None:
        """Forget does not read its body: even a non-JSON one is accepted, as natively."""
        native, _ = self.parity(left, lambda s: s.forget(raw_body=b"nope"), [(200, None)])
        self.assertEqual(native.state["sync"], [])

    def test_after_forget_history_and_sync_are_gone(self) -> None:
        """After forget, /messages is 403 and an initial /sync with include_leave omits the room."""

        def act(scene: Scene) -> Response:
            scene.notes["messages_before"] = scene.messages_status()
            scene.notes["sync_before"] = scene.sync_sections()
            return scene.forget()

        native, _ = self.parity(left, act, [(200, None)])
        self.assertEqual(
            (native.state["messages_before"], native.state["sync_before"]), (200, ["leave"])
        )
        self.assertEqual((native.state["messages"], native.state["sync"]), (403, []))

    def test_rejoin_after_forget(self) -> None:
        """Rejoining a public room after forgetting it makes it visible again."""

        def act(scene: Scene) -> list[Response]:
            return [scene.forget(), scene.join()]

        native, _ = self.parity(left, act, [(200, None), (200, None)])
        self.assertEqual(native.state["sync"], ["join"])
        self.assertEqual(native.state["messages"], 200)

    # -- HTTP surface -----------------------------------------------------

    def test_wrong_methods_are_405(self) -> None:
        """GET on leave/forget, PUT without txnId and POST with one are 405 M_UNRECOGNIZED."""

        def act(scene: Scene) -> list[Response]:
            token, room_id, call = scene.user.access_token, scene.room_id, scene.side.call
            return [
                call(token, "GET", room_id, "leave"),
                call(token, "GET", room_id, "forget"),
                call(token, "PUT", room_id, "leave", {}),
                call(token, "PUT", room_id, "forget", {}),
                call(token, "POST", room_id, "leave", {}, txn_id="t1"),
                call(token, "POST", room_id, "forget", {}, txn_id="t1"),
                call(token, "POST", room_id, "leave", {}, txn_id=""),
                call(token, "DELETE", room_id, "leave"),
            ]

        native, _ = self.parity(joined, act, [(405, "M_UNRECOGNIZED")] * 8)
        self.assertEqual(native.state["content"]["membership"], "join")

    def test_wrong_methods_without_token_are_405(self) -> None:
        """The method is checked before authentication: 405, not 401, without a token."""

        def act(scene: Scene) -> list[Response]:
            call = scene.side.call
            return [
                call(None, "GET", scene.room_id, "leave"),
                call(None, "GET", scene.room_id, "forget"),
                call(None, "POST", scene.room_id, "leave", {}, txn_id="t1"),
                call(None, "PUT", scene.room_id, "forget"),
            ]

        self.parity(joined, act, [(405, "M_UNRECOGNIZED")] * 4)

    def test_options_preflight(self) -> None:
        """A CORS preflight on leave and forget is answered as natively (204)."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.side.call(None, "OPTIONS", scene.room_id, "leave"),
                scene.side.call(None, "OPTIONS", scene.room_id, "forget"),
            ]

        self.parity(joined, act, [(204, None), (204, None)])

    def test_percent_encoded_and_raw_room_ids(self) -> None:
        """An unencoded room id (!abc:test.local) works as the percent-encoded one does."""

        def raw(scene: Scene) -> list[Response]:
            return [scene.leave({}, encode=False), scene.forget(encode=False)]

        def encoded(scene: Scene) -> list[Response]:
            return [scene.leave({}), scene.forget()]

        for act in (raw, encoded):
            native, _ = self.parity(joined, act, [(200, None), (200, None)], label=act.__name__)
            self.assertEqual(native.state["sync"], [])

    def test_double_encoded_room_id(self) -> None:
        """A room id percent-encoded twice is decoded once, so it names no known room."""

        def act(scene: Scene) -> list[Response]:
            segment = urllib.parse.quote(quote_room(scene.room_id), safe="")
            return [
                scene.side.call(scene.user.access_token, "POST", segment, "leave", {}, encode=False)
            ]

        native, _ = self.parity(joined, act, [(404, "M_UNKNOWN")])
        self.assertEqual(native.state["content"]["membership"], "join")

    def test_undecodable_room_id(self) -> None:
        """A room id segment that percent-decodes to invalid UTF-8 answers as natively."""

        def act(scene: Scene) -> list[Response]:
            token, call = scene.user.access_token, scene.side.call
            return [
                call(token, "POST", "%FF%FE", "leave", {}, encode=False),
                call(token, "POST", "%FF%FE", "forget", encode=False),
            ]

        self.parity(joined, act, [(404, "M_UNKNOWN"), (200, None)])

    def test_legacy_version_prefixes(self) -> None:
        """r0, api/v1 and unstable serve leave and forget too; client/v1 serves neither."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.leave({}, version="v1"),
                scene.leave({"reason": "r0"}, version="r0"),
                scene.forget(version="v1"),
                scene.forget(version="unstable"),
            ]

        native, _ = self.parity(joined, act, [(404, "M_UNRECOGNIZED"), (200, None)] * 2)
        self.assertEqual(native.state["sync"], [])

        native, _ = self.parity(
            joined, lambda s: s.leave({"reason": "v1"}, version="api/v1"), [(200, None)]
        )
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "v1"})

    # -- transactions -----------------------------------------------------

    def test_put_leave_replays_transaction(self) -> None:
        """PUT leave/{txnId} replayed returns the same answer and sends no second leave.

        The replay after a rejoin proves the answer comes from the transaction
        cache: executing it again would have left the room again.
        """

        def act(scene: Scene) -> list[Response]:
            first = scene.put("leave", "txn-1", {"reason": "once"})
            event_id = scene.member_event_id()
            replay = scene.put("leave", "txn-1", {"reason": "once"})
            scene.notes["replay_kept_event"] = scene.member_event_id() == event_id
            rejoin = scene.join()
            replay_after_rejoin = scene.put("leave", "txn-1", {"reason": "once"})
            scene.notes["leave_events"] = scene.leave_event_count()
            return [first, replay, rejoin, replay_after_rejoin]

        native, _ = self.parity(joined, act, [(200, None)] * 4)
        self.assertTrue(native.state["replay_kept_event"])
        self.assertEqual(native.state["leave_events"], 1)
        self.assertEqual(native.state["content"]["membership"], "join")

    def test_put_leave_new_transaction(self) -> None:
        """A different txnId is a new request; an empty txnId is one too."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.put("leave", "txn-a", {"reason": "one"}),
                scene.join(),
                scene.put("leave", "txn-b", {"reason": "two"}),
                scene.join(),
                scene.put("leave", "", {"reason": "three"}),
            ]

        native, _ = self.parity(joined, act, [(200, None)] * 5)
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "three"})

    def test_put_leave_failure_is_not_replayed(self) -> None:
        """A PUT that failed is not cached: retrying the same txnId executes it afresh."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.put("leave", "txn-r", {"reason": OVERSIZED_REASON}),
                scene.put("leave", "txn-r", {"reason": "smaller"}),
                scene.put("leave", "txn-r", {"reason": "smaller"}),
            ]

        native, _ = self.parity(joined, act, [(413, "M_TOO_LARGE"), (200, None), (200, None)])
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": "smaller"})

    def test_put_forget_replays_transaction(self) -> None:
        """PUT forget/{txnId} replayed returns the cached 200 even once forget would fail."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.put("forget", "txn-f"),
                scene.join(),
                scene.put("forget", "txn-f"),  # replayed: 200 although joined
                scene.forget(),  # executed: 400, the user is joined
            ]

        native, _ = self.parity(
            left, act, [(200, None), (200, None), (200, None), (400, "M_UNKNOWN")]
        )
        self.assertEqual(native.state["sync"], ["join"])

    # -- deliberate deviations ----------------------------------------------

    def test_reason_not_a_string_is_refused_by_the_module(self) -> None:
        """DEVIATION: a non-string reason is 400 M_BAD_JSON on the module, 200 natively.

        Synapse copies any JSON value into the event; the spec types reason as
        a string, and the module refuses anything else without sending.
        """
        reasons: list[Any] = [5, [], {}]
        for reason in reasons:
            native = self.run_on(self.native_side, joined, leaving({"reason": reason}))
            self.assertEqual(outcome(native.responses[0]), (200, {}), repr(reason))
            self.assertEqual(native.state["content"], {"membership": "leave", "reason": reason})
            for side in self.module_sides:
                module = self.run_on(side, joined, leaving({"reason": reason}))
                self.assertEqual(
                    (module.responses[0].status, module.responses[0].errcode),
                    (400, "M_BAD_JSON"),
                    f"{reason!r} ({side.label})",
                )
                self.assertEqual(module.state["content"]["membership"], "join", side.label)

    def test_reason_null_is_treated_as_absent(self) -> None:
        """DEVIATION in content only: reason null is 200 on both; the module omits the key.

        Synapse writes "reason": null into the event; the module treats null
        as absent, so its event has no reason key. Status and membership agree.
        """
        native = self.run_on(self.native_side, joined, lambda s: s.leave({"reason": None}))
        self.assertEqual(outcome(native.responses[0]), (200, {}))
        self.assertEqual(native.state["content"], {"membership": "leave", "reason": None})
        for side in self.module_sides:
            module = self.run_on(side, joined, lambda s: s.leave({"reason": None}))
            self.assertEqual(outcome(module.responses[0]), outcome(native.responses[0]), side.label)
            self.assertEqual(module.state["content"], {"membership": "leave"}, side.label)
            self.assertEqual(module.state["sync"], native.state["sync"], side.label)

    # -- audit ----------------------------------------------------------

    def test_leave_is_audited(self) -> None:
        """A module leave (on either mount) is in the audit log with its reason and
        the event id it sent."""
        for side in self.module_sides:
            scene = joined(side)
            self.assertEqual(outcome(scene.leave({"reason": "for the record"})), (200, {}))
            event_id = scene.member_event_id()
            resp = ok(
                side.hs.client(
                    "GET",
                    "/_synapse/client/leave_forget/v1/admin/audit?user_id="
                    + urllib.parse.quote(scene.user.user_id),
                    token=side.admin.access_token,
                ),
                "audit",
            )
            leaves = [e for e in resp.body["entries"] if e["action"] == "leave"]
            self.assertEqual(len(leaves), 1, resp.body)
            entry = leaves[0]
            self.assertEqual(entry["outcome"], "ok", side.label)
            self.assertEqual(entry["room_id"], scene.room_id, side.label)
            self.assertEqual(entry["reason"], "for the record", side.label)
            self.assertIsNotNone(event_id, side.label)
            self.assertEqual(entry["event_id"], event_id, side.label)


class ParityTests(ParityScenarios, TwoSidedTestCase):
    """The module on both mounts against a module-less twin."""


# -- rate limits --------------------------------------------------------------

TIGHT_LIMIT = {"per_second": 0.1, "burst_count": 2}


class LimitScenarios(_MixinBase):
    """Limits, with rc_message and forget_rate_limit at burst 2 (refill every 10 s).

    The user never sends an event of their own before the requests under test:
    the (exempt) admin creates the rooms and joins the user through the admin
    API, which does not ratelimit, so each user starts with a full bucket and
    the outcome depends on burst counts only.
    """

    def _rooms_for(self, side: Side, count: int, kick: bool) -> Scene:
        user = side.register()
        rooms = []
        for _ in range(count):
            room_id = side.hs.create_room(side.admin, preset="public_chat")
            ok(
                side.hs.client(
                    "POST",
                    f"/_synapse/admin/v1/join/{quote_room(room_id)}",
                    {"user_id": user.user_id},
                    token=side.admin.access_token,
                ),
                "admin join",
            )
            if kick:
                ok(
                    side.hs.membership(side.admin, room_id, "kick", {"user_id": user.user_id}),
                    "kick",
                )
            rooms.append(room_id)
        # The scene's own room is the last one: the one the limit applies to.
        return Scene(side, user, rooms[-1], side.admin, rooms)

    def test_leave_is_limited_like_native(self) -> None:
        """Leave counts against rc_message: the third leave in a row is 429 on both sides."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.side.call(scene.user.access_token, "POST", room_id, "leave", {})
                for room_id in scene.rooms
            ]

        native, modules = self.parity(
            lambda side: self._rooms_for(side, 3, kick=False),
            act,
            [(200, None), (200, None), (429, "M_LIMIT_EXCEEDED")],
        )
        for run in (native, *modules):
            retry = run.responses[-1].body["retry_after_ms"]
            self.assertIsInstance(retry, int)
            self.assertGreater(retry, 0)
            self.assertEqual(run.state["content"]["membership"], "join")

    def test_forget_is_limited_by_the_module_only(self) -> None:
        """DEVIATION: the module limits forget per user (3rd is 429); Synapse never does."""

        def act(scene: Scene) -> list[Response]:
            return [
                scene.side.call(scene.user.access_token, "POST", room_id, "forget")
                for room_id in scene.rooms
            ]

        def setup(side: Side) -> Scene:
            return self._rooms_for(side, 3, kick=True)

        native = self.run_on(self.native_side, setup, act)
        self.assertEqual([outcome(r) for r in native.responses], [(200, {})] * 3)
        self.assertEqual(native.state["sync"], [])
        self.assertEqual(native.scene.sync_sections(native.scene.rooms[0]), [])
        for side in self.module_sides:
            module = self.run_on(side, setup, act)
            self.assertEqual(
                [(r.status, r.errcode) for r in module.responses],
                [(200, None), (200, None), (429, "M_LIMIT_EXCEEDED")],
                side.label,
            )
            retry = module.responses[-1].body["retry_after_ms"]
            self.assertIsInstance(retry, int)
            self.assertGreater(retry, 0)
            # The limited forget did nothing: the room is still listed for the user.
            self.assertEqual(module.state["sync"], ["leave"], side.label)
            self.assertEqual(module.scene.sync_sections(module.scene.rooms[0]), [], side.label)


class LimitTests(LimitScenarios, TwoSidedTestCase):
    """Limits, on both mounts."""

    MODULE_CONFIG = {"forget_rate_limit": TIGHT_LIMIT}
    EXTRA_CONFIG = {**BASE_CONFIG, "rc_message": TIGHT_LIMIT}
    EXEMPT_ADMINS = True


def _synapse_knows_msc4293() -> bool:
    import inspect

    import synapse.config.experimental

    return "msc4293_enabled" in inspect.getsource(synapse.config.experimental)


class ExperimentalContentScenarios(_MixinBase):
    """Content keys Synapse copies only when an experimental feature is on."""

    if not _synapse_knows_msc4293():
        skip = "this Synapse has no MSC4293 (added after the oldest supported version)"

    def test_msc4293_redact_events_is_copied_like_native(self) -> None:
        """With msc4293_enabled, Synapse copies org.matrix.msc4293.redact_events
        from the leave body into the event; the module does the same."""
        body = {"reason": "bye", "org.matrix.msc4293.redact_events": True}
        native = self.run_on(self.native_side, joined, lambda s: s.leave(body))
        self.assertEqual(native.state["content"].get("org.matrix.msc4293.redact_events"), True)
        for side in self.module_sides:
            module = self.run_on(side, joined, lambda s: s.leave(body))
            self.assertEqual(outcome(module.responses[0]), outcome(native.responses[0]), side.label)
            self.assertEqual(module.state["content"], native.state["content"], side.label)


class ExperimentalTests(ExperimentalContentScenarios, TwoSidedTestCase):
    """MSC4293 content, on both mounts."""

    EXTRA_CONFIG = {**BASE_CONFIG, "experimental_features": {"msc4293_enabled": True}}
