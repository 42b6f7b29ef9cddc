"""Times as the CLI and log messages show them, absurd ones included."""

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.timestamps import iso8601


class Iso8601Test(SynchronousTestCase):
    """iso8601() renders every value an audit row can hold, never raising."""

    def test_ordinary_times(self) -> None:
        """Milliseconds since the epoch read as ISO 8601 UTC with milliseconds."""
        self.assertEqual(iso8601(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso8601(1700000001234), "2023-11-14T22:13:21.234Z")
        self.assertEqual(iso8601(253402300799999), "9999-12-31T23:59:59.999Z")
        self.assertEqual(iso8601(None), "-")

    def test_absurd_times_are_shown_raw(self) -> None:
        """Beyond year 9999, before 1970, or past 64 bits: the raw number and " ms"
        (a time before 1970 read as a date --since would refuse back)."""
        for ms in (10**18, 253402300800000, 2**63 - 1, 2**63, 10**30):
            self.assertEqual(iso8601(ms), f"{ms} ms")
        for ms in (-1, -1000, -(10**15), -(10**18), -(2**63)):
            self.assertEqual(iso8601(ms), f"{ms} ms")

    def test_values_that_are_no_number(self) -> None:
        """Whatever an edited row holds is shown, not a traceback."""
        for value in ("soon", float("nan"), float("inf"), float("-inf"), [], {}):
            self.assertEqual(iso8601(value), f"{value} ms")
