"""Run every benchmark and write one report (tables + JSON) under bench/results/.

    python bench/run_all.py --quick   # smaller sizes, SQLite only for endpoints and reads
    python bench/run_all.py           # the full run (~1.5 hours): both engines, 10^4..10^6

PostgreSQL runs need the usual PG* variables (PGHOST=127.0.0.1 PGUSER=postgres
PGPASSWORD=postgres); without a reachable server, pass --database sqlite.
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

from bench import endpoints, media, purge_storm, queries, reads, sweep  # noqa: E402
from bench.common import RESULTS_DIR, log, machine, write_json  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--only",
        choices=("endpoints", "queries", "sweep", "purge_storm", "reads", "media"),
        action="append",
    )
    args = parser.parse_args(argv)
    dbs = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    only = set(args.only or ("endpoints", "queries", "sweep", "purge_storm", "reads", "media"))
    started = time.monotonic()
    report: list[str] = []
    data: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    if "endpoints" in only:
        ep_dbs = ("sqlite",) if args.quick and args.database == "both" else dbs
        results = [endpoints.run(db, args.quick) for db in ep_dbs]
        data["endpoints"] = results
        report.append("## Endpoints: module vs native\n" + endpoints.report(results))
    if "reads" in only:
        rd_dbs = ("sqlite",) if args.quick and args.database == "both" else dbs
        results = [reads.run(db, args.quick) for db in rd_dbs]
        data["reads"] = results
        report.append("## Guarded reads: module vs native\n" + reads.report(results))
    if "queries" in only:
        sizes = [10**4] if args.quick else [10**4, 10**5, 10**6]
        results = queries.run(dbs, sizes, 5 if args.quick else 7, {"postgres": 10**5})
        data["queries"] = results
        report.append("## Operator queries\n" + queries.report(results))
    if "sweep" in only:
        n = 10**4 if args.quick else 10**5
        results = [sweep.run(db, n, 200) for db in dbs]
        data["sweep"] = results
        report.append("## Retention sweep\n" + sweep.report(results))
    if "purge_storm" in only:
        storm_dbs = ("sqlite",) if args.quick and args.database == "both" else dbs
        sizes = [50] if args.quick else [50, 200, 1000]
        results = purge_storm.run_all(
            storm_dbs, sizes, ("native", "module"), 10 if args.quick else 20
        )
        data["purge_storm"] = results
        report.append("## Purge storm: native vs module\n" + purge_storm.report(results))
    if "media" in only:
        # Quick: SQLite only, as for the other HTTP benchmarks.
        md_dbs = ("sqlite",) if args.quick and args.database == "both" else dbs
        results = media.run_all(md_dbs, args.quick)
        data["media"] = results
        report.append("## Media deletion and the reference index\n" + media.report(results))
    data["seconds"] = round(time.monotonic() - started)
    name = "run_all-quick" if args.quick else "run_all"
    path = write_json(f"{name}.json", data)
    text = "\n\n".join(report)
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nJSON: {path}\nMarkdown: {os.path.join(RESULTS_DIR, name + '.md')}")
    print(f"Took {data['seconds']} s")
    print(json.dumps({"machine": data["machine"], "seconds": data["seconds"]}, default=str))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
