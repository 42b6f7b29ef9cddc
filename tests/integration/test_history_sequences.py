"""Membership sequences × history visibility × forget, checked against the reference model.

Issue 17: a former member who knocks, is re-invited, rescinds, rejects, is
unbanned... must not get back what their departure or forget took, and a
visibility changed later must not open what it did not open for anyone. One
Synapse with the module runs a deterministic sample of the full product
(tests/integration/membership_sequences.py; the full product is
``python scripts/history_sequences.py``), the cases issue 17 names included.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from tests.integration.base import SynapseTestCase
from tests.integration.membership_sequences import NAMED, Runner, sample
from tests.integration.workers import DeploymentTestCase

# About 2 minutes on one shared Synapse; MLF_SEQUENCE_SAMPLE changes it.
SAMPLE = int(os.environ.get("MLF_SEQUENCE_SAMPLE", "40"))


class MembershipSequenceTests(SynapseTestCase):
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = {"bcrypt_rounds": 4}

    def test_named_cases(self) -> None:
        """The sequences issue 17 names (knock, rescind, unban, re-invite, reject after a
        forget; world_readable after a forget; a rejoin) leak nothing, answer as to a
        never-member while the forget holds, and show pre again after a rejoin."""
        self.check_cases(NAMED, "n")

    def test_sampled_sequences(self) -> None:
        """A deterministic sample of every sequence of up to 4 membership changes ×
        6 visibility schedules × forgotten or not: no answer holds an event the
        model hides, and each case's refusals are a never-member's."""
        self.check_cases(sample(SAMPLE)[len(NAMED) :], "s")

    def check_cases(self, cases: list[Any], prefix: str) -> None:
        runner = Runner(self.hs, prefix)
        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(runner.run, cases))
        failures = [f"{o.case.name}: {f}" for o in outcomes for f in o.failures]
        self.assertEqual(failures, [], "\n".join(failures))


class WorkerSequenceTests(DeploymentTestCase):
    """The same on a generic worker (PostgreSQL only): writes to the main process,
    bob's and the never-member's reads to the worker, after replication caught up."""

    MODE = "intercept"
    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}

    def test_named_cases_on_a_worker(self) -> None:
        """The cases issue 17 names hold on the worker as on the main process."""
        runner = Runner(self.hs, "w", reader=self.worker)
        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(runner.run, NAMED))
        failures = [f"{o.case.name}: {f}" for o in outcomes for f in o.failures]
        self.assertEqual(failures, [], "\n".join(failures))
