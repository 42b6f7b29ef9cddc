"""The retention summary: the purge backlog, the purge rate and the time to drain it.

One definition for ``GET .../admin/retention`` and the CLI's
``rooms --state pending``; the counts come from the database
(``retention_counts_txn``, ``count_purged_since_txn``), so every process and
the offline CLI answer alike.
"""

from collections.abc import Mapping
from typing import Any

# The window over which the purge rate is measured.
RATE_WINDOW_MS = 60 * 1000


def retention_summary(
    counts: Mapping[str, int], purged: int, estimated_rate_per_s: float | None = None
) -> dict[str, Any]:
    """The summary of the backlog ``counts`` and the rooms ``purged`` over RATE_WINDOW_MS.

    Args:
        counts: ``retention_counts_txn``'s counts at the same moment.
        purged: Rooms recorded purged over the last RATE_WINDOW_MS.
        estimated_rate_per_s: The pacer's estimate, for the time to drain
            while no purge finished in the window (the purging process only).

    Returns:
        ``backlog``, ``in_flight``, ``held``, ``waiting``,
        ``purged_last_minute``, ``rate_per_s`` and ``eta_s`` (seconds to drain:
        0 with nothing left, None while no rate is known).
    """
    rate = purged / (RATE_WINDOW_MS / 1000)
    rate_for_eta = rate if rate or not estimated_rate_per_s else float(estimated_rate_per_s)
    remaining = counts["due"] + counts["in_flight"]
    return {
        "backlog": counts["due"],
        "in_flight": counts["in_flight"],
        "held": counts["held"],
        "waiting": counts["waiting"],
        "purged_last_minute": purged,
        "rate_per_s": round(rate, 3),
        "eta_s": (
            0 if not remaining else (round(remaining / rate_for_eta, 1) if rate_for_eta else None)
        ),
    }
