"""The guarded read paths (issue 9): Synapse with the module vs native Synapse.

Two Synapses run side by side on the same database engine: one with the module
as deployed (``mount: intercept``, ``history_guard`` at its default: every
client request passes the module's node and guarded reads are checked), one
without the module (native). Both get the same data, built by the same code:

* ``plain``: a user joined to ``ROOMS`` rooms of an owner, each with
  ``MESSAGES`` messages mentioning them (so /notifications has entries), and
  no departed room;
* ``forgetful``: a user joined to the same rooms who also left and forgot
  ``FORGOTTEN`` (100) other rooms, each with a few messages;
* ``leaver``: a user joined to the same rooms who also left (and did not
  forget) ``FORGOTTEN`` other rooms, each with a few messages (issue 17).

For each user and each read (/sync initial, /sync idle incremental, /messages,
/context, /event, /notifications), batches alternate module / native / native
/ module (ABBA) at concurrency 1, 8 and 32 on keep-alive connections; the
report gives p50 and throughput per side and their ratios (module / native).

/sync requests carry a filter that differs per request in a field that does
not change the answer (``account_data.limit``), so that Synapse's 2-minute
/sync response cache, which a client repeating an identical request would hit,
does not turn the measurement into one of the cache.

Usage::

    python bench/reads.py [--quick] [--database sqlite|postgres|both]
                          [--reads event,context] [--module-side module|guard-off|native]

``--module-side`` replaces the module side to tell costs apart: ``guard-off``
is the module with ``history_guard: false`` (what the guard itself costs is
the difference), ``native`` a second Synapse without the module (an A/A
control: how far the ratios of two identical servers stray, i.e. the bench's
own noise floor on this machine).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    KeepAlivePool,
    SynapseProcess,
    User,
    log,
    machine,
    ms,
    parallel,
    percentile,
    quote_room,
    table,
    write_json,
)

ROOMS = 10
MESSAGES = 20
FORGOTTEN = 100
# Requests per side at each concurrency, and the batch size (as bench/endpoints.py).
PLANS = {
    "quick": {1: (30, 10), 8: (48, 24), 32: (96, 48)},
    "full": {1: (200, 25), 8: (384, 48), 32: (768, 128)},
}
WARMUP = 16
READS = ("sync_initial", "sync_incremental", "messages", "context", "event", "notifications")
USERS = ("plain", "forgetful", "leaver")
# Background updates of a fresh database, run without Synapse's pauses.
EXTRA = {"background_updates": {"sleep_enabled": False}, "presence": {"enabled": False}}

_filter_seq = itertools.count(1)


class Side:
    """One Synapse (module or native) with the bench data on it."""

    def __init__(self, name: str, hs: SynapseProcess) -> None:
        self.name = name
        self.hs = hs
        self.users: dict[str, User] = {}
        self.rooms: list[str] = []
        self.events: list[tuple[str, str]] = []  # (room, event id) the users can read
        self.tokens: dict[str, str] = {}

    def ok(self, resp: Any, what: str) -> Any:
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: {what}: {resp.status} {resp.body}")
        return resp.body

    def send(self, owner: User, room: str, i: int, mention: str) -> str:
        body = self.ok(
            self.hs.client(
                "PUT",
                f"/_matrix/client/v3/rooms/{quote_room(room)}/send/m.room.message/b{room[1:9]}{i}",
                {"msgtype": "m.text", "body": f"message {i} for {mention}"},
                token=owner.access_token,
            ),
            "send",
        )
        return str(body["event_id"])

    def build(self, forgotten: int) -> None:
        hs = self.hs
        owner = hs.register("owner")
        plain, forgetful = hs.register("plain"), hs.register("forgetful")
        leaver = hs.register("leaver")
        self.users = {"plain": plain, "forgetful": forgetful, "leaver": leaver}

        def shared_room(_: int) -> tuple[str, list[str]]:
            room = hs.create_room(owner, preset="public_chat")
            for user in (plain, forgetful, leaver):
                self.ok(hs.membership(user, room, "join"), "join")
            mention = "plain forgetful leaver"
            return room, [self.send(owner, room, i, mention) for i in range(MESSAGES)]

        for room, ids in parallel(shared_room, range(ROOMS), 4):
            self.rooms.append(room)
            self.events.extend((room, e) for e in ids)

        def forgotten_room(n: int) -> None:
            user = forgetful if n < forgotten else leaver
            room = hs.create_room(owner, preset="public_chat")
            self.ok(hs.membership(user, room, "join"), "join")
            for i in range(3):
                self.send(owner, room, i, user.user_id)
            self.ok(hs.membership(user, room, "leave"), "leave")
            if user is leaver:
                return
            self.ok(
                hs.client(
                    "POST",
                    f"/_matrix/client/v3/rooms/{quote_room(room)}/forget",
                    {},
                    token=forgetful.access_token,
                ),
                "forget",
            )

        parallel(forgotten_room, range(2 * forgotten), 4)
        for name, user in self.users.items():
            body = self.ok(
                hs.client("GET", "/_matrix/client/v3/sync?timeout=0", token=user.access_token),
                "sync",
            )
            self.tokens[name] = body["next_batch"]

    def path(self, read: str, user: str, i: int) -> str:
        """The i-th request of a read for a user (reads rotate over rooms and events)."""
        room, event = self.events[i % len(self.events)]
        if read.startswith("sync"):
            params: dict[str, Any] = {
                "timeout": 0,
                "filter": json.dumps({"account_data": {"limit": 1000 + next(_filter_seq)}}),
            }
            if read == "sync_incremental":
                params["since"] = self.tokens[user]
            return "/_matrix/client/v3/sync?" + urllib.parse.urlencode(params)
        base = f"/_matrix/client/v3/rooms/{quote_room(room)}"
        if read == "messages":
            return f"{base}/messages?dir=b&limit=20"
        if read == "context":
            return f"{base}/context/{quote_room(event)}?limit=10"
        if read == "event":
            return f"{base}/event/{quote_room(event)}"
        return "/_matrix/client/v3/notifications?limit=20"


def run_gets(
    pool: KeepAlivePool, jobs: Sequence[tuple[str, str]], concurrency: int
) -> tuple[list[float], float, dict[int, int]]:
    """GET each (path, token), ``concurrency`` at a time; latencies, wall time, statuses."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    index = [0]

    def worker(slot: int) -> None:
        conn = pool.conns[slot]
        while True:
            with lock:
                i = index[0]
                index[0] += 1
            if i >= len(jobs):
                return
            path, token = jobs[i]
            started = time.perf_counter()
            for attempt in range(2):
                try:
                    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                    resp = conn.getresponse()
                    resp.read()
                    break
                except (http.client.HTTPException, ConnectionError, OSError):
                    conn.close()  # a keep-alive connection the server closed
                    if attempt:
                        raise
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started, statuses


