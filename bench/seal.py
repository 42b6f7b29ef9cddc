"""Sealing 10^5 audit entries in process: one signature per entry vs one per group.

What the retention sweep's audit step costs in CPU, without Synapse or a
database: the first format (``seal_entry`` for every entry: canonical JSON,
SHA-256, ed25519) against the group format (``seal_entries`` per 1000, as
``decide_due`` writes them: the same hashing, one signature per group). The
two are interleaved, round after round, so that load from other jobs on the
machine hits both alike; the median round is reported.

Usage::

    python bench/seal.py [--entries 100000] [--group 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from signedjson.key import generate_signing_key  # noqa: E402

from matrix_leave_forget.audit import (  # noqa: E402
    FORMAT_GROUP,
    GENESIS_HASH,
    escape_fields,
    seal_entries,
    seal_entry,
)

ORIGIN = "test.local"


def fields(i: int) -> Dict[str, Any]:
    return {
        "ts": 1_700_000_000_000 + i,
        "origin": ORIGIN,
        "instance": "master",
        "action": "purge",
        "user_id": None,
        "room_id": f"!room{i:08d}abcdefgh:{ORIGIN}",
        "reason": None,
        "event_id": None,
        "device_id": None,
        "outcome": "dry_run",
    }


def per_entry(n: int, key: Any) -> float:
    started = time.perf_counter()
    prev = GENESIS_HASH
    for i in range(n):
        entry = seal_entry({**fields(i), "seq": i + 1, "prev_hash": prev}, ORIGIN, key)
        prev = entry["hash"]
    return time.perf_counter() - started


def per_group(n: int, group: int, key: Any) -> float:
    started = time.perf_counter()
    seq, prev = 0, GENESIS_HASH
    while seq < n:
        size = min(group, n - seq)
        entries = seal_entries(
            [escape_fields(fields(seq + i)) for i in range(size)], seq, prev, ORIGIN, key
        )
        seq, prev = entries[-1]["seq"], entries[-1]["hash"]
        assert entries[-1]["format"] == FORMAT_GROUP
    return time.perf_counter() - started


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    key = generate_signing_key("bench")
    old: List[float] = []
    new: List[float] = []
    for _ in range(args.rounds):
        old.append(per_entry(args.entries, key))
        new.append(per_group(args.entries, args.group, key))
    o, g = statistics.median(old), statistics.median(new)
    print(f"{args.entries} entries, median of {args.rounds} interleaved rounds:")
    print(
        f"  one signature per entry:            {o:.2f} s ({o / args.entries * 1e6:.1f} µs/entry)"
    )
    print(
        f"  one signature per {args.group} (format 2): {g:.2f} s ({g / args.entries * 1e6:.1f} µs/entry)"
    )
    print(f"  ratio group/entry: {g / o:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
