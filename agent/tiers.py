"""Degradation tiers with hysteresis, per session and per instance, sans I/O.

Tier 1 is full quality (the primary renderer), tier 2 reduced quality (the
CPU renderer at a reduced picture size), tier 3 the static neutral image
with the transcript as `text`. A `Ladder` drops at once to the highest tier
anything demands and steps back up one tier at a time, each step only after
`stable_s` without a demand at or above the current tier and `stable_s`
after the previous change. A step up that is followed by a drop within the
stable period doubles the period (up to 8 x `stable_s`), so a fault that
comes back as soon as a session returns does not make it flap; a stable
period at tier 1 forgives. A floor (the instance's tier) raises a session's
tier without entering its hysteresis: when the floor lifts, the session
returns to its own tier.

`SessionHealth` turns what happens to one session (chunk outcomes, deadline
misses, queue wait, send buffer overflows) into demands; `InstanceHealth`
does the same for the instance (breaker states, GPU memory, a queue-wait
pile-up).
Frame-time pressure is judged per session (its deadline misses): moving the
sessions that miss to tier 2 sheds just enough load, where an instance-wide
drop would leave the GPU idle. Equal sessions on an overloaded renderer miss
together, though, so a `DemotionGate` shared by the instance's sessions lets
one of them leave a tier for misses per interval (and, later, return to it),
until the rest keep their deadlines.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.breaker import BreakerState
from agent.config import DegradationConfig

TIERS = (1, 2, 3)
FAILED_OUTCOMES = frozenset({"timeout", "error", "invalid", "shed"})


@dataclass(frozen=True, slots=True)
class TierChange:
    from_tier: int
    to_tier: int
    reason: str
    at: float


MAX_HOLD_FACTOR = 8  # a ladder that keeps falling back waits up to 8 x stable_s
PILE_UP_FACTOR = 4  # recent late chunks waited 4 x the session limit: shed faster
INSTANCE_WAIT_FACTOR = 8  # ... 8 x: the whole instance drops a tier
URGENT_DIVISOR = 4  # while piled up, the gate lets drops through 4 x as often


class Ladder:
    def __init__(self, stable_s: float, now: float, tier: int = 1) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier must be 1, 2 or 3, got {tier}")
        if stable_s < 0:
            raise ValueError(f"stable_s must be >= 0, got {stable_s}")
        self.stable_s = stable_s
        self.hold_s = stable_s  # the current stable period; doubles when a step up fails
        self._own = tier
        self._tier = tier
        self._changed_at = now
        self._stepped_up_at: float | None = None
        self._last: dict[int, float] = {}  # tier -> last time it was demanded
        self._reason: dict[int, str] = {}

    @property
    def tier(self) -> int:
        """The effective tier after the last `update`."""
        return self._tier

    @property
    def own_tier(self) -> int:
        """The ladder's own tier, under any floor."""
        return self._own

    def demand(self, tier: int, now: float, reason: str) -> None:
        """Something needs tier >= `tier` now (1 demands nothing)."""
        tier = min(max(tier, 1), 3)
        if tier == 1:
            return
        self._last[tier] = now
        self._reason[tier] = reason

    def _demanded_since(self, tier: int, now: float) -> float | None:
        """The latest demand for `tier` or above within the stable period, if any."""
        times = [t for k, t in self._last.items() if k >= tier and now - t < self.hold_s]
        return max(times) if times else None

    def update(self, now: float, floor: int = 1, floor_reason: str = "",
               may_step_up: Callable[[int, float], bool] | None = None) -> TierChange | None:
        """`may_step_up(tier, now)` is asked only when a step up into `tier` is due; a
        refusal keeps the tier, and the step is due again on the next update."""
        own = self._own
        demanded = [k for k, t in self._last.items() if k > own and now - t < self.hold_s]
        reason = ""
        if demanded:
            own = max(demanded)
            reason = self._reason[own]
            stepped = self._stepped_up_at
            if stepped is not None and now - stepped < self.hold_s:
                # Stepped up too early: wait longer before the next try (no flapping).
                self.hold_s = min(self.hold_s * 2, MAX_HOLD_FACTOR * self.stable_s)
            self._stepped_up_at = None
        elif own > 1 and self._demanded_since(own, now) is None and (
            now - self._changed_at >= self.hold_s
        ) and (may_step_up is None or may_step_up(own - 1, now)):
            own -= 1
            reason = f"stable for {self.hold_s:.1f} s"
            self._stepped_up_at = now
        elif own == 1 and self._stepped_up_at is not None and (
            now - self._stepped_up_at >= self.hold_s
        ):
            self.hold_s = self.stable_s  # healthy at the top again: forgive
            self._stepped_up_at = None
        if own != self._own:
            self._own = own
            self._changed_at = now
        effective = max(own, floor)
        if effective == self._tier:
            return None
        if floor > own:
            reason = floor_reason
        elif not reason:
            reason = f"stable for {self.hold_s:.1f} s"
        change = TierChange(self._tier, effective, reason, now)
        self._tier = effective
        return change


