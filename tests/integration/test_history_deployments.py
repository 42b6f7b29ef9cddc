"""The history guard (issue 9) beyond the matrix: users it must not touch, and workers.

* :class:`NeverLeftByteParityTests`: for a user who never left a room, every
  guarded read answers byte for byte what Synapse answers with
  ``history_guard: false`` (the same server and database, restarted with the
  other setting), while other users of the same rooms left and forgot.
* :class:`HistoryWorkerTests`: on a generic worker (module loaded there,
  ``mount: intercept``), /messages and /sync sent to the worker's own client
  listener keep the promises (PostgreSQL only, like tests/integration/test_workers.py).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any, ClassVar

from tests.integration.base import SynapseTestCase
from tests.integration.history import (
    INCLUDE_LEAVE,
    SLIDING_BODY,
    SLIDING_SYNC,
    Room,
    World,
    c_path,
    qs,
    wait_for_background_updates,
)
from tests.integration.history_probes import read
from tests.integration.workers import DeploymentTestCase, WorkerProcess
from tests.support.harness import Response, User, quote_room

# unsigned.age is computed when an event is served, so it differs between any two reads.
AGE = re.compile(rb'"age":\d+,?')


def unordered_state(data: Any) -> Any:
    """data with every state list (``state.events``, ``required_state``) sorted by event
    id, and lists of strings (user ids) sorted."""
    if isinstance(data, dict):
        out = {k: unordered_state(v) for k, v in data.items()}
        state = out.get("state")
        if isinstance(state, dict) and isinstance(state.get("events"), list):
            state["events"] = sorted(state["events"], key=lambda e: e.get("event_id", ""))
        if isinstance(out.get("required_state"), list):
            out["required_state"] = sorted(
                out["required_state"], key=lambda e: e.get("event_id", "")
            )
        return out
    if isinstance(data, list):
        if data and all(isinstance(v, str) for v in data):
            return sorted(data)  # device_lists, heroes: sets as lists
        return [unordered_state(v) for v in data]
    return data


class NeverLeftByteParityTests(SynapseTestCase):
    """A user without departures gets Synapse's exact bytes from every guarded read."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    # Presence carries "last_active_ago", which changes between any two reads.
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = {"presence": {"enabled": False}}

    def requests(self, world: World, reader: User, token: str) -> list[tuple[str, str, Any]]:
        """(method, path, body) of every guarded read, on the rooms of the world."""
        out: list[tuple[str, str, Any]] = [
            ("GET", c_path("/sync?timeout=0"), None),
            ("GET", c_path("/sync?timeout=0&" + qs(filter=INCLUDE_LEAVE)), None),
            ("GET", c_path("/sync?timeout=0&" + qs(since=token)), None),
            ("GET", c_path("/sync?timeout=0&" + qs(since=token, filter=INCLUDE_LEAVE)), None),
            ("GET", c_path("/notifications"), None),
            ("POST", SLIDING_SYNC + "?timeout=0", {**SLIDING_BODY, "conn_id": "parity"}),
        ]
        for room in world.rooms:
            base = c_path(f"/rooms/{quote_room(room.room_id)}")
            before, after = quote_room(room.ids["before-1"]), quote_room(room.ids["after-1"])
            root = quote_room(room.ids["root"])
            v1 = f"/_matrix/client/v1/rooms/{quote_room(room.room_id)}"
            out += [
                ("GET", f"{base}/messages?dir=b", None),
                ("GET", f"{base}/messages?dir=f", None),
                ("GET", f"{base}/messages?dir=f&" + qs(**{"from": token}), None),
                ("GET", f"{base}/context/{before}", None),
                ("GET", f"{base}/context/{after}", None),
                ("GET", f"{base}/event/{after}", None),
                ("GET", f"{base}/event/{root}", None),
                ("GET", f"{v1}/relations/{root}", None),
                ("GET", f"{v1}/threads", None),
            ]
        return out

    def capture(self, reader: User, reqs: list[tuple[str, str, Any]]) -> list[tuple[int, bytes]]:
        answers = []
        for method, path, body in reqs:
            resp: Response = self.hs.client(method, path, body, token=reader.access_token)
            raw = resp.raw
            raw = AGE.sub(b"", raw)
            if path.startswith(SLIDING_SYNC):
                # The connection's position moves with every request.
                raw = re.sub(rb'"pos":"[^"]*"', b'"pos":""', raw)
            if "/sync" in path:
                # Synapse lists rooms and state in hash order, which changes with
                # each process.
                raw = json.dumps(unordered_state(json.loads(raw)), sort_keys=True).encode()
            answers.append((resp.status, raw))
        return answers

    def test_reads_of_a_user_who_never_left_are_byte_identical(self) -> None:
        """The owner of rooms others left, were kicked or banned from and forgot
        (the owner never left): /sync (initial, include_leave, incremental),
        /notifications, sliding sync, /messages, /context, /event, /relations and
        /threads answer the same status and bytes with the guard on as with
        history_guard: false. Masked: unsigned.age (a serving time), sliding
        sync's pos; /sync answers compare as JSON with state lists sorted
        (Synapse orders rooms and state by hash, which differs between
        processes)."""
        rooms = [(k, "shared", s) for k in ("leave", "kick", "ban") for s in ("left", "forgotten")]
        world = World(self.hs, rooms)
        world.build(wait=False)
        token = world.members["left"].tokens["token_before"]
        reqs = self.requests(world, world.owner, token)
        guarded = self.capture(world.owner, reqs)
        self.hs.stop()
        self.hs.reconfigure({"mount": "intercept", "history_guard": False, **self.MODULE_CONFIG})
        try:
            self.hs.start()
            plain = self.capture(world.owner, reqs)
        finally:
            # Leave the class's server as it was configured for the next test.
            self.hs.stop()
            self.hs.reconfigure({"mount": self.MODE, **self.MODULE_CONFIG})
            self.hs.start()
        self.assertTrue(all(status == 200 for status, _ in guarded[:6]), guarded[:6])
        for (method, path, _), g, p in zip(reqs, guarded, plain, strict=True):
            self.assertEqual(g, p, f"{method} {path}")


