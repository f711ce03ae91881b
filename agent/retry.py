"""When a client tries again, sans I/O: exponential backoff with full jitter.

After a failed attempt `n` (from 0) the wait is drawn uniformly from
`[0, min(cap_s, base_s * 2**n))` ("full jitter": clients that failed
together spread out instead of coming back together), added to the
server's `retry_after_ms` when it gave one, so that the server's hint is a
floor, never a meeting time. What to do depends on how the session ended:

- 1012 (the instance restarts): resume elsewhere after the first (short,
  jittered) wait, with the newest resume token (a `goaway` carries it);
- 1013 (overloaded) and failed connections: back off, then try again;
- a connection lost mid-session (1006, 1011, no close frame): back off a
  little, then resume;
- 1000, 1008, 1009: the session ended or the client is at fault; do not retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Retry(StrEnum):
    NO = "no"
    BACKOFF = "backoff"  # try again after backing off
    RESUME = "resume"  # resume the session (after backing off when not told to move)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base_s: float = 0.25
    cap_s: float = 30.0
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s or self.max_attempts < 1:
            raise ValueError("need 0 < base_s <= cap_s and max_attempts >= 1")

    def delay(self, attempt: int, u: float, retry_after_ms: int = 0) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based), `u` uniform in [0, 1)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 62))
        return retry_after_ms / 1000.0 + u * ceiling

    def gives_up(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def after_close(close_code: int | None) -> Retry:
    """What a client does after its connection closed with `close_code`."""
    if close_code in (1000, 1008, 1009):
        return Retry.NO
    if close_code == 1013:
        return Retry.BACKOFF
    return Retry.RESUME  # 1012 restart, 1001 going away, 1006/1011/None: lost

