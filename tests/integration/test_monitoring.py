"""docs/monitoring: the Grafana dashboard and the alert rules fit the metrics really exported."""

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import yaml

from tests.integration.base import SynapseTestCase
from tests.support import rawdb
from tests.support.harness import REPO_ROOT, quote_room

MONITORING = os.path.join(REPO_ROOT, "docs", "monitoring")
DASHBOARD = os.path.join(MONITORING, "grafana-dashboard.json")
ALERTS = os.path.join(MONITORING, "alerts.yml")
MODULE_METRIC = re.compile(r"\bsynapse_leave_forget_[a-z_]+")
# The series a metric family of each type is scraped as.
SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported_series(scrape: str) -> set[str]:
    """Every series name of the module's families in a scrape, samples or not.

    Families come from the ``# TYPE`` lines, which prometheus_client writes
    even for a labelled metric that has no sample yet (a failure counter).
    """
    names: set[str] = set()
    for family, kind in re.findall(r"^# TYPE (synapse_leave_forget_\w+) (\w+)$", scrape, re.M):
        base = family[: -len("_total")] if family.endswith("_total") else family
        names.update(base + suffix for suffix in SUFFIXES[kind])
    return names


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def dashboard_metrics() -> set[str]:
    """The module's metric names in the dashboard's queries and variables."""
    with open(DASHBOARD) as f:
        return set(MODULE_METRIC.findall("\n".join(_strings(json.load(f)))))


def alert_metrics() -> set[str]:
    with open(ALERTS) as f:
        rules = yaml.safe_load(f)
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return set(MODULE_METRIC.findall("\n".join(exprs)))


class MonitoringTests(SynapseTestCase):
    MODE = "intercept"

    def test_dashboard_and_alerts_query_only_exported_metrics(self) -> None:
        """Every module metric the dashboard or an alert names is in a live
        scrape of Synapse's metrics listener (a renamed metric or a typo in a
        query fails here, not silently on the operator's screen)."""
        exported = exported_series(self.hs.metrics())
        self.assertIn("synapse_leave_forget_audit_write_failures_total", exported)
        used = dashboard_metrics() | alert_metrics()
        self.assertTrue(used)
        self.assertEqual(used - exported, set())

    def test_every_module_metric_has_a_panel(self) -> None:
        """Each metric family the module exports is shown on the dashboard."""
        families = set(re.findall(r"^# TYPE (synapse_leave_forget_\w+) ", self.hs.metrics(), re.M))
        self.assertTrue(families)
        shown = dashboard_metrics()
        for family in families:
            base = family[: -len("_total")] if family.endswith("_total") else family
            self.assertTrue(any(name.startswith(base) for name in shown), family)

    def test_alerts_cover_audit_and_purge_failures(self) -> None:
        """The alert rules watch the audit write failures and the purges."""
        used = alert_metrics()
        for metric in (
            "synapse_leave_forget_audit_write_failures_total",
            "synapse_leave_forget_purge_failures_total",
            "synapse_leave_forget_purges_total",
        ):
            self.assertIn(metric, used)

    def test_promtool_accepts_the_alert_rules(self) -> None:
        """Prometheus's own checker (promtool check rules) accepts the rules file."""
        promtool = shutil.which("promtool")
        if promtool is None:
            self.skipTest("promtool is not installed (Debian package `prometheus`)")
        result = subprocess.run(
            [promtool, "check", "rules", ALERTS], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(ALERTS) as f:
            count = sum(len(group["rules"]) for group in yaml.safe_load(f)["groups"])
        # Every rule in the file was read (none dropped as, say, a duplicate group).
        self.assertIn(f"SUCCESS: {count} rules found", result.stdout)


def _failure_count(scrape: str, action: str) -> float:
    name = "synapse_leave_forget_audit_write_failures_total"
    for line in scrape.splitlines():
        if line.startswith(name + "{") and f'action="{action}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class AuditWriteFailureTests(SynapseTestCase):
    MODE = "intercept"

    def test_failed_audit_write_is_counted(self) -> None:
        """A leave served while the audit table refuses writes (a trigger that
        aborts every insert) is counted in
        synapse_leave_forget_audit_write_failures_total, which the critical
        alert watches; the client still gets its 200, as the leave happened."""
        user = self.hs.register("unrecorded")
        room = self.hs.create_room(user)
        before = _failure_count(self.hs.metrics(), "leave")
        if self.hs.database == "sqlite":
            rawdb.execute(
                self.hs,
                "CREATE TRIGGER mlf_test_refuse BEFORE INSERT ON leave_forget_audit "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            drop = "DROP TRIGGER mlf_test_refuse"
        else:
            rawdb.execute(
                self.hs,
                "CREATE FUNCTION mlf_test_refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql; "
                "CREATE TRIGGER mlf_test_refuse BEFORE INSERT ON leave_forget_audit "
                "FOR EACH ROW EXECUTE FUNCTION mlf_test_refuse();",
            )
            drop = "DROP TRIGGER mlf_test_refuse ON leave_forget_audit"
        try:
            resp = self.hs.client(
                "POST",
                f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
                {},
                token=user.access_token,
            )
        finally:
            rawdb.execute(self.hs, drop)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(_failure_count(self.hs.metrics(), "leave"), before + 1)
        self.assertIn("Could not record leave", self.hs.log_text())
