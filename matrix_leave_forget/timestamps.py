"""Times as people read them: ISO 8601 UTC with milliseconds, in logs, messages and the CLI."""

import datetime
from typing import Any


def iso8601(ms: Any) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (the CLI's ``--since`` accepts it back).

    Args:
        ms: Milliseconds since the epoch, or None.

    Returns:
        For example ``2024-05-01T12:00:00.000Z``, or ``-`` for None.
    """
    if ms is None:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(int(ms) // 1000, tz=datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):  # beyond year 9999 (an edited row)
        return f"{ms} ms"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ms) % 1000:03d}Z"
