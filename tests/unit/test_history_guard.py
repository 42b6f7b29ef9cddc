"""Unit tests of the history guard's routing, response capture and config key."""

import importlib
import json
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any
from unittest import mock

from synapse.http.server import JsonResource, _PathEntry
from synapse.module_api.errors import ConfigError
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import EncodingResourceWrapper

from matrix_leave_forget._synapse.routing import watch_routing
from matrix_leave_forget.config import parse_config
from matrix_leave_forget.history.departures import Departure
from matrix_leave_forget.history.guard import SERVLETS, RoomReadGuard, Route, capture, route_for
from matrix_leave_forget.history.json_codec import decode
from matrix_leave_forget.history.later_events import carried_ids, scrub_carried
from matrix_leave_forget.history.sync import SyncGuard, named_rooms
from tests.spellings import spellings


class ConfigTests(SynchronousTestCase):
    def test_default_on_and_false_accepted(self) -> None:
        """history_guard defaults to true; false is accepted."""
        self.assertTrue(parse_config({}).history_guard)
        self.assertFalse(parse_config({"history_guard": False}).history_guard)

    def test_non_bool_refused_naming_the_key(self) -> None:
        """Anything but true/false is a ConfigError naming history_guard."""
        for value in ("yes", 1, None, [], {}):
            with self.assertRaises(ConfigError, msg=repr(value)) as caught:
                parse_config({"history_guard": value})
            self.assertEqual(tuple(caught.exception.path or ()), ("history_guard",))


# Every guarded servlet class, where Synapse defines it (the sliding-sync one
# is absent from Synapse 1.98).
_SERVLET_MODULES = {
    "RoomMessageListRestServlet": "room",
    "RoomEventContextServlet": "room",
    "RoomEventServlet": "room",
    "RelationPaginationServlet": "relations",
    "ThreadsServlet": "relations",
    "RoomInitialSyncRestServlet": "room",
    "RoomMemberListRestServlet": "room",
    "EventRestServlet": "events",
    "SyncRestServlet": "sync",
    "NotificationsServlet": "notifications",
    "EventStreamRestServlet": "events",
    "InitialSyncRestServlet": "initial_sync",
    "SlidingSyncRestServlet": "sync",
}
_GROUP_VALUES = {
    "room_id": ["!abc:test.local", "%21abc%3Atest.local", "%21%61bc%3A%74est.local"],
    "event_id": ["$e", "%24e"],
    "parent_id": ["%24e"],
    "relation_type": ["m.thread"],
    "event_type": ["m.room.message"],
}


def _servlet_class(name: str) -> Any:
    module = importlib.import_module(f"synapse.rest.client.{_SERVLET_MODULES[name]}")
    return getattr(module, name, None)


class FakeJsonResource:
    """Synapse's own routing function over a route table of Synapse's own PATTERNS."""

    _get_handler_for_request = JsonResource._get_handler_for_request

    def __init__(self, servlets: dict[str, Any]) -> None:
        self._routes: dict[Any, dict[bytes, Any]] = {}
        for name, cls in servlets.items():
            for pattern in cls.PATTERNS:
                for method in (b"GET", b"POST"):
                    self._routes.setdefault(pattern, {})[method] = _PathEntry(
                        lambda *a, **k: None, name
                    )


class RoutedRequest:
    def __init__(self, method: bytes, path: str) -> None:
        self.method = method
        self.path = path.encode("ascii")


