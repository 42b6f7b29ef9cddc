"""docs/monitoring.md and docs/cli.md say what the code and the rules file do."""

import os
import re

import yaml
from prometheus_client.metrics import MetricWrapperBase
from twisted.trial import unittest

from matrix_leave_forget import metrics
from matrix_leave_forget.audit.log import STORED_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*path: str) -> str:
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of any level."""
    start = text.index(heading + "\n") + len(heading) + 1
    following = re.search(r"^#", text[start:], re.M)
    return text[start : start + following.start()] if following else text[start:]


def _first_cells(section: str) -> list[str]:
    """The first cell of each table row of ``section`` (header and rule excluded)."""
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    return [row.split("|")[1].strip() for row in rows[1:]]


def _code_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric metrics.py defines: exported name -> (type, label names)."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = value._type
            name = value._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, tuple(value._labelnames))
    return found


class MonitoringDocTests(unittest.TestCase):
    doc = _read("docs", "monitoring.md")

    def test_metrics_table_matches_metrics_py(self) -> None:
        """The metrics table lists exactly the metrics metrics.py defines, each
        with its type and its labels."""
        code = _code_metrics()
        self.assertGreaterEqual(len(code), 10)
        rows = [
            [cell.strip() for cell in line.split("|")[1:-1]]
            for line in _section(self.doc, "## Metrics").splitlines()
            if line.startswith("| `")
        ]
        documented = {row[0].strip("`"): row for row in rows}
        self.assertEqual(sorted(documented), sorted(code))
        for name, (kind, labels) in code.items():
            row = documented[name]
            self.assertEqual(row[1], kind, name)
            self.assertEqual(tuple(re.findall(r"`(\w+)`", row[2])), labels, name)

    def test_request_outcomes_match_the_code(self) -> None:
        """The request outcomes are ok, an errcode and error, as the client
        resource counts them (error: the default when the request raised)."""
        cells = _first_cells(_section(self.doc, "### Request outcomes"))
        self.assertEqual(cells[0], "`ok`")
        self.assertIn("errcode", cells[1])
        self.assertEqual(cells[2], "`error`")
        client = _read("matrix_leave_forget", "http", "client.py")
        self.assertIn('outcome = "error"', client)
        self.assertIn('outcome = "ok"', client)
        self.assertIn("outcome = client_errcode(error)", client)
        self.assertEqual(metrics.REQUEST_OUTCOMES_ALERTED, ("ok", "error"))

    def test_purge_outcomes_match_the_code(self) -> None:
        """The purge outcomes documented are those metrics.py creates, and each
        appears where the sweeper counts decisions."""
        cells = [c.strip("`") for c in _first_cells(_section(self.doc, "### Purge outcomes"))]
        self.assertEqual(cells, list(metrics.PURGE_OUTCOMES))
        sweeper = _read("matrix_leave_forget", "retention", "sweeper.py")
        for outcome in metrics.PURGE_OUTCOMES:
            self.assertIn(f'"{outcome}"', sweeper, outcome)

    def test_alert_list_matches_the_rules_file(self) -> None:
        """The alert table lists exactly the rules of alerts.yml, with their severity,
        and every metric the rules read is in the metrics table."""
        rules = yaml.safe_load(_read("docs", "monitoring", "alerts.yml"))
        alerts = {
            rule["alert"]: rule
            for group in rules["groups"]
            for rule in group["rules"]
            if "alert" in rule
        }
        rows = [
            [cell.strip() for cell in line.split("|")[1:-1]]
            for line in _section(self.doc, "## Alerts").splitlines()
            if line.startswith("| `")
        ]
        documented = {row[0].strip("`"): row[1] for row in rows}
        self.assertEqual(sorted(documented), sorted(alerts))
        for name, rule in alerts.items():
            self.assertEqual(documented[name], rule["labels"]["severity"], name)
        read = set(
            re.findall(r"synapse_leave_forget_\w+", _read("docs", "monitoring", "alerts.yml"))
        )
        self.assertTrue(read)
        self.assertEqual(sorted(read - set(_code_metrics())), [])

    def test_readme_points_here(self) -> None:
        """The README links this page rather than keeping a list of its own."""
        readme = _read("README.md")
        self.assertIn("docs/monitoring.md", readme)
        # Metric families beyond the prefix live here only (no second list to drift).
        self.assertNotIn("synapse_leave_forget_audit_write_failures_total", readme)


class CliDocTests(unittest.TestCase):
    def test_csv_header_is_the_stored_columns(self) -> None:
        """docs/cli.md's CSV sample starts with the header the CLI writes (every
        stored column, via, actor and event_ts included) and its row has as many
        fields."""
        doc = _read("docs", "cli.md")
        lines = doc.splitlines()
        header = next(line for line in lines if line.startswith("seq,ts,"))
        self.assertEqual(header, ",".join(STORED_COLUMNS))
        import csv

        row = next(csv.reader([lines[lines.index(header) + 1]]))
        self.assertEqual(len(row), len(STORED_COLUMNS))

    def test_demo_dir_is_explained(self) -> None:
        """docs/cli.md says what scripts/demo.sh --dir does, and demo.py has it."""
        self.assertIn("`--dir DIR`", _read("docs", "cli.md"))
        self.assertIn('"--dir"', _read("scripts", "demo.py"))
