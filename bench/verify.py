"""``verify`` speed: entries/s of a full and an incremental check, 10^5 and 10^6 entries.

Builds a SQLite file with the module's tables holding N group-sealed entries
(leave entries with reasons, device ids, via and event_ts, one signature per
``--group``, as the group commit and the sweep write them), once per N (kept in
``--cache``), then times, through the CLI's own ``verify_database`` on a
read-only connection:

* **full**: every entry from the genesis;
* **incremental**: from a head recorded ``--new`` entries before the end
  (``verify --since SEQ:HASH``), which must cost O(new entries) whatever N.

Usage::

    python bench/verify.py [--sizes 100000,1000000] [--new 10000] [--group 100] [--rounds 3]
        [--jobs 1,2] [--baseline]

CPU seconds include the worker processes of a parallel check (``--jobs``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from canonicaljson import encode_canonical_json  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

import matrix_leave_forget.audit.entry as entry_module  # noqa: E402
from matrix_leave_forget.audit.canonical import encode_canonical  # noqa: E402
from matrix_leave_forget.audit.entry import (  # noqa: E402
    GENESIS_HASH,
    escape_fields,
    seal_entries,
    verify_keys_from_signing_key,
)
from matrix_leave_forget.audit.log import STORED_COLUMNS  # noqa: E402
from matrix_leave_forget.cli.database import Database  # noqa: E402
from matrix_leave_forget.cli.verify import verify_database  # noqa: E402
from matrix_leave_forget.db.schema import MIGRATIONS  # noqa: E402

ORIGIN = "test.local"
# A fixed seed, so that a cached file matches the key the next run derives.
SEED = b"matrix-leave-forget verify bench"


def fields(i: int) -> dict[str, Any]:
    """A leave entry, as the module's endpoint writes one."""
    return {
        "ts": 1_700_000_000_000 + i,
        "origin": ORIGIN,
        "instance": "master",
        "action": "leave",
        "user_id": f"@user{i % 5000:05d}:{ORIGIN}",
        "room_id": f"!room{i:08d}abcdefghij:{ORIGIN}",
        "reason": "Off to bed" if i % 3 == 0 else None,
        "event_id": f"$event{i:012d}abcdefghijklmnopqrstuvwxyz0123",
        "device_id": "ABCDEFGHIJ",
        "outcome": "ok",
        "via": "api",
        "event_ts": 1_700_000_000_000 + i,
    }


def build(path: str, n: int, group: int, key: Any) -> None:
    """Write n group-sealed entries into a new SQLite file at path."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    conn = sqlite3.connect(tmp)
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    insert = (
        f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in STORED_COLUMNS)})"
    )
    seq, prev = 0, GENESIS_HASH
    while seq < n:
        size = min(group, n - seq)
        entries = seal_entries(
            [escape_fields(fields(seq + i)) for i in range(size)], seq, prev, ORIGIN, key
        )
        seq, prev = entries[-1]["seq"], entries[-1]["hash"]
        conn.executemany(
            insert,
            [
                [json.dumps(e[c]) if c == "signatures" else e.get(c) for c in STORED_COLUMNS]
                for e in entries
            ],
        )
    conn.commit()
    conn.close()
    os.rename(tmp, path)


def head_at(path: str, seq: int) -> tuple[int, str]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT seq, hash FROM leave_forget_audit WHERE seq = ?", (seq,)
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]), str(row[1])


def open_db(path: str, _snapshot: str | None = None) -> Database:
    """A read-only connection in its own read transaction, as the CLI opens one."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.execute("BEGIN")
    return Database(conn, "?", path, lambda snapshot: open_db(path, snapshot))


def cpu_seconds() -> float:
    """CPU seconds of this process and of its (waited-for) worker processes."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(
    path: str, key: Any, since: tuple[int, str] | None, jobs: int = 1
) -> tuple[float, float, int]:
    """Wall and CPU seconds (workers included) of one verify_database run on a fresh
    read-only connection, and the entries it checked."""
    db = open_db(path)
    started, cpu = time.perf_counter(), cpu_seconds()
    result = verify_database(
        db, ORIGIN, verify_keys_from_signing_key(key), None, since=since, jobs=jobs
    )
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    db.close()
    if not result.ok:
        raise SystemExit(f"verify failed on the bench file {path}: {result.problem}")
    return seconds, cpu, result.checked - (since[0] if since else 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--new", type=int, default=10_000, help="entries after the recorded head")
    parser.add_argument("--group", type=int, default=100, help="entries per signature")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", default="1,2", help="worker processes of the full check")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time a full check hashing through canonicaljson (the encoder before orjson)",
    )
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "mlf-bench-verify"))
    args = parser.parse_args(argv)
    # A fixed key, so that a cached file verifies on the next run.
    key = SigningKey(SEED)
    key.alg, key.version = "ed25519", "bench"
    os.makedirs(args.cache, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.2f}; group of {args.group} per signature")
    # On a shared machine the wall clock measures the other jobs too: the CPU
    # time this process got is printed beside it.
    print(
        f"{'entries':>10} {'mode':>12} {'checked':>9} {'wall s':>8} {'entries/s':>10} "
        f"{'CPU s':>8} {'entries/CPU s':>14}"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        path = os.path.join(args.cache, f"audit-{n}-g{args.group}.db")
        if not os.path.exists(path):
            started = time.perf_counter()
            build(path, n, args.group, key)
            print(f"(built {path} in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
        since = head_at(path, n - args.new)
        modes: list[tuple[str, tuple[int, str] | None, int, bool]] = [
            (f"full j={jobs}", None, int(jobs), False) for jobs in args.jobs.split(",")
        ]
        if args.baseline:
            modes.append(("full canonjs", None, 1, True))
        modes.append(("incremental", since, 1, False))
        for mode, start, jobs, baseline in modes:
            if baseline:
                entry_module.encode_canonical = encode_canonical_json
            try:
                runs = [timed(path, key, start, jobs) for _ in range(args.rounds)]
            finally:
                entry_module.encode_canonical = encode_canonical
            wall = statistics.median(run[0] for run in runs)
            cpu = statistics.median(run[1] for run in runs)
            checked = runs[0][2]
            print(
                f"{n:>10} {mode:>12} {checked:>9} {wall:>8.3f} {checked / wall:>10.0f} "
                f"{cpu:>8.3f} {checked / cpu:>14.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