class ClassifyTests(SynchronousTestCase):
    def routed(self, resource: Any, method: bytes, path: str) -> list[Route | None]:
        seen: list[Route | None] = []
        self.assertTrue(
            watch_routing(
                resource, lambda r, name, groups: seen.append(route_for(r.method, name, groups))
            )
        )
        json_resource = getattr(resource, "original", resource)
        json_resource._get_handler_for_request(RoutedRequest(method, path))
        return seen

    def test_every_guarded_servlet_exists_in_this_synapse(self) -> None:
        """Each servlet the guard names is a class of the installed Synapse (sliding sync
        from 1.11x on), so a rename cannot silently unguard it."""
        for name in SERVLETS:
            if name == "SlidingSyncRestServlet" and _servlet_class(name) is None:
                continue
            cls = _servlet_class(name)
            self.assertIsNotNone(cls, name)
            self.assertTrue(cls.PATTERNS, name)

    def test_every_spelling_of_every_guarded_pattern_is_guarded(self) -> None:
        """Spellings generated from each guarded servlet's own regexes (every version
        prefix, every "." as other characters, percent-encoded ids), routed by
        Synapse's own routing function, are classified as that servlet's read; the
        room id is percent-decoded as Synapse hands it to the servlet."""
        servlets = {n: c for n in SERVLETS if (c := _servlet_class(n)) is not None}
        resource = FakeJsonResource(servlets)
        checked = 0
        for name, cls in servlets.items():
            kind, endpoint, methods = SERVLETS[name]
            for pattern in cls.PATTERNS:
                for path in spellings(pattern.pattern, _GROUP_VALUES):
                    for method in methods:
                        seen = self.routed(resource, method.encode(), path)
                        self.assertEqual(len(seen), 1, path)
                        route = seen[0]
                        assert route is not None, path
                        self.assertEqual((route.kind, route.endpoint), (kind, endpoint), path)
                        if kind == "room":
                            self.assertEqual(route.room_id, "!abc:test.local", path)
                        checked += 1
        self.assertGreater(checked, 200)

    def test_everything_else_passes(self) -> None:
        """Other servlets, and guarded servlets on a method they do not read with,
        are not guarded."""
        self.assertIsNone(route_for(b"GET", "RoomStateRestServlet", {"room_id": "!a"}))
        self.assertIsNone(route_for(b"GET", "JoinedRoomMemberListRestServlet", {"room_id": "!a"}))
        self.assertIsNone(route_for(b"OPTIONS", "SyncRestServlet", {}))
        self.assertIsNone(route_for(b"GET", "SlidingSyncRestServlet", {}))
        self.assertIsNone(route_for(b"POST", "RoomMessageListRestServlet", {"room_id": "!a"}))
        self.assertIsNone(route_for(b"GET", "RoomMessageListRestServlet", {"room_id": ""}))

    def test_gzip_wrapper_is_seen_through(self) -> None:
        """Synapse's gz_wrap (Twisted's EncodingResourceWrapper) hides the JsonResource
        it wraps; the guard hooks the resource underneath."""
        inner = FakeJsonResource({"SyncRestServlet": _servlet_class("SyncRestServlet")})
        wrapped = EncodingResourceWrapper(inner, [])
        self.assertEqual(self.routed(wrapped, b"HEAD", "/_matrix/client/r0/sync"), [Route("sync")])
        self.assertFalse(watch_routing(object(), lambda *a: None))


class FakeRequest:
    """What capture touches of a SynapseRequest, recording what reaches the wire."""

    def __init__(self) -> None:
        self.code = 200
        self.headers: dict[bytes, bytes] = {b"Content-Length": b"7"}
        self.wire: list[bytes] = []
        self.finished = False
        self.logcontext = None

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.wire.append(data)

    def finish(self) -> None:
        self.finished = True

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


class CaptureTests(SynchronousTestCase):
    def run_capture(
        self,
        chunks: list[bytes],
        replacement: tuple[int, bytes] | None,
        passes_now: bool = False,
    ) -> tuple[FakeRequest, list[Any]]:
        request = FakeRequest()
        seen: list[Any] = []

        async def check(code: int, body: bytes) -> tuple[int, bytes] | None:
            seen.append((code, body))
            return replacement

        capture(request, lambda code, body: passes_now, check)
        for chunk in chunks:
            request.write(chunk)  # as Synapse's producer does, chunk by chunk
        self.assertEqual(request.wire, [])  # nothing leaves before the check
        request.finish()
        return request, seen

    def test_untouched_answer_is_byte_identical(self) -> None:
        """When the check passes, exactly Synapse's bytes and headers go out, then finish."""
        chunks = [b'{"a":', b' "\xc3\xa9"', b"}"]
        request, seen = self.run_capture(chunks, None)
        self.assertEqual(seen, [(200, b"".join(chunks))])
        self.assertEqual(b"".join(request.wire), b"".join(chunks))
        self.assertEqual(request.headers, {b"Content-Length": b"7"})
        self.assertTrue(request.finished)
        # The class's own methods are back on the request.
        self.assertNotIn("write", vars(request))

    def test_answer_that_passes_now_goes_out_without_the_check(self) -> None:
        """When the synchronous pre-check passes the answer, Synapse's bytes go out
        at once, unchanged, and the asynchronous check never runs."""
        chunks = [b'{"a":', b"1}"]
        request, seen = self.run_capture(chunks, (403, b"{}"), passes_now=True)
        self.assertEqual(seen, [])
        self.assertEqual((request.code, b"".join(request.wire)), (200, b"".join(chunks)))
        self.assertTrue(request.finished)
        self.assertNotIn("finish", vars(request))

    def test_replacement_sets_status_and_length(self) -> None:
        """A replaced answer goes out with its own status and Content-Length."""
        body = json.dumps({"errcode": "M_FORBIDDEN", "error": "x"}).encode()
        request, _ = self.run_capture([b"{}"], (403, body))
        self.assertEqual((request.code, b"".join(request.wire)), (403, body))
        self.assertEqual(request.headers[b"Content-Length"], str(len(body)).encode())
        self.assertTrue(request.finished)


