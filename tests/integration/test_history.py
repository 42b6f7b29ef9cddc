"""The history matrix (issue 9): every read path × departure × forget × visibility × rejoin.

Two Synapses per class, built alike (tests/integration/history.py; the read
paths are in history_probes.py): ``guarded`` runs the module as deployed
(``mount: intercept``, ``history_guard`` at its default), ``native`` runs
Synapse alone. Both get the same 48 scenario rooms
(leave, kick, ban × shared, invited, joined, world_readable × left, forgotten,
rejoined, forgotten then rejoined), and answers are compared by event labels,
so the servers' different event ids do not matter.

Each generated ``test_<path>__<kind>_<visibility>_<stage>`` checks one cell
twice, against the spec (what must be hidden) and against native Synapse
(what must not change):

* **forgotten**: the departed member gets exactly what ``stranger``, never in
  the room, gets on the same server (status, errcode, events: none of the
  room's). /sync and sliding sync never carry the room's history: the room
  is where native Synapse puts it (absent or ``leave``), and a device whose
  token predates the departure gets only the member's own departure event,
  ``limited`` timeline with ``prev_batch``, no state.
* **left** and **forgotten**: a read path that native Synapse orders (a
  timeline) must keep the order; answers that list state or rank search
  results compare sorted (history_probes.py).
* **left** (leave, kick, ban; not world_readable): no event sent after the
  departure, anywhere in the answer (bundled thread summaries included);
  everything else exactly as native Synapse answers (the same events in the
  same order, the same status).
* **world_readable** rooms, readable by anyone: exactly as native, except that
  a forgotten one still leaves /sync, sliding sync and /notifications (which
  never carry a room to a user who is not in it).
* every **rejoined** cell: exactly as native.

``test_owner_*`` and ``test_stranger_*`` check that users without departures
(one always joined, one never a member) get what native Synapse gives them.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, ClassVar

from tests.integration.base import SynapseTestCase
from tests.integration.history import (
    INCLUDE_LEAVE,
    VISIBILITIES,
    Member,
    Room,
    World,
    all_rooms,
    c_path,
)
from tests.integration.history_probes import (
    PROBES,
    SYNC_PROBES,
    Outcome,
    read,
    sync_outcome,
)
from tests.support.harness import FAST_BACKGROUND_UPDATES, SynapseProcess, User

_cache_users = itertools.count(1)


def start_pair(
    module_config: dict[str, Any],
) -> tuple[SynapseProcess, SynapseProcess]:
    """A Synapse with the module and one without, started side by side."""
    guarded = SynapseProcess(module_config, dict(FAST_BACKGROUND_UPDATES))
    native = SynapseProcess(None, dict(FAST_BACKGROUND_UPDATES))
    errors: list[BaseException] = []

    def start(hs: SynapseProcess) -> None:
        try:
            hs.start()
        except BaseException as exc:  # reported below, after both finished
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(hs,)) for hs in (guarded, native)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        guarded.cleanup()
        native.cleanup()
        raise errors[0]
    return guarded, native


def build_pair(*worlds: World) -> None:
    """Build the worlds side by side (each on its own server)."""
    errors: list[BaseException] = []

    def build(world: World) -> None:
        try:
            world.build()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(w,)) for w in worlds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def without(labels: tuple[str, ...], hidden: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(label for label in labels if label not in hidden)


class HistoryMatrixTests(SynapseTestCase):
    """The matrix; see the module docstring. One guarded and one native Synapse."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    native: ClassVar[SynapseProcess]
    guarded_world: ClassVar[World]
    native_world: ClassVar[World]

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        guarded, native = start_pair({"mount": cls.MODE, **cls.MODULE_CONFIG})
        try:
            cls.guarded_world = World(guarded, all_rooms())
            cls.native_world = World(native, all_rooms())
            build_pair(cls.guarded_world, cls.native_world)
        except BaseException:
            guarded.cleanup()
            native.cleanup()
            raise
        cls.hs, cls.native = guarded, native

    @classmethod
    def tearDownClass(cls) -> None:
        if "hs" in cls.__dict__:
            cls.native.cleanup()
            del cls.native
        super().tearDownClass()

    # -- the cells ----------------------------------------------------------

    def outcomes(self, probe: str, who: str, key: str) -> tuple[Room, Outcome, Outcome]:
        g_room = self.guarded_world.room(key)
        got = read(self.guarded_world, probe, who, g_room)
        native = read(self.native_world, probe, who, self.native_world.room(key))
        self.assertNotEqual(got.status, 500, f"{probe}: the guarded server answered 500")
        return g_room, got, native

    def check_cell(self, probe: str, key: str) -> None:
        room, got, native = self.outcomes(probe, "member", key)
        sync = probe in SYNC_PROBES
        world_readable = room.visibility == "world_readable"
        if room.stage.endswith("rejoined"):
            self.assertEqual(got, native, "differs from native Synapse")
        elif room.stage == "forgotten":
            if sync:
                self.check_forgotten_sync(probe, room, got, native)
            elif world_readable and probe != "notifications":
                # Readable as for anyone (and native Synapse answers so already).
                self.assertEqual(got, native, "differs from native Synapse")
            else:
                stranger = read(self.guarded_world, probe, "stranger", room)
                self.assertEqual(
                    (got.status, got.errcode, got.labels),
                    (stranger.status, stranger.errcode, stranger.labels),
                    "a forgotten room must answer as to a user never in it",
                )
        elif world_readable:
            # What anyone may read stays readable: exactly as native.
            self.assertEqual(got, native, "differs from native Synapse")
        else:  # left, kicked or banned; not forgotten
            leaked = [label for label in got.labels + got.state_labels if label in room.after]
            self.assertEqual(
                leaked, [], f"events sent after the departure (bundled ones count): {got}"
            )
            self.assertEqual(
                (got.labels, got.state_labels, got.where),
                (
                    without(native.labels, room.after),
                    without(native.state_labels, room.after),
                    native.where,
                ),
                "history before the departure must stay as native",
            )
            if native.status != 200 or without(native.labels, room.after) == native.labels:
                # Nothing of the answer was later: status and errcode as native too.
                self.assertEqual(got.error, native.error)

    def check_forgotten_sync(self, probe: str, room: Room, got: Outcome, native: Outcome) -> None:
        self.assertEqual(got.status, native.status)
        if native.where[:1] == ("absent",) or native.status != 200:
            self.assertEqual((got.labels, got.where), (native.labels, native.where))
            return
        if probe.startswith("sliding_"):
            # The room with only the departure event and no history.
            self.assertEqual(got.where[:1], ("present",), got)
            self.assertEqual(got.labels, (room.departure,), "timeline")
            self.assertEqual(set(got.state_labels) - {room.departure}, set(), "required_state")
            return
        # A device whose since predates the departure: rooms.leave with the departure only.
        self.assertEqual(got.where, ("leave", True, True), "section, limited, prev_batch")
        self.assertEqual(got.labels, (room.departure,), "timeline")
        self.assertEqual(got.state_labels, (), "state")

    def check_unaffected(self, probe: str, who: str, visibility: str) -> None:
        _, got, native = self.outcomes(probe, who, f"leave_{visibility}_left")
        self.assertEqual(got, native, f"{who} gets something else than from native Synapse")

    # -- Synapse's sync response cache ---------------------------------------

    def cache_scene(self, world: World) -> tuple[User, Room, str, str]:
        """A member who syncs (since S), leaves, and makes one /sync request twice:
        before and right after forgetting. Returns (member, room, since, filter)."""
        hs = world.hs
        member = hs.register(f"cache{next(_cache_users)}")
        room = Room("leave", "shared", "forgotten", Member(member, member))
        room.room_id = hs.create_room(world.owner, preset="public_chat")
        world.ok(hs.membership(member, room.room_id, "join"), "join")
        since = world.sync_token(member)
        world.text(world.owner, room, "cached-1")
        world.ok(hs.membership(member, room.room_id, "leave"), "leave")
        return member, room, since, json.dumps(INCLUDE_LEAVE)

    def sync_twice_around_forget(
        self, world: World, incremental: bool
    ) -> tuple[Room, Outcome, Outcome]:
        member, room, since, sync_filter = self.cache_scene(world)
        params: dict[str, Any] = {"timeout": 0, "filter": sync_filter}
        if incremental:
            params["since"] = since
        path = c_path("/sync?" + urllib.parse.urlencode(params))
        first = world.hs.client("GET", path, token=member.access_token)
        world.ok(world.forget(member, room.room_id), "forget")
        second = world.hs.client("GET", path, token=member.access_token)
        world.label_events(room)
        return room, sync_outcome(first, room), sync_outcome(second, room)

    def test_sync_cache_incremental_reflects_forget_at_once(self) -> None:
        """The same incremental /sync (since before the leave) sent just before and
        just after forget: the first shows the history, the second only the
        departure (Synapse's 2-minute response cache must not answer it)."""
        room, first, second = self.sync_twice_around_forget(self.guarded_world, True)
        self.assertIn("cached-1", first.labels)
        self.assertEqual(second.labels, (room.departure,))
        self.assertEqual(second.state_labels, ())

    def test_sync_cache_initial_reflects_forget_at_once(self) -> None:
        """The same initial /sync with include_leave just before and just after
        forget: the room is in rooms.leave first, absent right after."""
        _, first, second = self.sync_twice_around_forget(self.guarded_world, False)
        self.assertEqual(first.where[:1], ("leave",))
        self.assertIn("cached-1", first.labels)
        self.assertEqual(second.where, ("absent",))

    def test_native_sync_cache_serves_the_pre_forget_answer(self) -> None:
        """The scenario does hit Synapse's response cache: native Synapse answers
        the second, identical request with the pre-forget history (so the two
        tests above prove the module, not a cold cache)."""
        _, first, second = self.sync_twice_around_forget(self.native_world, True)
        self.assertIn("cached-1", second.labels)
        self.assertEqual(first, second)

    # -- a left user's own reads, by hand -----------------------------------

    def test_prev_batch_of_the_stub_is_refused_as_to_a_never_member(self) -> None:
        """Paging back from the prev_batch the offline device got for a forgotten
        room answers what /messages answers a never-member (403 M_FORBIDDEN on
        Synapse 1.163.2), for every departure kind."""
        for kind in ("leave", "kick", "ban"):
            room = self.guarded_world.room(f"{kind}_shared_forgotten")
            got = read(self.guarded_world, "prev_batch_paging", "member", room)
            never = read(self.guarded_world, "messages_b", "stranger", room)
            self.assertEqual((got.error, got.labels), (never.error, ()), kind)
            self.assertNotEqual(got.status, 200, kind)


def _cell_test(probe: str, key: str) -> Callable[[HistoryMatrixTests], None]:
    def test(self: HistoryMatrixTests) -> None:
        self.check_cell(probe, key)

    kind, rest = key.split("_", 1)
    test.__doc__ = (
        f"{probe} for a member who departed by {kind} ({rest}): spec and native parity "
        "(module docstring)."
    )
    return test


def _unaffected_test(probe: str, who: str, visibility: str) -> Callable[[HistoryMatrixTests], None]:
    def test(self: HistoryMatrixTests) -> None:
        self.check_unaffected(probe, who, visibility)

    test.__doc__ = (
        f"{probe} for the {who} (no departures) in {visibility} rooms: as native Synapse."
    )
    return test


for _probe in PROBES:
    for _kind, _vis, _stage in all_rooms():
        _key = f"{_kind}_{_vis}_{_stage}"
        setattr(HistoryMatrixTests, f"test_{_probe}__{_key}", _cell_test(_probe, _key))
    for _vis in VISIBILITIES:
        for _who in ("owner", "stranger"):
            setattr(
                HistoryMatrixTests,
                f"test_{_who}_{_probe}__{_vis}",
                _unaffected_test(_probe, _who, _vis),
            )
