"""The fast canonical JSON of entry bodies is canonicaljson's, byte for byte.

An entry's hash is defined on ``canonicaljson.encode_canonical_json``; ``verify``
and the writers hash through ``audit.canonical.encode_canonical`` (orjson where
it writes the same bytes). A single differing byte would make every verify
report good entries as edited, or the writers seal entries other verifiers
reject: these tests compare the two on every code point and on generated
hostile bodies, and check that what canonicaljson refuses is still refused.
"""

import datetime
import enum
import uuid
from typing import Any

from canonicaljson import encode_canonical_json
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.audit.canonical import encode_canonical


def _outcome(encode: Any, body: Any) -> tuple[str, Any]:
    """("bytes", the encoding) or ("error", the exception's type)."""
    try:
        return "bytes", encode(body)
    except Exception as exc:
        return "error", type(exc)


class CanonicalTests(SynchronousTestCase):
    def assertSame(self, body: Any) -> None:
        self.assertEqual(
            _outcome(encode_canonical, body), _outcome(encode_canonical_json, body), repr(body)
        )

    def test_every_code_point_in_values_and_keys(self) -> None:
        """Each code point except the surrogates, inside a value and as a key (sorted
        against an ASCII key), encodes to canonicaljson's bytes: same escapes of
        control characters, quote and backslash, nothing else escaped (U+007F,
        U+2028/2029 included), UTF-8 otherwise, same key order."""
        points = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
        for start in range(0, len(points), 512):
            block = points[start : start + 512]
            body: dict[str, Any] = {chr(cp): f"a{chr(cp)}b" for cp in block}
            body["k"] = "".join(map(chr, block))
            self.assertEqual(encode_canonical(body), encode_canonical_json(body), hex(block[0]))

    def test_lone_surrogates_raise_canonicaljsons_error(self) -> None:
        """A lone surrogate (which orjson refuses) raises what canonicaljson raises:
        UnicodeEncodeError, in a value or a key, high, low or a split pair."""
        for text in ("\ud800", "a\udfffb", "\ud83d\ude00", "x\udc00\ud800"):
            for body in ({"a": text}, {text: 1}):
                with self.assertRaises(UnicodeEncodeError):
                    encode_canonical(body)
                self.assertSame(body)

    def test_integers_at_and_beyond_64_bits(self) -> None:
        """Integers at the edges of 64 bits and beyond (orjson refuses those) encode as
        canonicaljson writes them."""
        for value in (0, -1, 2**53, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1):
            self.assertSame({"n": value})
            self.assertSame({"n": 10**400 * (1 if value >= 0 else -1)})

    def test_other_types_fall_back(self) -> None:
        """Floats (NaN is refused, not written as null), subclasses, nested containers,
        non-str keys, and types orjson writes but the standard library refuses
        (datetime, UUID, enum): canonicaljson's bytes or canonicaljson's error."""

        class Text(str):
            pass

        class Number(int):
            pass

        class Colour(enum.Enum):
            RED = "red"

        class Level(enum.IntEnum):
            HIGH = 3

        for value in (
            1.5,
            1e16,
            float("nan"),
            float("inf"),
            Text("x"),
            Number(7),
            Colour.RED,
            Level.HIGH,
            datetime.datetime(2026, 1, 1),
            uuid.UUID(int=1),
            [1, "a", None],
            {"b": 1, "a": [2]},
            (1, 2),
        ):
            self.assertSame({"v": value})
        self.assertSame({1: "a", "b": 2})
        self.assertSame({"b": 1, "a": 2}.items())

    def test_megabyte_strings(self) -> None:
        """Strings of a megabyte and more (ASCII, escapes, astral) encode identically."""
        self.assertSame({"r": "x" * (1 << 20)})
        self.assertSame({"r": '\x00\n"\\\u2028é' * (1 << 18)})
        self.assertSame({"r": "\U0001f600" * (1 << 18), "a": "\x1f" * (1 << 20)})

    def test_generated_hostile_bodies(self) -> None:
        """Generated flat bodies (any text including NUL, control characters and lone
        surrogates; integers of any size; bools, None, floats) encode to
        canonicaljson's bytes, or raise canonicaljson's error."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        text = st.text(
            alphabet=st.one_of(
                st.characters(codec=None),
                st.sampled_from(["\x00", "\x7f", "\u2028", "\u2029", "\ud800", "\udfff", '"']),
            ),
            max_size=40,
        )
        values = st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(),
            text,
        )

        @settings(max_examples=1000, derandomize=True, deadline=None, database=None)
        @given(st.dictionaries(text, values, max_size=20))
        def check(body: dict[str, Any]) -> None:
            self.assertSame(body)

        check()