class FakeLookup:
    """The departure lookups SyncGuard uses, for a user with a fixed forgotten set."""

    def __init__(self, forgotten: AbstractSet[str]) -> None:
        self.forgotten = frozenset(forgotten)

    async def forgotten_rooms(
        self, user_id: str, named: Callable[[], AbstractSet[str]]
    ) -> AbstractSet[str]:
        return self.forgotten

    async def departure(self, user_id: str, room_id: str) -> None:
        return None

    async def token_position(self, token: str) -> int | None:
        return None


class SyncPreCheckTests(SynchronousTestCase):
    """The byte pre-check that lets answers naming no forgotten room pass unparsed."""

    USER = "@u:test.local"
    KEPT = "!kept:test.local"

    def guard(self, forgotten: AbstractSet[str]) -> SyncGuard:
        return SyncGuard(FakeLookup(forgotten))  # type: ignore[arg-type]

    def sync(self, guard: SyncGuard, body: bytes) -> tuple[int, bytes] | None:
        request = mock.Mock(args={})
        return self.successResultOf(
            defer.ensureDeferred(guard.check_sync(request, self.USER, body))
        )

    def notifications(self, guard: SyncGuard, body: bytes) -> tuple[int, bytes] | None:
        return self.successResultOf(
            defer.ensureDeferred(guard.check_notifications(self.USER, body))
        )

    @staticmethod
    def sync_body(*room_ids: str, ensure_ascii: bool = True) -> bytes:
        join = {r: {"timeline": {"events": [{"type": "m.room.message"}]}} for r in room_ids}
        data = {"next_batch": "s1", "rooms": {"join": join}}
        return json.dumps(data, ensure_ascii=ensure_ascii, separators=(",", ":")).encode()

    @staticmethod
    def notifications_body(*room_ids: str, ensure_ascii: bool = True) -> bytes:
        data = {"notifications": [{"room_id": r, "event": {}} for r in room_ids]}
        return json.dumps(data, ensure_ascii=ensure_ascii, separators=(",", ":")).encode()

    def test_answer_without_forgotten_room_is_not_parsed(self) -> None:
        """No forgotten room named and no "leave" section: released without json.loads."""
        guard = self.guard({"!gone:test.local", "!other:test.local"})
        mention = json.dumps({"body": "see !gone:test.local"}).encode()  # not a whole string
        with mock.patch("matrix_leave_forget.history.sync.decode") as loads:
            self.assertIsNone(
                self.sync(guard, self.sync_body(self.KEPT)[:-1] + b"," + b'"x":' + mention + b"}")
            )
            self.assertIsNone(self.notifications(guard, self.notifications_body(self.KEPT)))
            loads.assert_not_called()

    def test_forgotten_room_is_still_taken_out(self) -> None:
        """A forgotten room named in the answer is parsed and removed; other rooms stay."""
        gone = "!gone:test.local"
        guard = self.guard({gone})
        result = self.sync(guard, self.sync_body(self.KEPT, gone))
        assert result is not None
        self.assertEqual(list(json.loads(result[1])["rooms"]["join"]), [self.KEPT])
        result = self.notifications(guard, self.notifications_body(gone, self.KEPT))
        assert result is not None
        kept = [n["room_id"] for n in json.loads(result[1])["notifications"]]
        self.assertEqual(kept, [self.KEPT])

    def test_escaped_room_id_falls_back_to_parsing(self) -> None:
        """A forgotten room id JSON escapes (non-ASCII, quote, backslash, control) is
        found in its escaped form too: the answer is parsed and the room removed."""
        for gone in (
            "!caf\u00e9:test.local",
            '!a"b:test.local',
            "!a\\b:test.local",
            "!a\nb:test.local",
            "!a/b:test.local",
        ):
            for ensure_ascii in (True, False):
                guard = self.guard({gone})
                label = f"{gone!r} ensure_ascii={ensure_ascii}"
                body = self.sync_body(self.KEPT, gone, ensure_ascii=ensure_ascii)
                # The escaped form is what the bytes hold (no plain-text match).
                with mock.patch("matrix_leave_forget.history.sync.decode", wraps=decode) as loads:
                    result = self.sync(guard, body)
                    loads.assert_called_once()
                assert result is not None, label
                self.assertEqual(list(json.loads(result[1])["rooms"]["join"]), [self.KEPT], label)
                body = self.notifications_body(gone, self.KEPT, ensure_ascii=ensure_ascii)
                result = self.notifications(guard, body)
                assert result is not None, label
                kept = [n["room_id"] for n in json.loads(result[1])["notifications"]]
                self.assertEqual(kept, [self.KEPT], label)

    def test_escaped_forgotten_room_not_named_is_not_parsed(self) -> None:
        """An escaped forgotten room id no longer forces a parse: an answer that does
        not name it is released unparsed."""
        guard = self.guard({"!caf\u00e9:test.local", '!a"b:test.local'})
        with mock.patch("matrix_leave_forget.history.sync.decode") as loads:
            self.assertIsNone(self.sync(guard, self.sync_body(self.KEPT)))
            self.assertIsNone(self.notifications(guard, self.notifications_body(self.KEPT)))
            loads.assert_not_called()


