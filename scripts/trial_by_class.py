"""trial, with each worker of ``-j N`` taking a whole test class at a time.

Stock ``trial -j N`` hands tests out one by one from a shared queue, so both
workers of an environment run tests of the same class side by side, and each
boots that class's Synapse (tests/integration/base.py, ``ClassFixtures``): of
the ~100 Synapse boots of an environment, ~40 were such duplicates (about 1.7
CPU seconds each), and the history matrix built its two servers and 48 rooms
twice. Here a worker takes every test of a class at once; the classes of the
most tests go first (the longest-first rule of scheduling, with a class's
test count standing for its length), so that no worker is left with a long
one at the end.

This replaces ``DistTrialRunner._driveWorker``, a private method of Twisted's
(the same shape since Twisted 22.8). If Twisted's runner changes shape, stock
trial runs the same tests (only slower) and says so on stderr.

Usage: ``python scripts/trial_by_class.py [trial arguments]`` (tox.ini).
"""

from __future__ import annotations

import atexit
import inspect
import os
import sys
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from twisted.python.failure import Failure
from twisted.scripts import trial

# How many of the slowest classes the run's end names (on stderr), to show
# where an environment's time goes; MLF_CLASS_TIMES=0 turns it off.
SLOWEST_SHOWN = int(os.environ.get("MLF_CLASS_TIMES", "12"))


def class_groups(cases: Iterable[Any]) -> deque[list[Any]]:
    """Consecutive tests of one class, as lists; the classes of most tests first.

    Classes of as many tests keep the order trial found them in.
    """
    groups: list[list[Any]] = []
    for case in cases:
        if groups and type(groups[-1][0]) is type(case):
            groups[-1].append(case)
        else:
            groups.append([case])
    return deque(sorted(groups, key=len, reverse=True))


def install() -> bool:
    """Make disttrial hand out whole classes; False if its runner is not as expected."""
    try:
        from twisted.trial._dist.disttrial import DistTrialRunner

        expected = ["self", "result", "testCases", "worker"]
        if list(inspect.signature(DistTrialRunner._driveWorker).parameters) != expected:
            return False
    except (ImportError, AttributeError, TypeError, ValueError):
        return False

    # The iterator of the run being driven, and its groups.
    shared: list[Any] = [None, deque()]
    durations: dict[str, float] = {}

    async def drive_worker(self: Any, result: Any, test_cases: Any, worker: Any) -> None:
        # Every worker's driver gets the same iterator of the run: the first
        # one to start groups it, the others share those groups. Nothing
        # awaits between taking a group off the queue and running its first
        # test, so no two workers take the same one.
        if shared[0] is not test_cases:
            shared[:] = [test_cases, class_groups(test_cases)]
        groups = shared[1]
        while groups:
            group = groups.popleft()
            started = time.monotonic()
            for case in group:
                try:
                    await worker.run(case, result)
                except Exception:
                    result.original.addError(case, Failure())
            name = f"{type(group[0]).__module__}.{type(group[0]).__qualname__}"
            durations[name] = durations.get(name, 0.0) + time.monotonic() - started

    def report_durations() -> None:
        slowest = sorted(durations.items(), key=lambda item: -item[1])[:SLOWEST_SHOWN]
        if slowest:
            print(f"trial_by_class: the {len(slowest)} slowest classes (wall s):", file=sys.stderr)
            for name, seconds in slowest:
                print(f"  {seconds:7.1f}  {name}", file=sys.stderr)

    atexit.register(report_durations)

    DistTrialRunner._driveWorker = drive_worker
    return True


if __name__ == "__main__":
    if not install():
        print(
            "trial_by_class: Twisted's disttrial is not as expected; "
            "running stock trial (tests are handed out one by one)",
            file=sys.stderr,
        )
    sys.argv[0] = "trial"
    trial.run()