class DemotionGate:
    """Paces the deadline-miss tier moves of the sessions of one instance.

    When a renderer is overloaded, every session it serves misses at once; letting
    them all drop would leave it idle. The gate lets one session leave a tier for
    misses per `interval_s`, so sessions leave one by one until the rest keep
    their deadlines, and one session that left for misses step back up into a
    tier per `interval_s`, so they do not return together and overload it again.
    Long queue waits (load as well) ask it like misses; failures, congestion and
    floors never ask it.
    """

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        # The instance sets it while late work piles up: sessions must leave faster
        # (drops every interval / URGENT_DIVISOR) and none steps back up.
        self.urgent = False
        self._left: dict[int, float] = {}  # tier -> when a session last left it for misses
        self._entered: dict[int, float] = {}  # tier -> when one last stepped up into it

    def allow_drop(self, tier: int, now: float) -> bool:
        """May a session leave `tier` for missing deadlines now? Yes takes the slot."""
        interval = self.interval_s / URGENT_DIVISOR if self.urgent else self.interval_s
        return self._take(self._left, tier, now, interval)

    def allow_step_up(self, tier: int, now: float) -> bool:
        """May a session that left for misses step up into `tier` now? Yes takes the slot."""
        return not self.urgent and self._take(self._entered, tier, now, self.interval_s)

    @staticmethod
    def _take(last: dict[int, float], tier: int, now: float, interval: float) -> bool:
        at = last.get(tier)
        if at is not None and now - at < interval:
            return False
        last[tier] = now
        return True


@dataclass(frozen=True, slots=True)
class ChunkReport:
    """What happened to one chunk of a session, as the session sees it."""

    wanted: str  # the lane the session asked for: primary, fallback, static
    served_by: str  # primary, fallback, static
    outcome: str  # ok, invalid, error, timeout, shed
    late: bool
    queue_wait_s: float


_RANK = {"primary": 1, "fallback": 2, "static": 3}


