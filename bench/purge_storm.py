"""A purge storm: native retention and the module side by side.

For each N and each side, a fresh Synapse gets N rooms of ~100 events (each
created with its events as initial state, one local member who then leaves
and forgets it) and one live user who, every 200 ms, sends a message and syncs
in a room of their own, before and during the storm:

* ``native``: stock Synapse (no module) with ``forgotten_room_retention_period: 5s``;
  leave and forget through Synapse's own servlets.
* ``module``: the module with ``retention: {period: 5s, sweep_interval: 1s}`` (and
  the default pacing unless ``--module-retention`` says otherwise).

Printed per run: the drain time (from the last forget, and from the moment the
last room fell due), live send and ``/sync`` p50/p95/max while idle and while
purges run (from the first room gone to the last), the module's database
transactions (per sweep and per purged room), and the space reclaimed (rows of
``events`` and ``state_groups_state``, and the database's size and free space).

Usage::

    python bench/purge_storm.py [--quick] [--database sqlite|postgres|both]
        [--sizes 50,200,1000] [--sides native,module]
        [--module-retention '{"max_concurrent_purges": 3, "purge_load": 0.5}']
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import attr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    SynapseProcess,
    User,
    log,
    machine,
    metrics_delta,
    ms,
    parallel,
    percentile,
    quote_room,
    synapse_metrics,
    table,
    write_json,
)
from tests.support import rawdb  # noqa: E402

PERIOD_S = 5.0
EVENTS_PER_ROOM = 100
LIVE_EVERY_S = 0.2
# A generous bound on any drain: 1000 rooms at one per second, plus slack.
DRAIN_TIMEOUT_S = 1800.0


# -- database --------------------------------------------------------------------


def space(hs: SynapseProcess, live_room: str) -> dict[str, Any]:
    """Rows of the biggest per-room tables outside the live user's room, and
    the database's size (Synapse stopped)."""
    out: dict[str, Any] = {}
    for table_name in ("events", "event_json", "state_groups_state", "rooms"):
        out[table_name] = int(
            rawdb.query(hs, f"SELECT COUNT(*) FROM {table_name} WHERE room_id != ?", (live_room,))[
                0
            ][0]
        )
    if hs.pg_database is None:
        path = os.path.join(hs.workdir, "homeserver.db")
        conn = sqlite3.connect(path)
        try:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        finally:
            conn.close()
        out["db_bytes"] = page * pages
        out["free_bytes"] = page * free
    else:
        out["db_bytes"] = int(rawdb.query(hs, "SELECT pg_database_size(current_database())")[0][0])
    return out


# -- HTTP --------------------------------------------------------------------------


