"""The module's clock, and times as people read them (ISO 8601 UTC with milliseconds)."""

import datetime
import time
from typing import Any


def now_ms() -> int:
    """Wall-clock milliseconds, as Synapse stamps events: the one clock of the module.

    (ModuleApi.get_current_time_msec is newer than the oldest supported Synapse.)
    """
    return int(time.time() * 1000)


def iso8601(ms: Any) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (the CLI's ``--since`` accepts it back).

    Args:
        ms: Milliseconds since the epoch, or None.

    Returns:
        For example ``2024-05-01T12:00:00.000Z``, or ``-`` for None. A value
        that is no time the module writes (before 1970, beyond year 9999, not
        a number: an edited row, a bad ``--since``) is shown as it is, with
        " ms", and never raises.
    """
    if ms is None:
        return "-"
    try:
        # Before 1970 too: no time the module writes, and --since refuses it back.
        if int(ms) < 0:
            return f"{ms} ms"
        moment = datetime.datetime.fromtimestamp(int(ms) // 1000, tz=datetime.timezone.utc)
    except (OverflowError, ValueError, TypeError, OSError):  # beyond year 9999, not a number
        return f"{ms} ms"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ms) % 1000:03d}Z"
