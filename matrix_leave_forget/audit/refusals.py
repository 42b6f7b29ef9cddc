"""How much audit log refused requests may write: a per-user budget.

A refused leave or forget changed nothing, yet it is worth a line to an
operator (who is probing which rooms, with what reason). Anyone, a guest
included, can send refusals as fast as Synapse's rate limits allow, each
with a reason as large as the request body limit; every one appended whole
would let a single account grow the append-only log by megabytes a second.
So a refusal's entry keeps a short prefix of its reason with the whole
reason's size and SHA-256 (``refused_reason``), and each user has a token
bucket of refusal entries: beyond it refusals are counted (a metric, one
warning per user per dry spell, and ``suppressed`` on the user's next
refusal entry) but not appended one by one. See docs/audit.md, "Growth bound".
"""

import logging
import time
from collections.abc import Callable

from matrix_leave_forget.audit.entry import reason_digest

logger = logging.getLogger(__name__)

# A refused request's reason is kept up to this many characters (code points).
REFUSED_REASON_PREFIX_CHARS = 128

# Users tracked before idle, full, clean buckets are dropped.
_PRUNE_AT = 10_000


def refused_reason(reason: str | None) -> tuple[str | None, int | None, str | None]:
    """What a refusal's entry keeps of its reason: (prefix, size, sha256).

    A reason of at most REFUSED_REASON_PREFIX_CHARS characters is kept whole
    (size and hash None); a longer one is cut to that many characters and the
    whole reason's UTF-8 size in bytes and unpadded-base64 SHA-256 are kept,
    so that a reason shown elsewhere can be matched against the entry.
    """
    if reason is None or len(reason) <= REFUSED_REASON_PREFIX_CHARS:
        return reason, None, None
    size, digest = reason_digest(reason)
    return reason[:REFUSED_REASON_PREFIX_CHARS], size, digest


class RefusalBudget:
    """A token bucket of refusal entries per user, in this process.

    Args:
        per_second: Entries a user regains per second.
        burst_count: Entries a user may write at once.
        on_suppressed: Called for each refusal counted but not appended.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        per_second: float,
        burst_count: int,
        on_suppressed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = per_second
        self._burst = float(burst_count)
        self._on_suppressed = on_suppressed
        self._clock = clock
        # user_id -> [tokens, at, refusals suppressed since the user's last entry]
        self._buckets: dict[str, list[float]] = {}

    def take(self, user_id: str) -> int | None:
        """Spend one entry of user_id's budget.

        Returns:
            None if the budget is spent (the refusal is counted, not appended);
            otherwise how many of the user's refusals were suppressed since
            their previous entry, for this entry to carry (0 for none).
        """
        now = self._clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[user_id] = [self._burst, now, 0.0]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[0], bucket[1] = tokens, now
        if tokens < 1:
            if not bucket[2]:
                logger.warning(
                    "Refusals of %s exceed the audit budget (%g at once, %g/s): counting "
                    "them, not appending each (docs/audit.md)",
                    user_id,
                    self._burst,
                    self._rate,
                )
            bucket[2] += 1
            self._on_suppressed()
            return None
        bucket[0] -= 1
        suppressed, bucket[2] = int(bucket[2]), 0.0
        return suppressed

    def _prune(self, now: float) -> None:
        """Forget users whose bucket is full again and who have nothing suppressed."""
        full = [
            user
            for user, (tokens, at, suppressed) in self._buckets.items()
            if not suppressed and tokens + (now - at) * self._rate >= self._burst
        ]
        for user in full:
            del self._buckets[user]
