"""Circuit breaker around one renderer, sans I/O (time is a parameter).

Closed: work flows; consecutive failures open it (`timeouts_to_open`
timeouts in a row, or `errors_to_open` failures of any kind in a row).
Open: no work is sent; after `open_s` it turns half-open. Half-open: exactly
one probe may be out at a time (`try_probe`); its success closes the
breaker, its failure opens it again for twice as long (up to `max_open_s`).
Results of work that was sent before the breaker opened do not change an
open breaker: only a probe can close it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from agent.config import BreakerConfig


class BreakerState(IntEnum):
    # Values are the `avatar_circuit_breaker_state` gauge's.
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    name: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerStats:
    state: BreakerState
    consecutive_failures: int
    opened: int  # times it opened
    retry_at: float | None  # when an open breaker turns half-open


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, name: str = "primary") -> None:
        self.config = config
        self.name = name
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._timeouts = 0
        self._wait = config.open_s  # next open period
        self._retry_at: float | None = None
        self._probing = False
        self._opened = 0
        self._transitions: list[BreakerTransition] = []

    def state(self, now: float) -> BreakerState:
        retry = self._retry_at
        if self._state is BreakerState.OPEN and retry is not None and now >= retry:
            self._move(BreakerState.HALF_OPEN, now, "open period over")
        return self._state

    def allows_traffic(self, now: float) -> bool:
        """Whether real work may be sent (closed only; half-open takes probes)."""
        return self.state(now) is BreakerState.CLOSED

    def try_probe(self, now: float) -> bool:
        """Half-open with no probe out: take the probe slot (True) and send one."""
        if self.state(now) is not BreakerState.HALF_OPEN or self._probing:
            return False
        self._probing = True
        return True

    def record_success(self, now: float, *, probe: bool = False) -> None:
        if probe:
            self._probing = False
            if self.state(now) is BreakerState.HALF_OPEN:
                self._wait = self.config.open_s
                self._failures = self._timeouts = 0
                self._move(BreakerState.CLOSED, now, "probe succeeded")
            return
        if self.state(now) is BreakerState.CLOSED:
            self._failures = self._timeouts = 0

    def record_failure(self, now: float, *, timeout: bool, probe: bool = False) -> None:
        state = self.state(now)
        if probe:
            self._probing = False
            if state is BreakerState.HALF_OPEN:
                self._wait = min(self._wait * 2, self.config.max_open_s)
                self._open(now, "probe timed out" if timeout else "probe failed")
            return
        if state is not BreakerState.CLOSED:
            return  # stale work sent before it opened
        self._failures += 1
        self._timeouts = self._timeouts + 1 if timeout else 0
        if self._timeouts >= self.config.timeouts_to_open:
            self._open(now, f"{self._timeouts} consecutive timeouts")
        elif self._failures >= self.config.errors_to_open:
            self._open(now, f"{self._failures} consecutive failures")

    def _open(self, now: float, reason: str) -> None:
        self._retry_at = now + self._wait
        self._opened += 1
        self._move(BreakerState.OPEN, now, reason)

    def _move(self, to: BreakerState, now: float, reason: str) -> None:
        if to is self._state:
            return
        self._transitions.append(BreakerTransition(self.name, self._state, to, now, reason))
        self._state = to

    def drain_transitions(self) -> list[BreakerTransition]:
        out, self._transitions = self._transitions, []
        return out

    def stats(self, now: float) -> BreakerStats:
        state = self.state(now)
        retry = self._retry_at if state is BreakerState.OPEN else None
        return BreakerStats(state, self._failures, self._opened, retry)