class NamedRoomsTests(SynchronousTestCase):
    """named_rooms: every string of an answer that starts with "!", escapes decoded."""

    def test_keys_and_values_in_every_encoding(self) -> None:
        """Room ids as keys and values, ASCII-escaped or not, and "/" written "\\/"."""
        rooms = ["!plain:test.local", "!caf\u00e9:test.local", '!q"uote:x', "!back\\slash:x"]
        for ensure_ascii in (True, False):
            body = json.dumps(
                {"rooms": {r: {"room_id": r} for r in rooms}, "room_ids": rooms},
                ensure_ascii=ensure_ascii,
            ).encode()
            self.assertEqual(named_rooms(body), set(rooms), ensure_ascii)
        self.assertEqual(named_rooms(b'{"room_id":"!a\\/b:x"}'), {"!a/b:x"})
        self.assertEqual(named_rooms(b'{"room_id":"!lone\\ud800:x"}'), {"!lone\ud800:x"})

    def test_text_inside_strings_does_not_hide_a_room(self) -> None:
        """A "!" after an escaped quote inside a message is a false positive at most;
        the room id after it is still found."""
        body = json.dumps(
            {"body": 'say "!hi" and \\"', "x": "!", "room_id": "!r:x", "y": "a!b"}
        ).encode()
        found = named_rooms(body)
        self.assertIn("!r:x", found)
        self.assertIn("!", found)
        self.assertNotIn("a!b", found)
        self.assertEqual(named_rooms(b'{"body":"no rooms here"}'), set())


class ScannedOnceTests(SynchronousTestCase):
    def test_one_check_scans_the_answer_once(self) -> None:
        """A lookup that looks at the answer's rooms (as on a worker) and may_change
        share one scan of the body."""

        class AskingLookup(FakeLookup):
            async def forgotten_rooms(
                self, user_id: str, named: Callable[[], AbstractSet[str]]
            ) -> AbstractSet[str]:
                named()
                return self.forgotten

        guard = SyncGuard(AskingLookup({"!gone:test.local"}))  # type: ignore[arg-type]
        body = SyncPreCheckTests.notifications_body("!kept:test.local")
        with mock.patch("matrix_leave_forget.history.sync.named_rooms", wraps=named_rooms) as scan:
            result = self.successResultOf(
                defer.ensureDeferred(guard.check_notifications("@u:test.local", body))
            )
        self.assertIsNone(result)
        scan.assert_called_once_with(body)


