"""The retention sweep over many due rooms: how long deciding them takes.

A fresh Synapse (``retention.dry_run: true``, so nothing is purged and only the
decision is timed; sweeps only on demand) is seeded with N rooms due for purge
(each forgotten by its two local members; 1 % held, 1 % with a member who
rejoined, 0.5 % unknown to Synapse) and N rooms not yet due. A benchmark-only
module (bench/sweep_hook.py) runs the sweeper's ``sweep()`` on demand, pass after
pass, and reports each pass's time and outcomes. Afterwards ``verify`` checks
that every decision's audit entry is in a valid chain.

Usage::

    python bench/sweep.py [--quick] [--database sqlite|postgres|both] [--rooms N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    SynapseProcess,
    log,
    machine,
    metrics_delta,
    request,
    synapse_metrics,
    table,
    write_json,
)
from bench.queries import time_verify, wait_quiet  # noqa: E402
from bench.seed import Sink, fresh_synapse, seed_sweep  # noqa: E402
from tests.support import rawdb  # noqa: E402

HOOK = {"module": "bench.sweep_hook.SweepHook", "config": {}}
RETENTION = {"period": "1d", "dry_run": True, "sweep_interval": "1d"}
# --mode real: the sweep counts the backlog and starts the purge pump, which
# decides rooms as it starts their purges (a few per transaction).
RETENTION_REAL = {**RETENTION, "dry_run": False}
# How long the pump runs before its decisions are read from Synapse's counters.
PUMP_WATCH_S = 20.0


def _seeded_synapse(
    database: str, retention: dict[str, Any], n: int
) -> tuple[SynapseProcess, dict[str, int]]:
    """A fresh Synapse with the sweep hook, seeded with n due rooms, started and quiet.

    The caller cleans it up (``hs.cleanup()``), also when this raises.
    """
    hs, _ = fresh_synapse(database, {"retention": retention}, [HOOK])
    try:
        sink = Sink(hs)
        started = time.monotonic()
        seeded = seed_sweep(sink, n, int(time.time() * 1000))
        sink.finish()
        log(f"{database} {n}: seeded in {time.monotonic() - started:.0f}s: {seeded}")
        hs.start(timeout=300)
        quiet = wait_quiet(hs)
        log(f"{database} {n}: start-up work done after {quiet:.1f}s; sweeping")
    except BaseException:
        hs.cleanup()
        raise
    return hs, seeded


def _sweep(hs: SynapseProcess, passes: int, timeout: float) -> list[dict[str, Any]]:
    """Run the sweeper's sweep() through the hook, up to ``passes`` times."""
    resp = request(hs.client_port, "POST", f"/_bench/sweep?passes={passes}", {}, timeout=timeout)
    if resp.status != 200:
        raise RuntimeError(f"sweep hook failed: {resp.status} {resp.raw[:300]!r}")
    result: list[dict[str, Any]] = resp.body["passes"]
    return result


def run_real(database: str, n: int) -> dict[str, Any]:
    """Time one real-mode sweep over n due rooms, then the pump's decisions."""
    hs, seeded = _seeded_synapse(database, RETENTION_REAL, n)
    try:
        before = synapse_metrics(hs)
        sweep = _sweep(hs, 1, 600)[0]
        time.sleep(PUMP_WATCH_S)
        txns = metrics_delta(before, synapse_metrics(hs))
        decide = txns.get("leave_forget_decide_due", {"count": 0, "mean_ms": 0.0})
        started = int(
            rawdb.query(
                hs,
                "SELECT COUNT(*) FROM leave_forget_audit "
                "WHERE action = 'purge' AND outcome = 'started'",
            )[0][0]
        )
        hs.stop()
        result = {
            "database": database,
            "mode": "real",
            "rooms_due": seeded["due"],
            "sweep_ms": round(sweep["seconds"] * 1000, 1),
            "sweep_stats": sweep.get("stats"),
            "pump_watch_s": PUMP_WATCH_S,
            "decide_transactions": round(decide["count"]),
            "decide_mean_ms": round(decide["mean_ms"], 2),
            "rooms_started": started,
        }
        log(f"{database} {n}: real-mode sweep {result}")
        return result
    finally:
        hs.cleanup()