def measure(
    sides: dict[str, Side], read: str, user: str, plan: dict[int, tuple[int, int]]
) -> dict[str, Any]:
    counter = {name: itertools.count() for name in sides}

    def jobs(name: str, n: int) -> list[tuple[str, str]]:
        side = sides[name]
        token = side.users[user].access_token
        return [(side.path(read, user, next(counter[name])), token) for _ in range(n)]

    pools = {name: KeepAlivePool(side.hs.client_port, max(plan)) for name, side in sides.items()}
    try:
        for name in sides:
            run_gets(pools[name], jobs(name, WARMUP), 8)
        results: dict[str, Any] = {}
        for concurrency, (per_side, batch) in plan.items():
            lat: dict[str, list[float]] = {n: [] for n in sides}
            wall = {n: 0.0 for n in sides}
            statuses: dict[str, dict[int, int]] = {n: {} for n in sides}
            for i in range(per_side // batch):
                for name in ("module", "native") if i % 2 == 0 else ("native", "module"):
                    latencies, elapsed, status = run_gets(
                        pools[name], jobs(name, batch), concurrency
                    )
                    lat[name].extend(latencies)
                    wall[name] += elapsed
                    for code, k in status.items():
                        statuses[name][code] = statuses[name].get(code, 0) + k
            row: dict[str, Any] = {}
            for name in sides:
                row[name] = {
                    "requests": len(lat[name]),
                    "p50_ms": ms(percentile(lat[name], 50)),
                    "p95_ms": ms(percentile(lat[name], 95)),
                    "throughput_rps": round(len(lat[name]) / wall[name], 1),
                    "statuses": {str(k): v for k, v in statuses[name].items()},
                }
            row["ratio_p50"] = round(row["module"]["p50_ms"] / row["native"]["p50_ms"], 3)
            row["ratio_throughput"] = round(
                row["module"]["throughput_rps"] / row["native"]["throughput_rps"], 3
            )
            results[str(concurrency)] = row
            log(
                f"{read} {user} c={concurrency}: p50 {row['module']['p50_ms']} / "
                f"{row['native']['p50_ms']} ms (x{row['ratio_p50']}), "
                f"{row['module']['throughput_rps']} / {row['native']['throughput_rps']} req/s "
                f"(x{row['ratio_throughput']})"
            )
        return results
    finally:
        for pool in pools.values():
            pool.close()


def start(module_config: Any, database: str) -> SynapseProcess:
    hs = SynapseProcess(module_config, dict(EXTRA), database=database)
    try:
        hs.start()
    except Exception:
        hs.cleanup()
        raise
    return hs


MODULE_SIDES: dict[str, Any] = {
    "module": {"mount": "intercept", "forget_rate_limit": None},
    "guard-off": {"mount": "intercept", "forget_rate_limit": None, "history_guard": False},
    "native": None,
}


def run(
    database: str, quick: bool, reads: Sequence[str] = READS, module_side: str = "module"
) -> dict[str, Any]:
    plan = PLANS["quick" if quick else "full"]
    module_hs = start(MODULE_SIDES[module_side], database)
    native_hs = None
    try:
        native_hs = start(None, database)
        sides = {"module": Side("module", module_hs), "native": Side("native", native_hs)}
        for side in sides.values():
            log(f"{database}: building {side.name} ({ROOMS} rooms, {FORGOTTEN} forgotten)")
            side.build(FORGOTTEN)
        results: dict[str, Any] = {}
        for read in reads:
            for user in USERS:
                results[f"{read}.{user}"] = measure(sides, read, user, plan)
        return {
            "database": database,
            "mode": "quick" if quick else "full",
            "module_side": module_side,
            "rooms": ROOMS,
            "messages": MESSAGES,
            "forgotten": FORGOTTEN,
            "reads": results,
        }
    finally:
        module_hs.cleanup()
        if native_hs is not None:
            native_hs.cleanup()


def report(results: Sequence[dict[str, Any]]) -> str:
    lines: list[str] = []
    for res in results:
        rows = []
        for key, by_c in res["reads"].items():
            read, user = key.split(".")
            for c, row in by_c.items():
                m, n = row["module"], row["native"]
                rows.append(
                    [
                        read,
                        user,
                        c,
                        m["p50_ms"],
                        n["p50_ms"],
                        row["ratio_p50"],
                        m["throughput_rps"],
                        n["throughput_rps"],
                        row["ratio_throughput"],
                        " ".join(f"{k}:{v}" for k, v in sorted(m["statuses"].items())),
                    ]
                )
        lines.append(
            f"\nGuarded reads — {res['database']} ({res['mode']}; "
            f"{res.get('module_side', 'module')} vs native; "
            f"forgetful = {res['forgotten']} forgotten rooms)\n"
        )
        lines.append(
            table(
                [
                    "read",
                    "user",
                    "c",
                    "p50 mod",
                    "p50 nat",
                    "ratio",
                    "rps mod",
                    "rps nat",
                    "ratio",
                    "module statuses",
                ],
                rows,
            )
        )
        lines.append(summary(res))
    return "\n".join(lines)


def summary(res: dict[str, Any]) -> str:
    """Per user: the geometric mean and range of the p50 and throughput ratios over all cells.

    Single cells of fast reads stray by several per cent even between two identical
    servers (run with ``--module-side native`` to see how far on this machine); the
    mean over all cells is what a per-request cost shows up in.
    """
    out = []
    for user in USERS:
        cells = [
            row
            for key, by_c in res["reads"].items()
            if key.endswith(f".{user}")
            for row in by_c.values()
        ]
        if not cells:
            continue
        parts = []
        for name in ("ratio_p50", "ratio_throughput"):
            values = [row[name] for row in cells]
            mean = math.exp(sum(math.log(v) for v in values) / len(values))
            parts.append(f"{name} {mean:.3f} (range {min(values):.3f}-{max(values):.3f})")
        out.append(f"{user}: geometric mean over {len(cells)} cells: " + ", ".join(parts))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--reads", default=",".join(READS), help="comma-separated subset")
    parser.add_argument("--module-side", choices=sorted(MODULE_SIDES), default="module")
    args = parser.parse_args(argv)
    reads = [r for r in args.reads.split(",") if r]
    unknown = sorted(set(reads) - set(READS))
    if unknown:
        parser.error(f"unknown reads {unknown}; choose from {', '.join(READS)}")
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    results = [run(db, args.quick, reads, args.module_side) for db in databases]
    suffix = ("-quick" if args.quick else "") + (
        "" if args.module_side == "module" else f"-{args.module_side}"
    )
    path = write_json(f"reads{suffix}.json", {"machine": machine(), "results": results})
    print(report(results))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