class SessionHealth:
    def __init__(self, config: DegradationConfig, now: float, tier: int = 1,
                 stagger: float = 0.0, gate: DemotionGate | None = None) -> None:
        """`stagger` in [0, 1) lengthens the stable period by up to half: sessions that
        dropped together (an overload) then return one by one, not all at once.
        `gate` is the instance's, shared by its sessions; None gives the session its own
        (its misses then pace nobody else)."""
        if not 0.0 <= stagger < 1.0:
            raise ValueError(f"stagger must be in [0, 1), got {stagger}")
        self.config = config
        self.ladder = Ladder(config.stable_s * (1.0 + 0.5 * stagger), now, tier)
        self.gate = gate if gate is not None else DemotionGate(config.miss_demotion_interval_s)
        self._late: deque[bool] = deque(maxlen=config.miss_window)
        self._late_tier = tier
        self._congestion: deque[float] = deque()
        self._paced = False  # below tier 1 after a miss drop: step-ups ask the gate

    @property
    def tier(self) -> int:
        return self.ladder.tier

    def on_chunk(self, now: float, report: ChunkReport) -> None:
        """A chunk came back. It is judged at the tier it was asked for: chunks queued
        before a drop must not push the session further down."""
        tier = self.ladder.tier
        asked = _RANK[report.wanted]
        served = _RANK[report.served_by]
        dropping = True  # demanded below this tier for a reason the gate does not pace
        if report.outcome in FAILED_OUTCOMES:
            self.ladder.demand(served + 1, now, f"{report.served_by} render {report.outcome}")
        elif served > asked:
            why = "renderer unavailable" if served == 3 else "inference unavailable"
            self.ladder.demand(served, now, why)
        else:
            dropping = False
        if (report.late and report.queue_wait_s > self.config.queue_wait_s and not dropping
                and asked == tier and self.gate.allow_drop(tier, now)):
            # Badly late (a wait alone is harmless: work rendered ahead waits on purpose).
            # Load, like misses: every session of an overloaded renderer waits at once, so
            # the gate lets them leave one by one. A refused session judges its misses.
            self._paced = True
            self.ladder.demand(asked + 1, now, f"queue wait {report.queue_wait_s:.1f} s")
            dropping = True
        if self._late_tier != tier:  # judge each tier on its own chunks
            self._late.clear()
            self._late_tier = tier
        if asked != tier:
            return
        self._late.append(report.late)
        needed = math.ceil(self.config.miss_ratio * self.config.miss_window)
        # Judged on a late chunk only: a session the gate refused tries again while it
        # keeps missing, not on the old misses still in its window once it stops.
        if not report.late or sum(self._late) < needed:
            return
        if dropping:  # leaving anyway, for a reason the gate does not pace
            self._late.clear()
            return
        if not self.gate.allow_drop(tier, now):
            return  # another session just left this tier: keep the window, try later
        self._paced = True
        self.ladder.demand(tier + 1, now, f"{sum(self._late)} of {len(self._late)} "
                           "chunks missed their deadline")
        self._late.clear()

    def on_congestion(self, now: float) -> None:
        """The send buffer overflowed (the client reads too slowly)."""
        window = self.config.congestion_window_s
        self._congestion.append(now)
        while self._congestion and now - self._congestion[0] > window:
            self._congestion.popleft()
        if len(self._congestion) >= self.config.congestion_events:
            self.ladder.demand(2, now, f"client congested ({len(self._congestion)} overflows "
                               f"in {window:g} s)")

    def update(self, now: float, floor: int = 1, floor_reason: str = "") -> TierChange | None:
        # A step up under the floor changes nothing on the renderers: not paced.
        paced = self._paced and floor < self.ladder.own_tier
        change = self.ladder.update(now, floor, floor_reason,
                                    self.gate.allow_step_up if paced else None)
        if self.ladder.own_tier == 1:
            self._paced = False
        return change


@dataclass(frozen=True, slots=True)
class InstanceSignals:
    primary: tuple[BreakerState, ...]  # one per primary lane
    fallback: BreakerState
    queue_wait_p95_s: float  # of recent chunks, on-time ones as 0 (Engine.stats)
    gpu_memory_share: float | None  # used over total; None without a GPU


class InstanceHealth:
    def __init__(self, config: DegradationConfig, gpu_memory_limit: float, now: float) -> None:
        self.config = config
        self.gpu_memory_limit = gpu_memory_limit
        self.ladder = Ladder(config.stable_s, now)

    @property
    def tier(self) -> int:
        return self.ladder.tier

    def piled_up(self, signals: InstanceSignals) -> bool:
        """Late work is piling up: the sessions' gate should shed faster."""
        return signals.queue_wait_p95_s > PILE_UP_FACTOR * self.config.queue_wait_s

    def update(self, now: float, signals: InstanceSignals) -> TierChange | None:
        no_primary = all(s is not BreakerState.CLOSED for s in signals.primary)
        if no_primary and signals.fallback is not BreakerState.CLOSED:
            self.ladder.demand(3, now, "no renderer available")
        elif no_primary:
            self.ladder.demand(2, now, "inference unavailable (circuit breaker open)")
        if signals.queue_wait_p95_s > INSTANCE_WAIT_FACTOR * self.config.queue_wait_s:
            # Only a bad pile-up: moving every session off a merely busy GPU would leave
            # it idle; the sessions that miss their frames move on their own, faster
            # while late work piles up (`piled_up`, the gate's `urgent`).
            self.ladder.demand(2, now, f"queue wait p95 {signals.queue_wait_p95_s:.1f} s")
        share = signals.gpu_memory_share
        if share is not None and share > self.gpu_memory_limit:
            self.ladder.demand(2, now, f"GPU memory at {share:.0%}")
        return self.ladder.update(now)
