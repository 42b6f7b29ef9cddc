"""JSON for the answers the history guard rewrites: orjson, with the standard library as the net.

A rewritten answer (a /sync, sliding-sync or /notifications answer naming a
forgotten room, a room read with later events) is parsed and encoded again on
the request's path. orjson does both several times faster than the standard
library (for a 19 kB /notifications page: 66 µs instead of 175 µs to parse,
13 µs instead of 267 µs to encode), which is what the guard's cost on such
answers is made of (docs/benchmarks.md §6).
"""

import json
from typing import Any

import orjson


def decode(body: bytes) -> Any:
    """Parse an answer Synapse encoded."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # JSON that orjson refuses and Python reads: lone surrogate escapes,
        # integers beyond 64 bits. Invalid JSON raises ValueError here too.
        return json.loads(body)


def encode(data: Any) -> bytes:
    """Encode a rewritten answer as compact UTF-8 JSON, as Synapse does."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        # Values orjson cannot write (integers beyond 64 bits, lone surrogates):
        # escaped to ASCII, which every JSON reader takes.
        return json.dumps(data, separators=(",", ":")).encode("ascii")