class Conn:
    """One keep-alive connection, reconnecting once if the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=payload, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


class LiveUser(threading.Thread):
    """Every LIVE_EVERY_S: send a message, then an incremental /sync; records both."""

    def __init__(self, hs: SynapseProcess, user: User, room_id: str) -> None:
        super().__init__(daemon=True)
        self.conn = Conn(hs.client_port)
        self.user = user
        self.room_id = room_id
        self.samples: list[tuple[float, str, float]] = []  # (monotonic, kind, seconds)
        self.stop_event = threading.Event()
        self.errors = 0
        self._since: str | None = None
        self._txn = 0

    def _sync(self) -> None:
        query = "timeout=0" + (f"&since={urllib.parse.quote(self._since)}" if self._since else "")
        status, body = self.conn.call(
            "GET", f"/_matrix/client/v3/sync?{query}", self.user.access_token
        )
        if status == 200:
            self._since = body["next_batch"]
        else:
            self.errors += 1

    def run(self) -> None:
        self._sync()  # the initial sync is not a sample
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            self._txn += 1
            path = (
                f"/_matrix/client/v3/rooms/{quote_room(self.room_id)}/send/m.room.message/"
                f"live{self._txn}"
            )
            t0 = time.monotonic()
            status, _ = self.conn.call(
                "PUT", path, self.user.access_token, {"msgtype": "m.text", "body": "live"}
            )
            t1 = time.monotonic()
            self._sync()
            t2 = time.monotonic()
            if status != 200:
                self.errors += 1
            self.samples.append((t0, "send", t1 - t0))
            self.samples.append((t1, "sync", t2 - t1))
            next_at += LIVE_EVERY_S
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def window(self, kind: str, start: float, end: float) -> list[float]:
        return [s for t, k, s in self.samples if k == kind and start <= t <= end]


def latency(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p95_ms": ms(percentile(values, 95)),
        "max_ms": ms(max(values)) if values else float("nan"),
    }


# -- one run -------------------------------------------------------------------------


def seed_room(args: tuple[SynapseProcess, User, int]) -> str:
    hs, user, index = args
    state = [
        {
            "type": "bench.filler",
            "state_key": str(i),
            "content": {"i": i, "room": index, "pad": "x" * 200},
        }
        for i in range(EVENTS_PER_ROOM - 8)  # createRoom adds ~8 events of its own
    ]
    return hs.create_room(user, preset="private_chat", initial_state=state)


def total_rooms(hs: SynapseProcess, admin: User) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", hs.client_port, timeout=60)
    try:
        conn.request(
            "GET",
            "/_synapse/admin/v1/rooms?limit=1",
            headers={"Authorization": f"Bearer {admin.access_token}"},
        )
        return int(json.loads(conn.getresponse().read())["total_rooms"])
    finally:
        conn.close()


@attr.s(auto_attribs=True)
class Seeded:
    """A stopped Synapse holding N rooms, their owners and the live user."""

    hs: SynapseProcess
    admin: User
    owners: list[User]
    rooms: list[str]
    live_user: User
    live_room: str


def seed(database: str, n: int) -> Seeded:
    """Create the rooms once per (database, N); each side runs on a copy."""
    module = {"mount": "listener", "forget_rate_limit": None}
    seeded, rooms = seed_with(database, n, seed_room, module)
    return attr.evolve(seeded, rooms=rooms)


def seed_with(
    database: str, n: int, seeder: Callable[..., Any], module_config: dict[str, Any]
) -> tuple[Seeded, list[Any]]:
    """A stopped Synapse with n rooms made by ``seeder(hs, owner, i)``, and what it returned.

    The Seeded's ``rooms`` is empty: what a room is depends on the seeder.
    """
    hs = SynapseProcess(module_config, {}, database=database)
    hs.start(timeout=120)
    try:
        admin = hs.register("admin", admin=True)
        owners = [hs.register(f"owner{i}") for i in range(min(8, n))]
        started = time.monotonic()
        made = parallel(seeder, [(hs, owners[i % len(owners)], i) for i in range(n)], 4)
        log(f"{database} N={n}: seeded {n} rooms in {time.monotonic() - started:.0f}s")
        live_user = hs.register("live")
        live_room = hs.create_room(live_user)
        hs.stop()
    except BaseException:
        hs.cleanup()
        raise
    return Seeded(hs, admin, owners, [], live_user, live_room), made


def copy_of(
    seeded: Seeded, module_config: dict[str, Any] | None, extra: dict[str, Any]
) -> SynapseProcess:
    """A new Synapse (own workdir, ports and config) on a copy of the seeded database."""
    workdir = tempfile.mkdtemp(prefix="mlf-storm-")
    shutil.copy(os.path.join(seeded.hs.workdir, "signing.key"), workdir)
    if seeded.hs.pg_database is None:
        shutil.copy(os.path.join(seeded.hs.workdir, "homeserver.db"), workdir)
    hs = SynapseProcess(module_config, extra, database=seeded.hs.database, workdir=workdir)
    hs._own_workdir = True  # cleanup() removes it
    if hs.pg_database is not None:
        conn = rawdb.pg_connection("postgres", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE {hs.pg_database}")
                cur.execute(f"CREATE DATABASE {hs.pg_database} TEMPLATE {seeded.hs.pg_database}")
        finally:
            conn.close()
    return hs


def run(
    seeded: Seeded,
    side: str,
    idle_s: float,
    module_retention: dict[str, Any],
) -> dict[str, Any]:
    database, n = seeded.hs.database, len(seeded.rooms)
    if side == "native":
        hs = copy_of(seeded, None, {"forgotten_room_retention_period": f"{int(PERIOD_S)}s"})
    else:
        retention = {"period": f"{int(PERIOD_S)}s", "sweep_interval": "1s", **module_retention}
        hs = copy_of(
            seeded,
            {"mount": "listener", "forget_rate_limit": None, "retention": retention},
            {},
        )
    space_before = space(hs, seeded.live_room)
    hs.start(timeout=120)
    try:
        admin, owners, rooms = seeded.admin, seeded.owners, seeded.rooms
        live_user, live_room = seeded.live_user, seeded.live_room
        base_rooms = total_rooms(hs, admin)
        live = LiveUser(hs, live_user, live_room)
        live.start()
        time.sleep(idle_s)
        idle_end = time.monotonic()
        before = synapse_metrics(hs)

        port = hs.client_port if side == "native" else hs.module_port
        # Each room's only member.
        member = {room: owners[i % len(owners)] for i, room in enumerate(rooms)}

        def leave_forget(room: str) -> None:
            conn = Conn(port)
            for action in ("leave", "forget"):
                status, body = conn.call(
                    "POST",
                    f"/_matrix/client/v3/rooms/{quote_room(room)}/{action}",
                    member[room].access_token,
                    {},
                )
                if status != 200:
                    raise RuntimeError(f"{action} {room}: {status} {body}")

        storm_start = time.monotonic()
        parallel(leave_forget, rooms, 4)
        last_forget = time.monotonic()
        due = last_forget + PERIOD_S
        took = last_forget - storm_start
        log(f"{database} {side} N={n}: {n} rooms left and forgotten in {took:.1f}s")
        first_gone: float | None = None
        remaining = n
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while remaining > 0 and time.monotonic() < deadline:
            time.sleep(0.25)
            remaining = total_rooms(hs, admin) - (base_rooms - n)
            if remaining < n and first_gone is None:
                first_gone = time.monotonic()
        drained = time.monotonic()
        # A few seconds of "after" so that the tail of the storm shows.
        time.sleep(2)
        live.stop_event.set()
        live.join(30)
        after = synapse_metrics(hs)
        txns = metrics_delta(before, after)
        # The module's retention transactions (its leave and forget records
        # are the storm itself, not the cost of purging it).
        module_txns = {
            d: v
            for d, v in txns.items()
            if d.startswith("leave_forget_") and d != "leave_forget_record"
        }
        pacing = None
        if side == "module":
            status = Conn(hs.module_port).call(
                "GET", "/_synapse/client/leave_forget/v1/admin/retention", admin.access_token
            )
            pacing = status[1]
        # One count of the backlog (before the pump: of held due rooms) per sweep.
        sweeps = module_txns.get(
            "leave_forget_backlog_counts", module_txns.get("leave_forget_count_due_held", {})
        ).get("count", 0.0)
        module_total = sum(v["count"] for v in module_txns.values())
        during_start = first_gone or drained
        result: dict[str, Any] = {
            "database": database,
            "side": side,
            "rooms": n,
            "complete": remaining <= 0,
            "remaining": max(0, remaining),
            "forget_storm_s": round(last_forget - storm_start, 2),
            "drain_after_last_forget_s": round(drained - last_forget, 1),
            "drain_after_due_s": round(drained - due, 1),
            "purging_s": round(drained - during_start, 1),
            "idle": {k: latency(live.window(k, 0, idle_end)) for k in ("send", "sync")},
            "during": {k: latency(live.window(k, during_start, drained)) for k in ("send", "sync")},
            "after_last_forget": {
                k: latency(live.window(k, last_forget, drained + 2)) for k in ("send", "sync")
            },
            "live_errors": live.errors,
            "retention_status": pacing,
            "purge_task_s": purge_task_seconds(hs) if side == "module" else None,
            "module_transactions": {
                "total": module_total,
                "sweeps": sweeps,
                "per_sweep": round(module_total / sweeps, 2) if sweeps else None,
                "per_room": round(module_total / n, 2),
                "by_desc": {d: round(v["count"]) for d, v in sorted(module_txns.items())},
                "db_ms": round(sum(v["total_ms"] for v in module_txns.values()), 1),
            },
            "synapse_purge_ms": round(
                sum(v["total_ms"] for d, v in txns.items() if d.startswith("purge")), 1
            ),
        }
        hs.stop()
        result["space_before"] = space_before
        result["space_after"] = space(hs, seeded.live_room)
        result["reclaimed"] = {
            key: space_before[key] - result["space_after"][key]
            for key in ("events", "event_json", "state_groups_state", "rooms")
        }
        log(
            f"{database} {side} N={n}: drained {result['drain_after_due_s']}s after due; "
            f"send p95 idle {result['idle']['send']['p95_ms']} "
            f"during {result['during']['send']['p95_ms']} ms"
        )
        return result
    finally:
        hs.cleanup()


def purge_task_seconds(hs: SynapseProcess) -> dict[str, float]:
    """The module's purge durations (request to seen gone): count and mean."""
    values: dict[str, float] = {}
    for line in hs.metrics().splitlines():
        for kind in ("count", "sum"):
            if line.startswith(f"synapse_leave_forget_purge_task_seconds_{kind}{{"):
                values[kind] = values.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    count = values.get("count", 0.0)
    return {"count": count, "mean_s": round(values.get("sum", 0.0) / count, 3) if count else 0.0}


