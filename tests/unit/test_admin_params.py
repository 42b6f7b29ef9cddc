"""The admin API's parameter parsing, in process (no Synapse): every bad value is a 400
with ``M_INVALID_PARAM`` (413 ``M_TOO_LARGE`` for a hold reason over an event's size),
never a 500. tests/integration/test_admin_input.py sends the same values to a real
Synapse, and fuzzes them."""

import io
import json
from typing import Any

from synapse.module_api.errors import Codes, SynapseError
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.db.schema import MAX_INT_ARG
from matrix_leave_forget.http.admin import (
    MAX_LIMIT,
    MAX_STORED_REASON_BYTES,
    MAX_STR_ARG,
    hold_reason,
    int_arg,
    limit_arg,
    room_arg,
    str_arg,
)


class FakeRequest:
    """What the parsers read of a SynapseRequest: the query and the body."""

    method = b"PUT"
    uri = b"/_synapse/client/leave_forget/v1/admin/rooms/x/hold"

    def __init__(self, args: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.args = {
            k.encode(): [v.encode("utf-8", "surrogatepass")] for k, v in (args or {}).items()
        }
        self.content = io.BytesIO(body)


def request(**args: str) -> Any:
    return FakeRequest(args)


class ParameterTests(SynchronousTestCase):
    """Each parser's accepted values and its answer to each bad one."""

    def assertBad(
        self, call: Any, message: str, code: int = 400, errcode: str = Codes.INVALID_PARAM
    ) -> None:
        with self.assertRaises(SynapseError) as raised:
            call()
        self.assertEqual((raised.exception.code, raised.exception.errcode), (code, errcode))
        self.assertIn(message, raised.exception.msg)

    def test_int_arg(self) -> None:
        """ASCII digits from 0 to MAX_INT_ARG; absent gives the default."""
        self.assertEqual(int_arg(request(), "since", None), None)
        self.assertEqual(int_arg(request(), "from", 0), 0)
        self.assertEqual(int_arg(request(since="0"), "since", None), 0)
        self.assertEqual(int_arg(request(since=str(MAX_INT_ARG)), "since", None), MAX_INT_ARG)
        too_big = str(MAX_INT_ARG + 1)
        self.assertBad(lambda: int_arg(request(since=too_big), "since", None), "at most")
        self.assertBad(lambda: int_arg(request(since="9" * 500), "since", None), "at most")
        self.assertBad(lambda: int_arg(request(since="-1"), "since", None), "must not be negative")
        for bad in ("", " 1", "1_000", "1.5", "١٢", "0x10", "1e3"):
            self.assertBad(lambda bad=bad: int_arg(request(since=bad), "since", None), "integer")

    def test_str_arg(self) -> None:
        """Any text up to MAX_STR_ARG characters, without NUL."""
        self.assertEqual(str_arg(request(user_id="@a:b"), "user_id"), "@a:b")
        self.assertEqual(str_arg(request(user_id="x" * MAX_STR_ARG), "user_id"), "x" * MAX_STR_ARG)
        too_long = "x" * (MAX_STR_ARG + 1)
        self.assertBad(lambda: str_arg(request(user_id=too_long), "user_id"), "too long")
        self.assertBad(lambda: str_arg(request(user_id="a\x00b"), "user_id"), "NUL")

    def test_limit_arg(self) -> None:
        """1 to MAX_LIMIT, 100 when absent."""
        self.assertEqual(limit_arg(request()), 100)
        self.assertEqual(limit_arg(request(limit="1")), 1)
        self.assertEqual(limit_arg(request(limit=str(MAX_LIMIT))), MAX_LIMIT)
        for bad in ("0", str(MAX_LIMIT + 1)):
            self.assertBad(lambda bad=bad: limit_arg(request(limit=bad)), "between 1 and")

    def test_room_arg(self) -> None:
        """A percent-encoded room id, decoded (with or without a server name, as room
        version 12 ids have none); anything else is refused."""
        self.assertEqual(room_arg("%21room%3Aexample.org"), "!room:example.org")
        self.assertEqual(room_arg("%21room"), "!room")
        for bad in ("room", "", "@user%3Aexample.org", "%21" + "x" * 255):
            self.assertBad(lambda bad=bad: room_arg(bad), "is not a room id")

    def test_hold_reason(self) -> None:
        """A JSON string up to an event's size (any text), or absent; else a clear error."""

        def body(value: Any) -> Any:
            return FakeRequest(body=json.dumps(value).encode())

        self.assertIsNone(hold_reason(FakeRequest()))
        self.assertIsNone(hold_reason(body({})))
        self.assertEqual(hold_reason(body({"reason": "audit \x00 \ud800"})), "audit \x00 \ud800")
        limit = "x" * MAX_STORED_REASON_BYTES
        self.assertEqual(hold_reason(body({"reason": limit})), limit)
        over = body({"reason": limit + "x"})
        self.assertBad(lambda: hold_reason(over), "at most", 413, Codes.TOO_LARGE)
        not_text = body({"reason": 5})
        self.assertBad(lambda: hold_reason(not_text), "must be a string", errcode=Codes.BAD_JSON)
