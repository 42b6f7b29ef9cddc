"""Database work per leave: the module's endpoint vs Synapse without the module.

Counts instead of timing, so that a loaded machine does not blur the answer:
two Synapses configured alike (one with the module, driven through its
endpoint, ``mount: listener`` as bench/endpoints.py; one without), N
sequential leaves of fresh (user, room) pairs on each, and from Synapse's own
metrics, per leave: every DB transaction by description, and every SQL
statement by verb (``synapse_storage_query_time``: one per ``execute``, which
is one round trip on PostgreSQL; BEGIN is implicit, COMMIT one more per
transaction). Concurrent leaves share the module's group commit, so c = 1 is
the worst case for the module.

Usage::

    python bench/leave_txns.py [--database sqlite|postgres|both] [--leaves 40]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    KeepAlivePool,
    SynapseProcess,
    log,
    run_batch,
    start_synapse,
    table,
)
from bench.endpoints import _path, set_up  # noqa: E402

_COUNT = re.compile(
    r"^synapse_storage_(transaction_time|query_time)_count(?:_total)?"
    r'\{(?:[^}]*,)?(desc|verb)="([^"]+)"[^}]*\} (\S+)$'
)


def counters(hs: SynapseProcess) -> dict[tuple[str, str], float]:
    """{("txn", desc) | ("sql", verb): count} from Synapse's metrics."""
    out: dict[tuple[str, str], float] = {}
    for line in hs.metrics().splitlines():
        m = _COUNT.match(line)
        if m:
            kind = "txn" if m.group(1) == "transaction_time" else "sql"
            key = (kind, m.group(3))
            out[key] = out.get(key, 0.0) + float(m.group(4))
    return out


def per_leave(hs: SynapseProcess, port: int, pairs: list[tuple[str, str]]) -> dict[Any, float]:
    pool = KeepAlivePool(port, 1)
    try:
        run_batch(pool, [(_path(r, "leave"), t) for r, t in pairs[:5]], 1)  # warm-up
        measured = pairs[5:]
        time.sleep(1.0)  # let the warm-up's background work finish
        before = counters(hs)
        _, _, statuses = run_batch(pool, [(_path(r, "leave"), t) for r, t in measured], 1)
        time.sleep(1.0)  # and the measured leaves' (on_new_event, notifier)
        after = counters(hs)
    finally:
        pool.close()
    assert set(statuses) == {200}, statuses
    n = len(measured)
    return {
        key: round((after[key] - before.get(key, 0.0)) / n, 2)
        for key in after
        if after[key] - before.get(key, 0.0) > 0
    }


def run(database: str, leaves: int) -> str:
    module = start_synapse(database)
    native = SynapseProcess(None, database=database)
    try:
        native.start()
        sides = {
            "module": per_leave(module, module.module_port, set_up(module, 8, leaves // 8 + 2)),
            "native": per_leave(native, native.client_port, set_up(native, 8, leaves // 8 + 2)),
        }
    finally:
        module.cleanup()
        native.cleanup()
    keys = sorted(set(sides["module"]) | set(sides["native"]))
    rows = [
        [kind, name, sides["module"].get((kind, name), 0), sides["native"].get((kind, name), 0)]
        for kind, name in keys
    ]
    totals = [
        [kind, "(total)"]
        + [round(sum(v for k, v in sides[side].items() if k[0] == kind), 2) for side in sides]
        for kind in ("txn", "sql")
    ]
    return f"\n{database}: per leave (c = 1)\n" + table(
        ["kind", "transaction / verb", "module", "native"], rows + totals
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--leaves", type=int, default=40)
    args = parser.parse_args(argv)
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    for database in databases:
        log(f"{database}: {args.leaves} leaves per side")
        print(run(database, args.leaves + 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
