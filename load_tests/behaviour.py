"""What a simulated user does next: pure functions of a seeded RNG (no I/O, no clock).

The user shell (`user.py`) asks for a `TurnPlan` per turn and carries it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from load_tests.config import Persona

DropPoint = Literal["turn", "think"]


@dataclass(frozen=True, slots=True)
class TurnPlan:
    seconds: float  # target length of the utterance's audio
    realtime: float  # streaming speed; 1.0 paces audio in real time like a live TTS
    barge_in_at: float | None  # interrupt after this share of the turn has played
    drop: DropPoint | None  # lose the connection during the turn or the think time after it
    drop_at: float  # share of the turn (or of the think time) at which it drops
    think_s: float  # pause after the turn before the next one


def _lognormal(rng: np.random.Generator, median: float, sigma: float, lo: float,
               hi: float) -> float:
    return float(np.clip(median * math.exp(sigma * rng.standard_normal()), lo, hi))


def plan_turn(rng: np.random.Generator, persona: Persona) -> TurnPlan:
    p = persona
    seconds = _lognormal(rng, p.turn_median_s, p.turn_sigma, p.turn_min_s, p.turn_max_s)
    realtime = 1.0 if rng.random() < p.realtime_share else float(rng.uniform(*p.burst_speed))
    barge_in_at = float(rng.uniform(0.2, 0.7)) if rng.random() < p.barge_in else None
    drop: DropPoint | None = None
    if rng.random() < p.reconnect:
        # A turn that is interrupted already has its own event; drop in the pause after it.
        drop = "think" if barge_in_at is not None or rng.random() < 0.5 else "turn"
    think_s = _lognormal(rng, p.think_median_s, p.think_sigma, 0.0, p.think_max_s)
    return TurnPlan(seconds, realtime, barge_in_at, drop, float(rng.uniform(0.2, 0.8)), think_s)


def initial_idle(rng: np.random.Generator, persona: Persona) -> float:
    return float(rng.uniform(*persona.idle_s))


def backoff_delay(attempt: int, rng: np.random.Generator, *, retry_after_s: float = 0.0,
                  base_s: float = 0.25, cap_s: float = 8.0) -> float:
    """Exponential backoff with full jitter (attempt 0 is the first retry), never
    shorter than the server's `retry_after_ms`."""
    ceiling = min(cap_s, base_s * 2.0**attempt)
    return max(retry_after_s, float(rng.uniform(0.0, ceiling)))


def spawn_offsets(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Start times (seconds from now) of `n` users at `rate` per second, each jittered
    within its slot so that users do not connect in lock step."""
    return [(i + float(rng.random())) / rate for i in range(n)]
