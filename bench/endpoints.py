"""Leave and forget through the module vs Synapse without the module.

Two Synapses run side by side, configured alike on the same database engine:
one loads the module in ``mount: listener`` mode and is driven through the
module's endpoints (``module_port``); the other has no module at all and is
driven through Synapse's own servlets. (A Synapse that loads the module
routes every forget and observes every membership event, whatever the
servlet, so its own servlets no longer measure Synapse alone.) Batches
alternate module / native / native / module (ABBA) so that drift (other load
on the machine, growing databases) hits both sides alike.

Every request is on a fresh (user, room) pair: users join rooms beforehand; leave
is measured on joined pairs, forget on the same pairs once left. Rooms are
public rooms created by an owner who stays joined, so a forget is never the
last one (the common case; the last-forget path is timed by bench/sweep.py's
set-up). forget_rate_limit is off and Synapse's rc_* limits are relaxed.

Usage::

    python bench/endpoints.py [--quick] [--database sqlite|postgres|both]
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
    KeepAlivePool,
    SynapseProcess,
    log,
    machine,
    metrics_delta,
    ms,
    parallel,
    percentile,
    quote_room,
    run_batch,
    start_synapse,
    synapse_metrics,
    table,
    write_json,
)

# Requests per side (module, native) at each concurrency, and the batch size.
PLANS = {
    "quick": {1: (40, 10), 8: (64, 32), 32: (128, 64)},
    "full": {1: (1000, 25), 8: (384, 48), 32: (768, 128)},
}
WARMUP = 16  # requests per side before measuring, per operation


# Synapse's transactions shown beside the module's in the report: the ones
# that do the work of leave (persist_events) and forget (forget_membership).
SHOWN_TXNS = (
    "persist_events",
    "forget_membership",
    "get_local_current_membership_for_user_in_room",
)


def _path(room_id: str, action: str) -> str:
    return f"/_matrix/client/v3/rooms/{quote_room(room_id)}/{action}"


def set_up(hs: Any, users: int, rooms: int) -> list[tuple[str, str]]:
    """Register users, create rooms, join every user to every room; returns (room, token) pairs.

    The pairs are ordered so that consecutive requests hit different rooms and users.
    """
    owner = hs.register("owner")
    log(f"registering {users} users, creating {rooms} rooms")
    members = parallel(lambda i: hs.register(f"bench{i}"), range(users))
    room_ids = parallel(lambda i: hs.create_room(owner, preset="public_chat"), range(rooms), 4)
    pairs = []
    for k in range(users * rooms):
        r = k % rooms
        u = (k // rooms + r) % users
        pairs.append((room_ids[r], members[u].access_token))
    log(f"joining {len(pairs)} (user, room) pairs")
    started = time.monotonic()

    def join(pair: tuple[str, str]) -> None:
        room_id, token = pair
        resp = hs.client("POST", f"/_matrix/client/v3/join/{quote_room(room_id)}", {}, token=token)
        if resp.status != 200:
            raise RuntimeError(f"join failed: {resp.status} {resp.body}")

    parallel(join, pairs, 8)
    log(f"joined in {time.monotonic() - started:.0f}s")
    return pairs


def measure(
    servers: dict[str, tuple[Any, int]],
    action: str,
    pairs: dict[str, list[tuple[str, str]]],
    plan: dict[int, tuple[int, int]],
) -> tuple[dict[str, Any], dict[str, list[tuple[str, str]]]]:
    """Run the plan for one action; returns results and each side's pairs used, in order.

    Args:
        servers: side -> (Synapse, port to drive).
        pairs: side -> that Synapse's (room, token) pairs.
    """
    cursors = {side: 0 for side in servers}
    used: dict[str, list[tuple[str, str]]] = {side: [] for side in servers}

    def take(side: str, n: int) -> list[tuple[str, str]]:
        chunk = pairs[side][cursors[side] : cursors[side] + n]
        cursors[side] += n
        if len(chunk) < n:
            raise RuntimeError("ran out of (user, room) pairs")
        used[side].extend(chunk)
        return chunk

    pools = {side: KeepAlivePool(port, max(plan)) for side, (_, port) in servers.items()}
    # Warm-up: caches, connections, JIT-free but still first-call paths.
    for side in ("module", "native"):
        chunk = take(side, WARMUP)
        run_batch(pools[side], [(_path(r, action), t) for r, t in chunk], 8)
    results: dict[str, Any] = {}
    for concurrency, (per_side, batch) in plan.items():
        lat: dict[str, list[float]] = {"module": [], "native": []}
        wall: dict[str, float] = {"module": 0.0, "native": 0.0}
        statuses: dict[str, dict[int, int]] = {"module": {}, "native": {}}
        txns: dict[str, dict[str, dict[str, float]]] = {"module": {}, "native": {}}
        rounds = per_side // batch
        for i in range(rounds):
            order = ("module", "native") if i % 2 == 0 else ("native", "module")
            for side in order:
                chunk = take(side, batch)
                hs = servers[side][0]
                before = synapse_metrics(hs)
                latencies, elapsed, status = run_batch(
                    pools[side], [(_path(r, action), t) for r, t in chunk], concurrency
                )
                delta = metrics_delta(before, synapse_metrics(hs))
                lat[side].extend(latencies)
                wall[side] += elapsed
                for code, n in status.items():
                    statuses[side][code] = statuses[side].get(code, 0) + n
                for desc, d in delta.items():
                    acc = txns[side].setdefault(desc, {"count": 0.0, "total_ms": 0.0})
                    acc["count"] += d["count"]
                    acc["total_ms"] += d["total_ms"]
        row: dict[str, Any] = {"concurrency": concurrency}
        for side in ("module", "native"):
            n = len(lat[side])
            row[side] = {
                "requests": n,
                "p50_ms": ms(percentile(lat[side], 50)),
                "p95_ms": ms(percentile(lat[side], 95)),
                "p99_ms": ms(percentile(lat[side], 99)),
                "mean_ms": ms(sum(lat[side]) / n),
                "throughput_rps": round(n / wall[side], 1),
                "statuses": {str(k): v for k, v in statuses[side].items()},
                # Synapse's own accounting of DB transactions, per request.
                "db_txns_per_request": {
                    desc: {
                        "per_request": round(v["count"] / n, 3),
                        "mean_ms": round(v["total_ms"] / v["count"], 3),
                    }
                    for desc, v in sorted(txns[side].items())
                    if v["count"] / n >= 0.05
                },
            }
        for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
            row[f"ratio_{key[:-3]}"] = round(row["module"][key] / row["native"][key], 3)
        row["ratio_throughput"] = round(
            row["module"]["throughput_rps"] / row["native"]["throughput_rps"], 3
        )
        results[str(concurrency)] = row
        log(
            f"{action} c={concurrency}: p50 module {row['module']['p50_ms']} ms / native "
            f"{row['native']['p50_ms']} ms (x{row['ratio_p50']}), throughput "
            f"{row['module']['throughput_rps']} / {row['native']['throughput_rps']} req/s "
            f"(x{row['ratio_throughput']})"
        )
    for pool in pools.values():
        pool.close()
    return results, used


def seal_cost(hs: Any, n: int = 2000) -> dict[str, float]:
    """The cost of sealing one entry (canonical JSON, SHA-256, ed25519), in process."""
    from signedjson.key import read_signing_keys

    from matrix_leave_forget.audit.entry import GENESIS_HASH, seal_entry

    with open(os.path.join(hs.workdir, "signing.key")) as f:
        key = read_signing_keys(f)[0]
    fields = {
        "seq": 1,
        "ts": 1_700_000_000_000,
        "origin": "test.local",
        "instance": "master",
        "action": "leave",
        "user_id": "@bench1:test.local",
        "room_id": "!abcdefghijklmnop:test.local",
        "reason": None,
        "event_id": "$" + "x" * 43,
        "device_id": "ABCDEFGHIJ",
        "outcome": "ok",
        "prev_hash": GENESIS_HASH,
    }
    started = time.perf_counter()
    for i in range(n):
        seal_entry({**fields, "seq": i + 1}, "test.local", key)
    return {"seal_entry_us": round((time.perf_counter() - started) / n * 1e6, 1)}


def run(database: str, quick: bool) -> dict[str, Any]:
    plan = PLANS["quick" if quick else "full"]
    need = 2 * (WARMUP + sum(n for n, _ in plan.values()))
    users = 24 if quick else 48
    rooms = -(-need // users) + 1
    hs = start_synapse(database)
    native = SynapseProcess(None, database=database)
    try:
        native.start()
        side_rooms = -(-rooms // 2) + 1
        pairs = {
            "module": set_up(hs, users, side_rooms),
            "native": set_up(native, users, side_rooms),
        }
        servers = {"module": (hs, hs.module_port), "native": (native, native.client_port)}
        seal = seal_cost(hs)
        leave, used = measure(servers, "leave", pairs, plan)
        # Forget the pairs just left, in the same order: identical work per side.
        forget, _ = measure(servers, "forget", used, plan)
        result: dict[str, Any] = {
            "database": database,
            "mode": "quick" if quick else "full",
            "users": users,
            "rooms": rooms,
            "leave": leave,
            "forget": forget,
            "in_process": seal,
        }
        return result
    finally:
        hs.cleanup()
        native.cleanup()


def report(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        for action in ("leave", "forget"):
            rows = []
            for c, row in res[action].items():
                m, n = row["module"], row["native"]
                rows.append(
                    [
                        c,
                        m["p50_ms"],
                        n["p50_ms"],
                        row["ratio_p50"],
                        m["p95_ms"],
                        n["p95_ms"],
                        row["ratio_p95"],
                        m["p99_ms"],
                        n["p99_ms"],
                        row["ratio_p99"],
                        m["throughput_rps"],
                        n["throughput_rps"],
                        row["ratio_throughput"],
                    ]
                )
            lines.append(
                f"\n{action} — {res['database']} ({res['mode']}; module vs native, ms and req/s)\n"
            )
            lines.append(
                table(
                    [
                        "c",
                        "p50 mod",
                        "p50 nat",
                        "ratio",
                        "p95 mod",
                        "p95 nat",
                        "ratio",
                        "p99 mod",
                        "p99 nat",
                        "ratio",
                        "rps mod",
                        "rps nat",
                        "ratio",
                    ],
                    rows,
                )
            )
            txn_rows = []
            for c, row in res[action].items():
                for side in ("module", "native"):
                    for desc, v in row[side]["db_txns_per_request"].items():
                        if desc not in SHOWN_TXNS and not desc.startswith("leave_forget"):
                            continue  # the rest is in the JSON
                        txn_rows.append([c, side, desc, v["per_request"], v["mean_ms"]])
            lines.append(f"\nDB transactions per {action} request (Synapse's own counters)\n")
            lines.append(table(["c", "side", "transaction", "per request", "mean ms"], txn_rows))
        lines.append(
            "\nseal_entry (canonical JSON + SHA-256 + ed25519) in process: "
            f"{res['in_process']['seal_entry_us']} µs"
        )
    return "\n".join(lines)


def summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers as one JSON object (the full record is in the JSON file)."""
    out: dict[str, Any] = {}
    for res in results:
        for action in ("leave", "forget"):
            for c, row in res[action].items():
                out[f"{res['database']}.{action}.c{c}"] = {
                    "p50_ms": [row["module"]["p50_ms"], row["native"]["p50_ms"], row["ratio_p50"]],
                    "p95_ms": [row["module"]["p95_ms"], row["native"]["p95_ms"], row["ratio_p95"]],
                    "p99_ms": [row["module"]["p99_ms"], row["native"]["p99_ms"], row["ratio_p99"]],
                    "rps": [
                        row["module"]["throughput_rps"],
                        row["native"]["throughput_rps"],
                        row["ratio_throughput"],
                    ],
                }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests (~1-2 min per database)"
    )
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args(argv)
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    results = []
    for db in databases:
        log(f"endpoints on {db}")
        results.append(run(db, args.quick))
    out = {"machine": machine(), "results": results}
    path = write_json(f"endpoints{'-quick' if args.quick else ''}.json", out)
    print(report(results))
    print(f"\nJSON: {path}")
    print(json.dumps(summary(results), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