def _lat(d: dict[str, float], with_max: bool = False) -> str:
    out = f"{d['p50_ms']:.0f} / {d['p95_ms']:.0f}"
    return out + (f" / {d['max_ms']:.0f}" if with_max else "")


def report(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        i, d = r["idle"], r["during"]
        mt = r["module_transactions"]
        rows.append(
            [
                r["database"],
                r["side"],
                r["rooms"],
                "yes" if r["complete"] else f"NO ({r['remaining']} left)",
                r["drain_after_last_forget_s"],
                r["drain_after_due_s"],
                r["purging_s"],
                _lat(i["send"]),
                _lat(d["send"], True),
                _lat(i["sync"]),
                _lat(d["sync"], True),
                round(d["send"]["p95_ms"] / i["send"]["p95_ms"], 2) if i["send"]["p95_ms"] else "-",
                round(d["sync"]["p95_ms"] / i["sync"]["p95_ms"], 2) if i["sync"]["p95_ms"] else "-",
                "-" if r["side"] == "native" else f"{mt['per_sweep']} ({mt['per_room']}/room)",
                r["reclaimed"]["events"],
                r["reclaimed"]["state_groups_state"],
                r["space_after"].get("free_bytes", "-"),
            ]
        )
    return table(
        [
            "db",
            "side",
            "N",
            "drained",
            "s after last forget",
            "s after due",
            "s purging",
            "send idle p50/p95",
            "send purging p50/p95/max",
            "sync idle p50/p95",
            "sync purging p50/p95/max",
            "send p95 ratio",
            "sync p95 ratio",
            "module txns per sweep",
            "events removed",
            "state rows removed",
            "free bytes in db file",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 50 only, shorter idle phase")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--sizes", help="comma-separated N (default 50,200,1000)")
    parser.add_argument("--sides", default="native,module")
    parser.add_argument("--module-retention", default="{}", help="extra retention keys (JSON)")
    parser.add_argument("--idle", type=float, help="seconds of idle live traffic (default 20)")
    parser.add_argument("--out", help="JSON file name under bench/results/")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("50" if args.quick else "50,200,1000")).split(",")]
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    idle_s = args.idle or (10.0 if args.quick else 20.0)
    module_retention = json.loads(args.module_retention)
    results = run_all(databases, sizes, args.sides.split(","), idle_s, module_retention)
    path = write_json(
        args.out or f"purge_storm{'-quick' if args.quick else ''}.json",
        {"machine": machine(), "module_retention": module_retention, "results": results},
    )
    print(report(results))
    print(f"\nJSON: {path}")
    return 0


def run_all(
    databases: Sequence[str],
    sizes: Sequence[int],
    sides: Sequence[str],
    idle_s: float,
    module_retention: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    results = []
    for database in databases:
        for n in sizes:
            seeded = seed(database, n)
            try:
                for side in sides:
                    results.append(run(seeded, side, idle_s, module_retention or {}))
            finally:
                seeded.hs.cleanup()
    return results


if __name__ == "__main__":
    sys.exit(main())