def run(database: str, n: int, max_passes: int) -> dict[str, Any]:
    hs, seeded = _seeded_synapse(database, RETENTION, n)
    try:
        passes = _sweep(hs, max_passes, 3600)
        decided = sum(sum(v for k, v in p["counts"].items() if k != "held") for p in passes)
        seconds = sum(p["seconds"] for p in passes)
        complete = not passes[-1]["counts"] or decided >= seeded["due"] - seeded["held"]
        hs.stop()
        verify = time_verify(hs)
        result = {
            "database": database,
            "rooms_due": seeded["due"],
            "seeded": seeded,
            "passes": passes,
            "decided": decided,
            "seconds": round(seconds, 3),
            "decisions_per_s": round(decided / seconds) if seconds else None,
            "complete": complete,
            "verify": verify,
        }
        if not complete and decided:
            result["extrapolated_seconds_for_all"] = round(
                seconds * (seeded["due"] - seeded["held"]) / decided, 1
            )
        log(
            f"{database} {n}: {decided} decisions in {seconds:.2f}s over "
            f"{len(passes)} pass(es); verify {verify}"
        )
        return result
    finally:
        hs.cleanup()


def report(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        counts: dict[str, int] = {}
        for p in r["passes"]:
            for k, v in p["counts"].items():
                counts[k] = counts.get(k, 0) + v
        stats = r["passes"][0].get("stats") or {}
        rows.append(
            [
                r["database"],
                r["rooms_due"],
                len(r["passes"]),
                r["decided"],
                r["seconds"],
                r["decisions_per_s"],
                r.get("extrapolated_seconds_for_all", "") if not r["complete"] else "all decided",
                ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
                f"{r['verify']['checked']} {'ok' if r['verify']['ok'] else 'FAILED'}",
            ]
        )
    out = [
        "\nRetention sweep (dry run: decisions and their audit entries, no purge)\n",
        table(
            [
                "db",
                "due rooms",
                "passes",
                "decided",
                "seconds",
                "decisions/s",
                "time for all",
                "outcomes",
                "verify",
            ],
            rows,
        ),
    ]
    for r in results:
        stats = [p.get("stats") for p in r["passes"] if p.get("stats")]
        if stats:
            keys = sorted({k for s in stats for k in s})
            agg = {k: round(sum(s.get(k, 0) for s in stats), 1) for k in keys}
            out.append(
                f"\n{r['database']}: where the sweep's time went (ms, summed over passes): "
                f"{json.dumps(agg, sort_keys=True)}"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^4 rooms instead of 10^5")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--rooms", type=int, help="due rooms (default 10^5, quick 10^4)")
    parser.add_argument("--passes", type=int, default=200, help="at most this many sweep passes")
    parser.add_argument(
        "--mode",
        choices=("dry-run", "real"),
        default="dry-run",
        help="dry-run: the sweep decides every due room; real: it counts and starts the pump",
    )
    args = parser.parse_args(argv)
    n = args.rooms or (10**4 if args.quick else 10**5)
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    if args.mode == "real":
        real = [run_real(db, n) for db in databases]
        path = write_json(f"sweep-real{'-quick' if args.quick else ''}.json", {"results": real})
        print(json.dumps(real, indent=1, sort_keys=True))
        print(f"\nJSON: {path}")
        return 0
    results = [run(db, n, args.passes) for db in databases]
    path = write_json(
        f"sweep{'-quick' if args.quick else ''}.json", {"machine": machine(), "results": results}
    )
    print(report(results))
    print(f"\nJSON: {path}")
    print(
        json.dumps(
            {
                f"{r['database']}.{r['rooms_due']}": {
                    k: r.get(k)
                    for k in (
                        "decided",
                        "seconds",
                        "decisions_per_s",
                        "complete",
                        "extrapolated_seconds_for_all",
                    )
                }
                for r in results
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
