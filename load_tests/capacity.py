"""The capacity finder's decisions: which user count to hold next, and the knee.

Pure: the driver holds each step, measures the step's window and calls
`record`. A failing step is held once more before it counts (`confirm`):
other work on a shared machine can spoil one window, rarely two in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StepResult:
    users: int
    window: dict[str, Any]  # report.window(): the step's measurements
    failures: tuple[str, ...]  # SLOs that broke; empty when the step held

    @property
    def passed(self) -> bool:
        return not self.failures


class CapacitySearch:
    def __init__(self, *, start: int, step: int, max_users: int, limits: dict[str, float],
                 confirm: bool = True) -> None:
        if start < 1 or step < 1 or max_users < start:
            raise ValueError(f"need 1 <= start={start} <= max_users={max_users} and "
                             f"step={step} >= 1")
        if not limits:
            raise ValueError("the capacity finder needs at least one SLO")
        self.limits = limits
        self.step = step
        self.max_users = max_users
        self.confirm = confirm
        self.results: list[StepResult] = []
        self.knee: int | None = None  # most users at which every SLO held
        self.broke_at: int | None = None  # fewest users at which an SLO broke (confirmed)
        self._next: int | None = start

    def next_users(self) -> int | None:
        """Users to hold next; None when the search is over."""
        return self._next

    def record(self, users: int, window: dict[str, Any]) -> StepResult:
        failures = tuple(f"{name} {_fmt(window.get(name))} > {limit:g} s"
                         for name, limit in self.limits.items()
                         if not _within(window.get(name), limit))
        result = StepResult(users, window, failures)
        retried = bool(self.results) and self.results[-1].users == users
        self.results.append(result)
        if result.passed:
            self.knee = users
            self._next = users + self.step if users + self.step <= self.max_users else None
        elif self.confirm and not retried:
            self._next = users  # hold once more before believing it
        else:
            self.broke_at = users
            self._next = None
        return result

    def summary(self) -> dict[str, Any]:
        return {
            "limits": self.limits,
            "knee_users": self.knee,
            "broke_at_users": self.broke_at,
            "reached_max_users": self.broke_at is None and self.knee == self.max_users,
            "steps": [{"users": r.users, "passed": r.passed, "failures": list(r.failures),
                       **r.window} for r in self.results],
        }


def _within(value: Any, limit: float) -> bool:
    return isinstance(value, float | int) and not math.isnan(value) and value <= limit


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float | int) and not math.isnan(value) else "n/a"