class ScrubCarriedTests(SynchronousTestCase):
    """What a departed user's event may carry in unsigned (and legacy top-level copies)."""

    def event(self, **unsigned: Any) -> dict[str, Any]:
        return {"event_id": "$e", "type": "m.room.message", "content": {}, "unsigned": unsigned}

    def test_earlier_carried_events_stay(self) -> None:
        """Bundles, redactions and replaced state from before the departure are kept as they are."""
        event = self.event(
            age=5,
            redacted_because={"event_id": "$r", "type": "m.room.redaction"},
            redacted_by="$r",
            replaces_state="$old",
            prev_content={"membership": "join"},
            **{
                "m.relations": {
                    "m.thread": {"latest_event": {"event_id": "$t"}, "count": 1},
                    "m.replace": {"event_id": "$edit"},
                    "m.reference": {"chunk": [{"event_id": "$ref"}]},
                }
            },
        )
        before = json.dumps(event, sort_keys=True)
        self.assertEqual(sorted(carried_ids(event)), ["$edit", "$old", "$r", "$r", "$ref", "$t"])
        self.assertFalse(scrub_carried(event, set()))
        self.assertEqual(json.dumps(event, sort_keys=True), before)

    def test_later_carried_events_go(self) -> None:
        """A later redaction, edit, thread reply, reference or replaced state is removed;
        the thread summary goes whole, replaced state takes prev_content with it."""
        event = self.event(
            redacted_because={"event_id": "$r"},
            redacted_by="$r",
            replaces_state="$old",
            prev_content={"membership": "join"},
            prev_sender="@a:x",
            **{
                "m.relations": {
                    "m.thread": {"latest_event": {"event_id": "$t"}, "count": 2},
                    "m.replace": {"event_id": "$edit"},
                    "m.reference": {"chunk": [{"event_id": "$ref"}, {"event_id": "$ok"}]},
                }
            },
        )
        later = {"$r", "$old", "$t", "$edit", "$ref"}
        self.assertTrue(scrub_carried(event, later))
        self.assertEqual(
            event["unsigned"], {"m.relations": {"m.reference": {"chunk": [{"event_id": "$ok"}]}}}
        )

    def test_what_cannot_be_checked_is_removed(self) -> None:
        """Fail closed: id-less bundles (a filter's event_fields), unknown relation kinds
        and unknown unsigned structures or event ids are removed, never passed."""
        event = self.event(
            age=1,
            membership="leave",
            redacted_because={"type": "m.room.redaction", "content": {"reason": "x"}},
            future_field={"event_id": "$f"},
            future_id="$g",
            **{
                "m.relations": {
                    "m.thread": {"latest_event": {"content": {"body": "later"}}, "count": 1},
                    "m.replace": {"content": {}},
                    "m.reference": {"chunk": [{"sender": "@a:x"}]},
                    "m.annotation": {"chunk": [{"key": "+1", "count": 3}]},
                }
            },
        )
        self.assertTrue(scrub_carried(event, set()))
        self.assertEqual(event["unsigned"], {"age": 1, "membership": "leave"})

    def test_legacy_top_level_copies(self) -> None:
        """The legacy event format's top-level redacted_because and replaces_state are checked."""
        event = {
            "event_id": "$e",
            "redacted_because": {"event_id": "$r"},
            "replaces_state": "$old",
            "prev_content": {"membership": "join"},
            "unsigned": {},
        }
        self.assertEqual(sorted(carried_ids(event)), ["$old", "$r"])
        self.assertTrue(scrub_carried(event, {"$r", "$old"}))
        self.assertEqual(event, {"event_id": "$e", "unsigned": {}})


class DepartedLookup(FakeLookup):
    """A user who left LEFT at stream position 10 (not forgotten); $later came after."""

    LEFT = "!left:test.local"

    async def departure(self, user_id: str, room_id: str) -> Any:
        return Departure("$leave", 10, False) if room_id == self.LEFT else None

    async def world_readable(self, room_id: str) -> bool:
        return False

    async def never_member_sees(self, event_ids: Any) -> AbstractSet[str]:
        return frozenset()

    async def stream_orderings(self, event_ids: Any) -> dict[str, int]:
        known = {"$earlier": 5, "$later": 20, "$leave": 10}
        return {i: known[i] for i in event_ids if i in known}


class DepartedRoomStreamTests(SynchronousTestCase):
    """/notifications and /events of a room the user left carry nothing from later."""

    def test_later_redaction_removed_from_notifications_and_stream(self) -> None:
        """An earlier event redacted after the departure loses redacted_because and
        redacted_by; the same event of a joined room keeps them."""
        left, joined = DepartedLookup.LEFT, "!joined:test.local"
        guard = SyncGuard(DepartedLookup(frozenset()))  # type: ignore[arg-type]

        def event(room_id: str) -> dict[str, Any]:
            return {
                "event_id": "$earlier",
                "room_id": room_id,
                "content": {},
                "redacted_because": {"event_id": "$later", "content": {"reason": "secret"}},
                "unsigned": {"redacted_by": "$later", "age": 1},
            }

        body = json.dumps(
            {"notifications": [{"room_id": r, "event": event(r)} for r in (left, joined)]}
        ).encode()
        result = self.successResultOf(
            defer.ensureDeferred(guard.check_notifications("@u:test.local", body))
        )
        assert result is not None
        left_event, joined_event = (n["event"] for n in json.loads(result[1])["notifications"])
        self.assertNotIn("$later", json.dumps(left_event))
        self.assertEqual(left_event["unsigned"], {"age": 1})
        self.assertEqual(joined_event, event(joined))
        stream = json.dumps({"chunk": [event(left), event(joined)]}).encode()
        result = self.successResultOf(
            defer.ensureDeferred(guard.check_event_stream("@u:test.local", stream))
        )
        assert result is not None
        chunk = json.loads(result[1])["chunk"]
        self.assertNotIn("$later", json.dumps(chunk[0]))
        self.assertEqual(chunk[1], event(joined))


