"""Canonical JSON of an entry's hashed body, several times faster than canonicaljson.

An entry's hash is the SHA-256 of ``canonicaljson.encode_canonical_json`` of its
body; that definition does not change here. ``verify`` encodes every entry of
the log, and canonicaljson (the standard library's pure-Python encoder with
sorted keys) costs most of a check. orjson with sorted keys writes the same
bytes for the values an entry body holds:

* a flat dict with str keys, and values of exactly str, int, bool or None;
* keys sorted by code point (orjson compares their UTF-8, which orders the same);
* no whitespace, non-ASCII written as UTF-8, and the same escapes: ``\\"``,
  ``\\\\``, ``\\b \\f \\n \\r \\t``, other characters below U+0020 as ``\\u00xx``
  (lowercase hex), nothing else escaped (not U+007F, not U+2028/U+2029);
* integers in decimal.

Anything else takes canonicaljson's path, which then gives canonicaljson's bytes
or raises canonicaljson's error: a float (orjson writes NaN as null where
canonicaljson refuses it), a subclass of str, int or dict, a nested container,
a type orjson writes and the standard library refuses (datetime, UUID, enum,
dataclass), and whatever orjson itself refuses (an integer beyond 64 bits, a
lone surrogate). ``tests/unit/test_canonical.py`` checks the byte identity on
every code point and on generated hostile bodies.
"""

from collections.abc import Mapping
from typing import Any

import orjson
from canonicaljson import encode_canonical_json

# The value types whose orjson encoding is the standard library's (exact types:
# subclasses fall back, bool is listed on its own).
_SAME_TYPES = frozenset({str, int, bool, type(None)})
_OPTIONS = orjson.OPT_SORT_KEYS


def encode_canonical(body: Mapping[str, Any]) -> bytes:
    """``canonicaljson.encode_canonical_json(body)``, byte for byte, faster for flat bodies.

    Raises:
        Whatever canonicaljson raises for body (e.g. UnicodeEncodeError on a lone
        surrogate, ValueError on NaN, TypeError on an unknown type).
    """
    if type(body) is dict and _SAME_TYPES.issuperset(map(type, body.values())):
        try:
            return orjson.dumps(body, option=_OPTIONS)
        except orjson.JSONEncodeError:
            # A non-str key, an integer beyond 64 bits, a lone surrogate:
            # canonicaljson decides (its bytes, or its error).
            pass
    return encode_canonical_json(body)
