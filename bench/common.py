"""Shared helpers for the benchmark scripts (not tests: nothing here asserts a timing).

Every script starts a real Synapse through ``tests/support/harness.py``
(imported, unchanged), prints its results as plain-text tables and writes them
as JSON under ``bench/results/``.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tests.support.harness import (  # noqa: E402
    SERVER_NAME,
    SynapseProcess,
    User,
    quote_room,
    request,
)
from tests.support.rawdb import pg_connect_args, pg_connection  # noqa: E402

RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
ADMIN = "/_synapse/client/leave_forget/v1/admin"

__all__ = [
    "ADMIN",
    "SERVER_NAME",
    "SynapseProcess",
    "User",
    "pg_connect_args",
    "quote_room",
    "request",
]


# -- machine -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    import synapse

    pg_version = None
    try:
        conn = pg_connection("postgres")
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            pg_version = cur.fetchone()[0]
        conn.close()
    except Exception:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "synapse": synapse.__version__,
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version,
        "kernel": platform.release(),
    }


# -- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (values need not be sorted)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(pct / 100.0 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


# -- output --------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    rows = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def write_json(name: str, data: Any) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- Synapse -------------------------------------------------------------------


def start_synapse(
    database: str,
    module_config: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> SynapseProcess:
    """A running Synapse with the module in ``mount: listener`` mode, forget unlimited."""
    config = {"mount": "listener", "forget_rate_limit": None, **(module_config or {})}
    hs = SynapseProcess(config, extra_config or {}, database=database)
    try:
        hs.start()
    except Exception:
        hs.cleanup()
        raise
    return hs


def parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 8) -> list[Any]:
    """Run fn over items on a few threads (set-up only, never measured)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def synapse_metrics(hs: SynapseProcess) -> dict[str, float]:
    """Synapse's per-transaction counters: {"count:desc": n, "sum:desc": seconds}."""
    text = hs.metrics()
    out: dict[str, float] = {}
    pattern = re.compile(
        r'^synapse_storage_transaction_time_(count|sum)(?:_total)?\{desc="([^"]+)"[^}]*\} (\S+)$'
    )
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            out[f"{m.group(1)}:{m.group(2)}"] = out.get(f"{m.group(1)}:{m.group(2)}", 0.0) + float(
                m.group(3)
            )
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per transaction description: how many ran and their mean duration in ms."""
    result: dict[str, dict[str, float]] = {}
    for key, value in after.items():
        kind, desc = key.split(":", 1)
        if kind != "count":
            continue
        count = value - before.get(key, 0.0)
        if count <= 0:
            continue
        total = after.get(f"sum:{desc}", 0.0) - before.get(f"sum:{desc}", 0.0)
        result[desc] = {"count": count, "total_ms": total * 1000.0, "mean_ms": total * 1000 / count}
    return result


# -- HTTP load -----------------------------------------------------------------


class KeepAlivePool:
    """One persistent HTTP/1.1 connection per worker slot to one port."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.conns = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(size)
        ]

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def _post(
    conn: http.client.HTTPConnection, path: str, token: str, body: bytes
) -> tuple[int, bytes]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    for attempt in range(2):
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (http.client.HTTPException, ConnectionError, OSError):
            # A keep-alive connection the server closed: reconnect once.
            conn.close()
            if attempt:
                raise
    raise AssertionError("unreachable")


def run_batch(
    pool: KeepAlivePool,
    jobs: Sequence[tuple[str, str]],
    concurrency: int,
    body: bytes = b"{}",
) -> tuple[list[float], float, dict[int, int]]:
    """POST each (path, token) job, ``concurrency`` at a time on keep-alive connections.

    Returns:
        Per-request latencies (s), the batch's wall time (s), and a count per status.
    """
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
            status, _ = _post(conn, path, token, body)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started, statuses