class RoomLookup:
    """The lookups RoomReadGuard uses: one departure at position 10, events by position,
    and which of them a never-member may see."""

    def __init__(self, forgotten: bool, world_readable_now: bool, anyone_sees: set[str]) -> None:
        self.forgotten = forgotten
        self.world_readable_now = world_readable_now
        self.anyone_sees = anyone_sees
        self.positions = {"$pre": 5, "$leave": 10, "$post": 15, "$open": 20}

    async def departure(self, user_id: str, room_id: str) -> Departure:
        return Departure("$leave", 10, self.forgotten)

    async def stream_orderings(self, event_ids: Any) -> dict[str, int]:
        return {e: self.positions[e] for e in event_ids if e in self.positions}

    async def never_member_sees(self, event_ids: Any) -> AbstractSet[str]:
        return {e for e in event_ids if e in self.anyone_sees}

    async def world_readable(self, room_id: str) -> bool:
        return self.world_readable_now


class RoomReadRuleTests(SynchronousTestCase):
    """The rule of docs/history.md on room reads: per event, never from current state."""

    ROOM = "!r:test.local"
    CHUNK = {
        "chunk": [{"event_id": e, "type": "m.room.message"} for e in ("$pre", "$post", "$open")]
    }

    def check(
        self, lookup: RoomLookup, endpoint: str, data: dict[str, Any], **args: bytes
    ) -> tuple[int, Any] | None:
        guard = RoomReadGuard(lookup)  # type: ignore[arg-type]
        request = mock.Mock(args={k.encode(): [v] for k, v in args.items()})
        body = json.dumps(data).encode()
        result = self.successResultOf(
            defer.ensureDeferred(guard.check(request, "@u:test.local", self.ROOM, endpoint, body))
        )
        return None if result is None else (result[0], json.loads(result[1]))

    def ids(self, result: tuple[int, Any] | None) -> list[str]:
        assert result is not None
        return [e["event_id"] for e in result[1]["chunk"]]

    def test_after_leave_what_anyone_may_see_stays(self) -> None:
        """Not forgotten: later events go unless world_readable at the event."""
        result = self.check(RoomLookup(False, False, {"$open"}), "messages", self.CHUNK, dir=b"f")
        self.assertEqual(self.ids(result), ["$pre", "$open"])

    def test_after_forget_room_reads_are_refused_unless_world_readable_now(self) -> None:
        """Forgotten, the room not world_readable now: /messages is a never-member's 403,
        although one event was world_readable when sent."""
        result = self.check(RoomLookup(True, False, {"$open"}), "messages", self.CHUNK)
        assert result is not None
        self.assertEqual((result[0], result[1]["errcode"]), (403, "M_FORBIDDEN"))

    def test_after_forget_world_readable_now_serves_only_what_anyone_may_see(self) -> None:
        """Forgotten, the room world_readable now: the earlier history is gone, the events
        world_readable when sent stay (the current visibility opens nothing before it)."""
        result = self.check(RoomLookup(True, True, {"$open"}), "messages", self.CHUNK)
        self.assertEqual(self.ids(result), ["$open"])

    def test_after_forget_context_per_event(self) -> None:
        """Forgotten: /context of an event anyone may see is served without the rest;
        of any other event, refused as to a never-member."""
        context = {
            "event": {"event_id": "$open", "type": "m.room.message"},
            "events_before": [{"event_id": "$pre", "type": "m.room.message"}],
            "events_after": [],
            "state": [],
        }
        result = self.check(RoomLookup(True, False, {"$open"}), "context", context)
        assert result is not None
        self.assertEqual((result[0], result[1]["events_before"]), (200, []))
        result = self.check(RoomLookup(True, False, set()), "context", context)
        assert result is not None
        self.assertEqual((result[0], result[1]["errcode"]), (403, "M_FORBIDDEN"))
