"""Prometheus metrics, exposed through Synapse's own metrics listener.

Synapse serves prometheus_client's default registry on its ``metrics``
listener (``enable_metrics: true``), so metrics defined here appear there with
no extra set-up. Every series carries ``server_name``, as Synapse's own do, so
several homeservers in one process stay apart.
"""

from prometheus_client import Counter, Gauge, Histogram

# Leave and forget latencies run from a few ms (forget) to seconds (a leave
# that federates to a large room); purge decisions are batched, per room.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PURGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)

requests_total = Counter(
    "synapse_leave_forget_requests_total",
    "Leave and forget requests served by matrix-leave-forget, by outcome "
    "(ok, the Matrix errcode of a refusal, or error for an internal error).",
    ["server_name", "action", "outcome"],
)

request_seconds = Histogram(
    "synapse_leave_forget_request_seconds",
    "Time to serve a leave or forget request, by outcome.",
    ["server_name", "action", "outcome"],
    buckets=_REQUEST_BUCKETS,
)

purges_total = Counter(
    "synapse_leave_forget_purges_total",
    "Retention decisions on rooms due for purge, by outcome "
    "(purge, dry_run, held, cancelled, purged).",
    ["server_name", "outcome"],
)

purge_seconds = Histogram(
    "synapse_leave_forget_purge_seconds",
    "Time to decide one due room, by outcome: a decision transaction's time "
    "divided by the rooms it decided, observed once per transaction and outcome.",
    ["server_name", "outcome"],
    buckets=_PURGE_BUCKETS,
)

refusals_suppressed_total = Counter(
    "synapse_leave_forget_audit_refusals_suppressed_total",
    "Refused leave and forget requests counted but not appended to the audit "
    "log, because their user had spent the refusal budget (audit.refusal_budget).",
    ["server_name"],
)

audit_write_failures_total = Counter(
    "synapse_leave_forget_audit_write_failures_total",
    "Leave and forget requests served whose audit entry could not be written "
    "(each one is a gap in the audit log; the error is logged).",
    ["server_name", "action"],
)

purge_failures_total = Counter(
    "synapse_leave_forget_purge_failures_total",
    "Purges that failed and will be retried: Synapse refused to start one "
    "(refused) or its purge task failed (failed).",
    ["server_name", "reason"],
)

# Purges take from tens of milliseconds (a small room) to minutes (a room of
# millions of events, or one resumed after a crash behind Synapse's lock).
_PURGE_TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

purge_backlog = Gauge(
    "synapse_leave_forget_purge_backlog",
    "Rooms due for purge and not held, waiting for the pump (set at each sweep, "
    "lowered as the pump decides rooms).",
    ["server_name"],
)

purges_in_flight = Gauge(
    "synapse_leave_forget_purges_in_flight",
    "Rooms whose purge Synapse was asked for and has not finished (state purging).",
    ["server_name"],
)

purge_task_seconds = Histogram(
    "synapse_leave_forget_purge_task_seconds",
    "Time from asking Synapse to purge a room to seeing it gone: what the pacer "
    "charges against retention.purge_load.",
    ["server_name"],
    buckets=_PURGE_TASK_BUCKETS,
)

media_index_lag = Gauge(
    "synapse_leave_forget_media_index_lag",
    "Positions of Synapse's events stream the media reference index has not read yet "
    "(set at each run of the index, on the background-tasks process).",
    ["server_name"],
)

media_index_backfill_remaining = Gauge(
    "synapse_leave_forget_media_index_backfill_remaining",
    "Positions of Synapse's events stream from before the media reference index "
    "that it has not back-filled yet (0 once the back-fill is done; media is "
    "deleted only then).",
    ["server_name"],
)

# Label values that alert rules (docs/monitoring/alerts.yml) read. A counter
# child that does not exist yet has no series, and `increase()` over a series
# that first appears at 1 sees no increase: the first failure would not alert.
ACTIONS = ("leave", "forget")
REQUEST_OUTCOMES_ALERTED = ("ok", "error")
PURGE_OUTCOMES = ("purge", "dry_run", "held", "cancelled", "purged")
PURGE_FAILURE_REASONS = ("refused", "failed")


def initialise(server_name: str, purges: bool) -> None:
    """Create, at 0, every series an alert reads, so the first failure is an increase.

    Args:
        server_name: This homeserver's name (the ``server_name`` label).
        purges: Whether this process runs the retention sweep (Synapse's
            background-tasks process): the purge series exist only there.
    """
    for action in ACTIONS:
        audit_write_failures_total.labels(server_name, action)
        for outcome in REQUEST_OUTCOMES_ALERTED:
            requests_total.labels(server_name, action, outcome)
    if purges:
        for outcome in PURGE_OUTCOMES:
            purges_total.labels(server_name, outcome)
        for reason in PURGE_FAILURE_REASONS:
            purge_failures_total.labels(server_name, reason)
        purge_backlog.labels(server_name)
        purges_in_flight.labels(server_name)
