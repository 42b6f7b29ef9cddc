"""Operator queries at 10^4, 10^5 and 10^6 membership rows and audit entries.

For each database engine and size, a fresh Synapse creates its schema, is
stopped, and its database is seeded directly (bench/seed.py): about N rows of
``local_current_membership`` (and ``room_memberships``) over N/2.5 rooms of every
kind (active, abandoned, forgotten, dry run, cancelled, purging, purged, 1 %
of forgotten rooms held) and a valid signed chain of N audit entries. Synapse
is started again on it and each admin API query is timed over HTTP (median of
several runs after one warm-up), with Synapse's own time for the module's
transaction beside it; then ``matrix-leave-forget verify`` runs against the
stopped database.

Usage::

    python bench/queries.py [--quick] [--database sqlite|postgres|both] [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    ADMIN,
    SynapseProcess,
    log,
    machine,
    median,
    metrics_delta,
    synapse_metrics,
    table,
    write_json,
)
from bench.seed import Sink, fresh_synapse, layout, seed_audit, seed_memberships  # noqa: E402


def _busy_count(hs: SynapseProcess) -> float:
    """Transactions that show start-up work: the module's, and Synapse's background updates."""
    return sum(
        v
        for k, v in synapse_metrics(hs).items()
        if k.startswith("count:leave_forget") or k == "count:background_updates"
    )


def wait_quiet(hs: SynapseProcess, timeout: float = 600.0) -> float:
    """Wait until the module's start-up work (and any background update) is done.

    Returns:
        The seconds waited.
    """
    started = time.monotonic()
    last = _busy_count(hs)
    quiet_since = time.monotonic()
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = _busy_count(hs)
        if now != last:
            quiet_since = time.monotonic()
        last = now
        if time.monotonic() - quiet_since >= 2.0:
            break
    return time.monotonic() - started


def queries(
    hs: SynapseProcess, sink_info: dict[str, Any], n_audit: int, base_ts: int, step_ms: int
) -> list[tuple[str, str]]:
    """The (name, path) of each timed admin query."""
    samples = sink_info["samples"]
    mid_room = sink_info["mid_room"]
    q = urllib.parse.quote
    since = base_ts + (n_audit // 2) * step_ms
    until = since + max(1, n_audit // 100) * step_ms  # 1 % of the entries
    return [
        ("rooms forgotten, first page", f"{ADMIN}/rooms?state=forgotten&limit=100"),
        (
            "rooms forgotten, middle page",
            f"{ADMIN}/rooms?state=forgotten&limit=100&from={q(mid_room)}",
        ),
        ("rooms pending, middle page", f"{ADMIN}/rooms?state=pending&limit=100&from={q(mid_room)}"),
        ("rooms purged, middle page", f"{ADMIN}/rooms?state=purged&limit=100&from={q(mid_room)}"),
        ("rooms held, first page", f"{ADMIN}/rooms?state=held&limit=100"),
        ("rooms held, middle page", f"{ADMIN}/rooms?state=held&limit=100&from={q(mid_room)}"),
        ("rooms abandoned, first page", f"{ADMIN}/rooms?state=abandoned&limit=100"),
        (
            "rooms abandoned, middle page",
            f"{ADMIN}/rooms?state=abandoned&limit=100&from={q(mid_room)}",
        ),
        ("room detail (forgotten room)", f"{ADMIN}/rooms/{q(samples['forgotten'][0])}"),
        ("room detail (active room)", f"{ADMIN}/rooms/{q(samples['active'][0])}"),
        ("audit by user", f"{ADMIN}/audit?user_id={q(sink_info['audit_user'])}&limit=100"),
        ("audit by room", f"{ADMIN}/audit?room_id={q(sink_info['audit_room'])}&limit=100"),
        ("audit by time range (1 %)", f"{ADMIN}/audit?since={since}&until={until}&limit=100"),
        ("audit, page in the middle", f"{ADMIN}/audit?from={n_audit // 2}&limit=100"),
    ]


def time_query(hs: SynapseProcess, token: str, path: str, runs: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", hs.client_port, timeout=300)
    headers = {"Authorization": f"Bearer {token}"}
    times: list[float] = []
    before = synapse_metrics(hs)
    size = 0
    status = 0
    for i in range(runs + 1):
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - started
        status = resp.status
        if i == 0:
            try:
                decoded = json.loads(body)
                size = len(
                    decoded.get("rooms", decoded.get("entries", decoded.get("local_members", [])))
                )
            except ValueError:
                pass
            before = synapse_metrics(hs)  # the warm-up run is not counted
            continue
        times.append(elapsed)
    conn.close()
    delta = metrics_delta(before, synapse_metrics(hs))
    db_ms = sum(v["total_ms"] for k, v in delta.items() if k.startswith("leave_forget")) / runs
    return {
        "status": status,
        "rows": size,
        "median_ms": round(median(times) * 1000, 2),
        "min_ms": round(min(times) * 1000, 2),
        "db_ms": round(db_ms, 2),
        "db_txns": sorted(k for k in delta if k.startswith("leave_forget")),
    }


def time_verify(hs: SynapseProcess) -> dict[str, Any]:
    # This checkout's CLI, as the benchmarked Synapse runs this checkout's
    # module: an installed console script may be an older build.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (repo, os.environ.get("PYTHONPATH")))),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "matrix_leave_forget.cli", "--json", "-c", hs.config_path, "verify"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=hs.workdir,
        env=env,
    )
    elapsed = time.perf_counter() - started
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {"ok": False, "problem": proc.stderr[-500:]}
    return {
        "ok": report.get("ok"),
        "checked": report.get("checked"),
        "seconds": round(elapsed, 2),
        "entries_per_s": round((report.get("checked") or 0) / elapsed),
        "problem": report.get("problem"),
    }


def run(
    databases: Sequence[str],
    sizes: Sequence[int],
    runs: int,
    verify_max: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Seed, then time every query (and verify) at each size on each engine.

    Args:
        verify_max: Per engine, the largest size ``verify`` runs at (it is
            linear; the full run skips PostgreSQL at 10^6 to stay in time).
    """
    verify_max = verify_max or {}
    now = int(time.time() * 1000)
    step_ms = 1000
    base_ts = now - max(sizes) * step_ms - 3600_000
    prepared: list[tuple[str, int, SynapseProcess, Any, dict[str, Any]]] = []
    results: list[dict[str, Any]] = []
    try:
        for db in databases:
            for n in sizes:
                log(f"{db} {n}: creating the schema")
                hs, admin = fresh_synapse(db)
                prepared.append((db, n, hs, admin, {}))
        sinks = []
        for db, n, hs, _admin, info in prepared:
            sink = Sink(hs)
            started = time.monotonic()
            info.update(seed_memberships(sink, n, now))
            info["seed_memberships_s"] = round(time.monotonic() - started, 1)
            sinks.append((sink, n))
            log(
                f"{db} {n}: {info['local_current_membership_rows']} memberships, "
                f"{info['leave_forget_rooms_rows']} retention rows"
            )
        largest_rooms, largest_users = layout(max(sizes))
        log(f"sealing and writing {max(sizes)} audit entries")
        started = time.monotonic()
        seed_audit(sinks, largest_rooms, largest_users, base_ts, step_ms)
        seal_s = round(time.monotonic() - started, 1)
        for (sink, n), (_, _, _, _, info) in zip(sinks, prepared, strict=True):
            info["mid_room"] = sink.execute(
                "SELECT room_id FROM leave_forget_rooms ORDER BY room_id LIMIT 1 OFFSET ?",
                (info["leave_forget_rooms_rows"] // 2,),
            )[0][0]
            row = sink.execute(
                "SELECT user_id, room_id FROM leave_forget_audit WHERE seq = ?",
                ((n // 2) - ((n // 2) % 10) + 2,),
            )
            info["audit_user"], info["audit_room"] = row[0]
            info["audit_rows"] = sink.execute("SELECT COUNT(*) FROM leave_forget_audit")[0][0]
            sink.finish()
        for db, n, hs, admin, info in prepared:
            log(f"{db} {n}: starting Synapse")
            hs.start(timeout=300)
            quiet = wait_quiet(hs)
            log(f"{db} {n}: start-up work done after {quiet:.1f}s; timing queries")
            timings: dict[str, Any] = {}
            for name, path in queries(hs, info, n, base_ts, step_ms):
                timings[name] = time_query(hs, admin.access_token, path, runs)
            hs.stop()
            if n > verify_max.get(db, n):
                verify = {
                    "ok": None,
                    "checked": None,
                    "seconds": None,
                    "entries_per_s": None,
                    "skipped": True,
                }
            else:
                log(f"{db} {n}: verify")
                verify = time_verify(hs)
            results.append(
                {
                    "database": db,
                    "size": n,
                    "seed": {k: v for k, v in info.items() if k != "samples"},
                    "audit_seal_s_all_sizes": seal_s,
                    "startup_quiet_s": round(quiet, 1),
                    "queries": timings,
                    "verify": verify,
                }
            )
            log(f"{db} {n}: verify {verify}")
    finally:
        for _, _, hs, _, _ in prepared:
            hs.cleanup()
    return results


def report(results: Sequence[dict[str, Any]]) -> str:
    out = []
    for db in sorted({r["database"] for r in results}, reverse=True):
        rows_db = [r for r in results if r["database"] == db]
        sizes = [r["size"] for r in rows_db]
        names = list(rows_db[0]["queries"])
        header = ["query"] + [f"{s:.0e} ms (db ms)".replace("+0", "") for s in sizes] + ["rows"]
        rows = []
        for name in names:
            cells: list[Any] = [name]
            for r in rows_db:
                t = r["queries"][name]
                cell = f"{t['median_ms']:.1f} ({t['db_ms']:.1f})"
                if t["status"] != 200:
                    cell += f" HTTP {t['status']}"
                cells.append(cell)
            cells.append(rows_db[-1]["queries"][name]["rows"])
            rows.append(cells)
        rows.append(
            ["CLI verify, entries/s"]
            + [
                "skipped"
                if r["verify"].get("skipped")
                else f"{r['verify']['entries_per_s']} ({'ok' if r['verify']['ok'] else 'FAILED'})"
                for r in rows_db
            ]
            + [""]
        )
        out.append(
            f"\nOperator queries — {db} (median over runs; HTTP round trip, "
            "and the module's DB transaction time)\n"
        )
        out.append(table(header, rows))
        out.append(
            "\nseeded: "
            + "; ".join(
                f"{r['size']:.0e}: {r['seed']['local_current_membership_rows']} memberships, "
                f"{r['seed']['rooms']} rooms, "
                f"{r['seed']['leave_forget_rooms_rows']} retention rows, "
                f"{r['seed']['holds']} holds, {r['seed']['audit_rows']} audit entries"
                for r in rows_db
            )
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 10^4 and 10^5 only, fewer runs")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--sizes", help="comma-separated sizes (default 10^4,10^5,10^6)")
    parser.add_argument(
        "--verify-all", action="store_true", help="also verify PostgreSQL at 10^6 (~4 min)"
    )
    parser.add_argument("--runs", type=int, help="timed runs per query (default 7, quick 5)")
    args = parser.parse_args(argv)
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([10**4, 10**5] if args.quick else [10**4, 10**5, 10**6])
    )
    runs = args.runs or (5 if args.quick else 7)
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    results = run(databases, sizes, runs, {} if args.verify_all else {"postgres": 10**5})
    path = write_json(
        f"queries{'-quick' if args.quick else ''}.json", {"machine": machine(), "results": results}
    )
    print(report(results))
    print(f"\nJSON: {path}")
    print(
        json.dumps(
            {
                f"{r['database']}.{r['size']}": {
                    **{name: t["median_ms"] for name, t in r["queries"].items()},
                    "verify_entries_per_s": r["verify"]["entries_per_s"],
                }
                for r in results
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
