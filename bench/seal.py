"""Sealing 10^5 audit entries in process: one signature per entry vs one per group.

What the retention sweep's audit step costs, without Synapse: the first format
(``seal_entry`` for every entry: canonical JSON, SHA-256, ed25519) against the
group format (``seal_entries`` per 1000, as ``decide_due`` writes them: the
same hashing, one signature per group) — CPU only, and with ``--sqlite`` each
group also inserted and committed into a SQLite file with the module's schema
(as ``AuditLog.append_many_txn`` does). The two are interleaved, round after round, so
that load from other jobs on the machine hits both alike; the median round is
reported.

Usage::

    python bench/seal.py [--entries 100000] [--group 1000] [--rounds 5] [--sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from signedjson.key import generate_signing_key  # noqa: E402

from matrix_leave_forget.audit.entry import (  # noqa: E402
    GENESIS_HASH,
    GROUP_FORMATS,
    escape_fields,
    seal_entries,
    seal_entry,
)
from matrix_leave_forget.audit.log import AUDIT_COLUMNS, STORED_COLUMNS  # noqa: E402
from matrix_leave_forget.db.schema import MIGRATIONS  # noqa: E402

ORIGIN = "test.local"


class Sink:
    """A SQLite file with the module's tables; insert() commits one group as one transaction."""

    def __init__(self, directory: str, name: str) -> None:
        self.conn = sqlite3.connect(os.path.join(directory, name))
        for migration in MIGRATIONS:
            for statement in migration:
                self.conn.execute(statement)
        self.conn.commit()

    def insert(self, entries: list[dict[str, Any]], columns: Sequence[str]) -> None:
        self.conn.executemany(
            f"INSERT INTO leave_forget_audit ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})",
            [
                [
                    json.dumps(e[c], sort_keys=True) if c == "signatures" else e.get(c)
                    for c in columns
                ]
                for e in entries
            ],
        )
        self.conn.commit()

    def reset(self) -> None:
        self.conn.execute("DELETE FROM leave_forget_audit")
        self.conn.commit()


def fields(i: int) -> dict[str, Any]:
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


def per_entry(n: int, group: int, key: Any, sink: Sink | None) -> float:
    """The first format, as the module wrote it before: every entry signed."""
    if sink is not None:
        sink.reset()
    started = time.perf_counter()
    prev = GENESIS_HASH
    for start in range(0, n, group):
        entries = []
        for i in range(start, min(n, start + group)):
            entry = seal_entry({**fields(i), "seq": i + 1, "prev_hash": prev}, ORIGIN, key)
            prev = entry["hash"]
            entries.append(entry)
        if sink is not None:
            sink.insert(entries, AUDIT_COLUMNS)
    return time.perf_counter() - started


def per_group(n: int, group: int, key: Any, sink: Sink | None) -> float:
    """Format 2: one signature per group."""
    if sink is not None:
        sink.reset()
    started = time.perf_counter()
    seq, prev = 0, GENESIS_HASH
    while seq < n:
        size = min(group, n - seq)
        entries = seal_entries(
            [escape_fields(fields(seq + i)) for i in range(size)], seq, prev, ORIGIN, key
        )
        seq, prev = entries[-1]["seq"], entries[-1]["hash"]
        assert entries[-1]["format"] in GROUP_FORMATS
        if sink is not None:
            sink.insert(entries, STORED_COLUMNS)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sqlite", action="store_true", help="also insert into SQLite")
    args = parser.parse_args(argv)
    key = generate_signing_key("bench")
    old: list[float] = []
    new: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        sinks = (
            (Sink(directory, "old.db"), Sink(directory, "new.db")) if args.sqlite else (None, None)
        )
        for _ in range(args.rounds):
            old.append(per_entry(args.entries, args.group, key, sinks[0]))
            new.append(per_group(args.entries, args.group, key, sinks[1]))
    o, g = statistics.median(old), statistics.median(new)
    what = "sealed and inserted into SQLite" if args.sqlite else "sealed (CPU only)"
    print(f"{args.entries} entries {what}, median of {args.rounds} interleaved rounds:")
    for label, seconds in (("per entry", o), (f"per {args.group} (format 2)", g)):
        per = seconds / args.entries * 1e6
        print(f"  one signature {label}: {seconds:.2f} s ({per:.1f} µs/entry)")
    print(f"  ratio group/entry: {g / o:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
