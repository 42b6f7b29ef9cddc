"""Unit tests of the history guard's routing, response capture and config key."""

import json
from typing import Any, Dict, List, Optional, Tuple

from synapse.module_api.errors import ConfigError
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.config import parse_config
from matrix_leave_forget.history_guard import Route, capture, classify


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


class ClassifyTests(SynchronousTestCase):
    def test_guarded_reads(self) -> None:
        """Room reads under every client prefix (ids percent-decoded), sync, notifications."""
        room = "%21abc%3Atest.local"
        for prefix in ("api/v1", "r0", "v3", "unstable", "v1", "unstable/org.matrix.msc2836"):
            for tail, endpoint in (
                ("messages", "messages"),
                ("context/%24e", "context"),
                ("event/%24e", "event"),
                ("relations/%24e/m.thread/m.room.message", "relations"),
                ("threads", "threads"),
            ):
                path = f"/_matrix/client/{prefix}/rooms/{room}/{tail}".encode()
                for method in (b"GET", b"HEAD"):
                    self.assertEqual(
                        classify(method, path), Route("room", "!abc:test.local", endpoint), path
                    )
        self.assertEqual(classify(b"GET", b"/_matrix/client/v3/sync"), Route("sync"))
        self.assertEqual(
            classify(b"GET", b"/_matrix/client/r0/notifications").kind, "notifications"
        )  # type: ignore[union-attr]
        self.assertEqual(classify(b"GET", b"/_matrix/client/api/v1/events"), Route("events"))
        self.assertEqual(
            classify(b"GET", b"/_matrix/client/api/v1/events/%24e"),
            Route("legacy_event", endpoint="legacy_event"),
        )
        self.assertEqual(
            classify(b"POST", b"/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"),
            Route("sliding_sync"),
        )

    def test_everything_else_passes(self) -> None:
        """Writes, OPTIONS, other paths and near-misses are not guarded."""
        for method, path in (
            (b"OPTIONS", b"/_matrix/client/v3/sync"),
            (b"POST", b"/_matrix/client/v3/sync"),
            (b"PUT", b"/_matrix/client/v3/rooms/%21a/send/m.room.message/1"),
            (b"GET", b"/_matrix/client/v3/rooms/%21a/state"),
            (b"GET", b"/_matrix/client/v3/rooms/%21a/members"),
            (b"GET", b"/_matrix/client/v3/rooms/%21a/messagesx"),
            (b"GET", b"/_matrix/federation/v1/event/%24e"),
            (b"GET", b"/_matrix/client/v3/syncx"),
        ):
            self.assertIsNone(classify(method, path), path)


class FakeRequest:
    """What capture touches of a SynapseRequest, recording what reaches the wire."""

    def __init__(self) -> None:
        self.code = 200
        self.headers: Dict[bytes, bytes] = {b"Content-Length": b"7"}
        self.wire: List[bytes] = []
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
        self, chunks: List[bytes], replacement: Optional[Tuple[int, bytes]]
    ) -> Tuple[FakeRequest, List[Any]]:
        request = FakeRequest()
        seen: List[Any] = []

        async def check(code: int, body: bytes) -> Optional[Tuple[int, bytes]]:
            seen.append((code, body))
            return replacement

        capture(request, check)
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

    def test_replacement_sets_status_and_length(self) -> None:
        """A replaced answer goes out with its own status and Content-Length."""
        body = json.dumps({"errcode": "M_FORBIDDEN", "error": "x"}).encode()
        request, _ = self.run_capture([b"{}"], (403, body))
        self.assertEqual((request.code, b"".join(request.wire)), (403, body))
        self.assertEqual(request.headers[b"Content-Length"], str(len(body)).encode())
        self.assertTrue(request.finished)
