"""scripts/trial_by_class.py hands whole classes to trial's workers, those of most tests first."""

import importlib.util
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "trial_by_class.py"


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("trial_by_class", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Small(SynchronousTestCase):
    """Two stand-in tests (not named test_*: trial does not collect them)."""

    def case_a(self) -> None:
        pass

    def case_b(self) -> None:
        pass


class Other(SynchronousTestCase):
    """A stand-in test of another class."""

    def case_a(self) -> None:
        pass


class TrialByClassTest(SynchronousTestCase):
    def test_groups_keep_classes_whole_and_most_tests_first(self) -> None:
        """Tests of one class form one group, in order; groups of more tests go
        first, and groups of as many tests keep the order they were found in."""
        script = load_script()
        cases = [
            Small("case_a"),
            Other("case_a"),
            Small("case_a"),
            Small("case_b"),
            Small("case_a"),
            Other("case_a"),
            Other("case_a"),
        ]
        groups = list(script.class_groups(cases))
        self.assertEqual(
            [(type(g[0]), len(g)) for g in groups],
            [(Small, 3), (Other, 2), (Small, 1), (Other, 1)],
        )
        self.assertEqual([c._testMethodName for c in groups[0]], ["case_a", "case_b", "case_a"])

    def test_installs_on_this_twisted(self) -> None:
        """The Twisted the tests run on has the runner shape the script replaces."""
        from twisted.trial._dist.disttrial import DistTrialRunner

        original = DistTrialRunner._driveWorker
        try:
            self.assertTrue(load_script().install())
            self.assertIsNot(DistTrialRunner._driveWorker, original)
        finally:
            DistTrialRunner._driveWorker = original
