"""The full adversarial product of issue 17, against the module or native Synapse.

Every membership sequence of up to 4 changes (leave, kick, ban, unban, knock,
rescind, invite, reject, rejoin) × 6 history-visibility schedules × forgotten
or not, each read on every path by the former member and checked against the
reference model (tests/history_model.py); see
tests/integration/membership_sequences.py. CI runs a deterministic sample
(tests/integration/test_history_sequences.py).

Usage::

    python scripts/history_sequences.py [--side module|native] [--sample N]
        [--database sqlite|postgres] [--worker] [--threads 3] [--verbose]

``--side native`` runs Synapse without the module: what the guard is up against.
``--worker`` runs a main process and a generic worker (PostgreSQL and Redis, as
tests/integration/workers.py): writes go to the main process, the former
member's and the never-member's reads to the worker.
Exits 1 if any case fails.
"""

import argparse
import collections
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.integration.membership_sequences import Runner, all_cases, sample  # noqa: E402
from tests.integration.workers import WorkerDeployment  # noqa: E402
from tests.support.harness import SynapseProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("module", "native"), default="module")
    parser.add_argument("--sample", type=int, default=0, help="0 = every case")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--worker", action="store_true", help="read through a generic worker")
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="print every failure")
    args = parser.parse_args()
    cases = sample(args.sample) if args.sample else all_cases()
    module = {"mount": "intercept"} if args.side == "module" else None
    if args.worker:
        if module is None:
            parser.error("--worker runs the module's deployment: not with --side native")
        args.database = "postgres"
        deployment = WorkerDeployment({**module, "forget_rate_limit": None})
        deployment.start()
        hs, reader, cleanup = deployment.main, deployment.worker, deployment.cleanup
    else:
        hs = SynapseProcess(module, {"bcrypt_rounds": 4}, database=args.database)
        hs.start()
        reader, cleanup = None, hs.cleanup
    started = time.monotonic()
    try:
        runner = Runner(hs, "x", reader=reader)
        with ThreadPoolExecutor(args.threads) as pool:
            outcomes = list(pool.map(runner.run, cases))
    finally:
        cleanup()
    failed = [o for o in outcomes if o.failures]
    by_kind: collections.Counter[str] = collections.Counter()
    for outcome in failed:
        for failure in outcome.failures:
            by_kind[failure.split(":")[0]] += 1
            if args.verbose:
                print(f"{outcome.case.name}: {failure}")
    print(
        f"{args.side} ({args.database}{', worker' if args.worker else ''}): {len(cases)} cases in "
        f"{time.monotonic() - started:.0f} s, {len(failed)} failing, "
        f"{sum(o.leaks for o in outcomes)} leaked events"
    )
    for path, count in sorted(by_kind.items()):
        print(f"  {path}: {count} failing cases")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
