"""The module's start-up work at 10^6 local memberships: the catch-up (reconcile.py).

A stopped Synapse is seeded with memberships (bench/seed.py), then started; the
module logs how long its start-up catch-up took and how many departures it
read. Then Synapse runs without the module while ``--departures`` leaves
happen, and starts with it again: the catch-up reads exactly those. While the
module starts, a client request (``GET /_matrix/client/v3/user/{id}/filter``
creation) is timed, to show nothing waits for it.

Usage::

    python bench/startup.py [--quick] [--database sqlite|postgres|both] [--departures 100]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log, machine, table, write_json  # noqa: E402
from bench.seed import Sink, fresh_synapse, seed_memberships  # noqa: E402

_CATCH_UP = re.compile(
    r"Start-up catch-up read (\d+) departure\(s\) up to stream position (\d+) in ([\d.]+) ms"
)


def catch_ups(hs: Any) -> list[dict[str, float]]:
    return [
        {"read": int(m.group(1)), "position": int(m.group(2)), "ms": float(m.group(3))}
        for m in _CATCH_UP.finditer(hs.log_text())
    ]


def start_and_time(hs: Any, admin: Any) -> dict[str, Any]:
    """Start hs; time client requests made while the module starts up."""
    before = len(catch_ups(hs))
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                resp = hs.client(
                    "POST",
                    f"/_matrix/client/v3/user/{admin.user_id}/filter",
                    {"room": {"timeline": {"limit": 1}}},
                    token=admin.access_token,
                    timeout=30,
                )
            except OSError:
                time.sleep(0.01)  # not listening yet
                continue
            if resp.status == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    hs.start(timeout=300)
    deadline = time.monotonic() + 300
    while len(catch_ups(hs)) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join()
    result = catch_ups(hs)[-1]
    return {
        **result,
        "probe_requests": len(latencies),
        "probe_max_ms": round(max(latencies), 1) if latencies else None,
    }


def run(database: str, n: int, departures: int) -> dict[str, Any]:
    hs, admin = fresh_synapse(database)
    try:
        sink = Sink(hs)
        info = seed_memberships(sink, n, int(time.time() * 1000))
        sink.finish()
        log(f"{database}: {info['local_current_membership_rows']} memberships seeded")
        first = start_and_time(hs, admin)
        log(f"{database}: start-up catch-up {first}")
        hs.stop()
        module_config = hs.module_config
        hs.module_config = None
        hs.reconfigure()
        hs.start(timeout=300)
        owner = hs.register(f"owner{os.urandom(3).hex()}")
        for i in range(departures):
            user = hs.register(f"leaver{i}x{os.urandom(2).hex()}")
            room_id = hs.create_room(owner, preset="public_chat")
            hs.membership(user, room_id, "join")
            hs.membership(user, room_id, "leave")
        hs.stop()
        hs.module_config = module_config
        hs.reconfigure()
        second = start_and_time(hs, admin)
        log(f"{database}: after {departures} departures without the module: {second}")
        return {
            "database": database,
            "memberships": info["local_current_membership_rows"],
            "departures_while_unloaded": departures,
            "start_up": first,
            "start_up_after_departures": second,
        }
    finally:
        hs.cleanup()


def report(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for label, key in (
            ("fresh start", "start_up"),
            ("after departures", "start_up_after_departures"),
        ):
            s = r[key]
            rows.append(
                [
                    r["database"],
                    r["memberships"],
                    label,
                    s["read"],
                    s["ms"],
                    s["probe_requests"],
                    s["probe_max_ms"],
                ]
            )
    return table(
        [
            "database",
            "memberships",
            "start",
            "departures read",
            "catch-up ms",
            "requests during start-up",
            "slowest request ms",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 memberships")
    parser.add_argument("--database", default="sqlite", choices=("sqlite", "postgres", "both"))
    parser.add_argument("--departures", type=int, default=100)
    args = parser.parse_args(argv)
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    n = 100_000 if args.quick else 1_000_000
    results = [run(db, n, args.departures) for db in databases]
    print(report(results))
    write_json(
        "startup" + ("-quick" if args.quick else "") + ".json",
        {"machine": machine(), "results": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