class HistoryWorkerTests(DeploymentTestCase):
    """/messages and /sync on a generic worker with the module in intercept mode."""

    MODE = "intercept"
    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    worker: ClassVar[WorkerProcess]
    world: ClassVar[World]

    @classmethod
    def set_up_deployment(cls) -> None:
        rooms = [(k, "shared", s) for k in ("leave", "kick", "ban") for s in ("left", "forgotten")]
        cls.world = World(cls.hs, rooms, read_via=cls.worker)
        cls.world.build(wait=False)

    def rooms(self, stage: str) -> list[Room]:
        return [r for r in self.world.rooms if r.stage == stage]

    def test_worker_serves_the_reads(self) -> None:
        """The reads below really reach the worker: its access log has them."""
        room = self.rooms("left")[0]
        read(self.world, "messages_f", "member", room)
        read(self.world, "sync_offline_device", "member", room)
        log = self.worker.log_text()
        self.assertIn("/messages?", log)
        self.assertIn("/sync?", log)

    def test_left_user_gets_no_later_events_from_the_worker(self) -> None:
        """After leave, kick or ban, /messages (both directions, with and without
        from) and /sync from an old since, sent to the worker, hold no event sent
        after the departure, and still hold the history from before it (a
        banned user's /messages is refused, as by native Synapse)."""
        for room in self.rooms("left"):
            for probe in (
                "messages_b",
                "messages_f",
                "messages_f_from_before",
                "messages_b_from_after",
                "sync_offline_device",
                "sync_offline_device_include_leave",
            ):
                got = read(self.world, probe, "member", room)
                if room.kind == "ban" and probe.startswith("messages"):
                    # Synapse refuses a banned user /messages altogether.
                    self.assertEqual((got.error, got.labels), ((403, "M_FORBIDDEN"), ()))
                    continue
                self.assertEqual(got.status, 200, (room.key, probe, got))
                later = [x for x in got.labels + got.state_labels if x in room.after]
                self.assertEqual(later, [], (room.key, probe))
                if probe.startswith("messages_b"):
                    for label in ("before-1", "before-2", "root", room.departure):
                        self.assertIn(label, got.labels, (room.key, probe))

    def test_forgotten_room_is_gone_on_the_worker(self) -> None:
        """After forget, /messages on the worker answers what it answers a
        never-member; /sync with include_leave leaves the room out, and the
        device that slept through leave and forget gets the room in rooms.leave
        with its departure event only (limited, no state)."""
        for room in self.rooms("forgotten"):
            for probe in ("messages_b", "messages_f", "messages_f_from_before"):
                got = read(self.world, probe, "member", room)
                never = read(self.world, probe, "stranger", room)
                self.assertEqual(
                    (got.error, got.labels), (never.error, never.labels), (room.key, probe)
                )
            initial = read(self.world, "sync_initial_include_leave", "member", room)
            self.assertEqual(initial.where, ("absent",), room.key)
            for probe in ("sync_offline_device", "sync_offline_device_include_leave"):
                got = read(self.world, probe, "member", room)
                self.assertEqual(
                    (got.where, got.labels, got.state_labels),
                    (("leave", True, True), (room.departure,), ()),
                    (room.key, probe),
                )

    def test_forget_on_main_holds_on_the_worker_before_replication(self) -> None:
        """A forget served by the main process holds on the worker's very next
        reads even while replication stands still (redis stopped, so the worker
        has not heard of the forget and its caches still say "not forgotten"):
        the identical incremental /sync (from the worker's response cache) gets
        the departure stub, an include_leave initial /sync, a fresh sliding sync
        connection and /notifications leave the room out, the legacy /events
        stream keeps only the departure, and /messages answers what a
        never-member gets."""
        world, hs = self.world, self.hs
        wait_for_background_updates(hs)  # sliding sync needs them
        member = hs.register("cacheworker")
        stranger = hs.register("cachestranger")
        room = Room("leave", "shared", "forgotten", world.members["left"])
        room.room_id = room_id = hs.create_room(world.owner, preset="public_chat")
        world.ok(hs.membership(member, room_id, "join"), "join")
        since = world.sync_token(member)
        # Two members: Synapse's one-to-one push rule gives the member a notification.
        world.text(world.owner, room, "cached-1")
        world.ok(hs.membership(member, room_id, "leave"), "leave")
        path = c_path("/sync?" + urllib.parse.urlencode({"timeout": 0, "since": since}))
        first = self.worker.client("GET", path, token=member.access_token)
        self.assertEqual(first.status, 200)
        self.assertIn(room_id, first.body["rooms"]["leave"])  # the worker heard of the leave
        messages = c_path(f"/rooms/{quote_room(room_id)}/messages?dir=b")
        with self.deployment.redis.paused():
            world.ok(world.forget(member, room_id), "forget")
            second = self.worker.client("GET", path, token=member.access_token)
            initial = self.worker.client(
                "GET",
                c_path("/sync?timeout=0&" + qs(filter=INCLUDE_LEAVE)),
                token=member.access_token,
            )
            sliding = self.worker.client(
                "POST",
                SLIDING_SYNC + "?timeout=0",
                {**SLIDING_BODY, "conn_id": "before-replication"},
                token=member.access_token,
            )
            notifications = self.worker.client(
                "GET", c_path("/notifications"), token=member.access_token
            )
            stream = self.worker.client(
                "GET",
                c_path("/events?" + qs(**{"from": since, "timeout": 0})),
                token=member.access_token,
            )
            got = self.worker.client("GET", messages, token=member.access_token)
            never = self.worker.client("GET", messages, token=stranger.access_token)
        self.assertEqual(second.status, 200)
        events = second.body["rooms"]["leave"][room_id]["timeline"]["events"]
        self.assertEqual(
            [(e["type"], e.get("state_key"), e["content"].get("membership")) for e in events],
            [("m.room.member", member.user_id, "leave")],
        )
        for what, resp in (
            ("initial", initial),
            ("sliding", sliding),
            ("notifications", notifications),
        ):
            self.assertEqual(resp.status, 200, what)
            self.assertNotIn(room_id.encode(), resp.raw, what)
        self.assertEqual(stream.status, 200)
        self.assertEqual(
            [
                (e["type"], e.get("state_key"), e["content"].get("membership"))
                for e in stream.body["chunk"]
                if e.get("room_id") == room_id
            ],
            [("m.room.member", member.user_id, "leave")],
        )
        # Synapse's error names the reader.
        expected = json.loads(json.dumps(never.body).replace(stranger.user_id, member.user_id))
        self.assertEqual((got.status, got.body), (never.status, expected))
        self.assertEqual(never.status, 403)
