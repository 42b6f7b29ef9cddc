"""The history guard's JSON codec: orjson's speed, the standard library's reach."""

import json

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.history.json_codec import decode, encode


class JsonCodecTests(SynchronousTestCase):
    def test_round_trip_is_compact_utf8(self) -> None:
        """An ordinary answer comes back as compact UTF-8 JSON, keys in their order,
        non-ASCII text unescaped (as Synapse writes it)."""
        body = '{"b":1,"a":["é",{"x":null,"y":true}],"f":1.5}'.encode()
        self.assertEqual(encode(decode(body)), body)

    def test_what_orjson_refuses_still_parses(self) -> None:
        """Lone surrogate escapes and integers beyond 64 bits, which orjson refuses,
        are read by the standard library instead, and written back as JSON that
        parses to the same values."""
        body = b'{"text":"a\\ud800b","big":123456789012345678901234567890}'
        data = decode(body)
        self.assertEqual(data, {"text": "a\ud800b", "big": 123456789012345678901234567890})
        self.assertEqual(json.loads(encode(data)), data)

    def test_invalid_json_raises_value_error(self) -> None:
        """Invalid JSON raises ValueError, as json.loads does (the guard then fails closed)."""
        with self.assertRaises(ValueError):
            decode(b'{"a":')
