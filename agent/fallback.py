"""Which renderer serves a chunk: the primary lanes, then the CPU fallback, then the
static tier, consulting each one's circuit breaker in that order (sans I/O).

Sessions in tier 1 want the primary renderer, sessions in tier 2 the CPU
fallback. While no primary lane takes traffic (every breaker open or
half-open), work for the primary goes to the fallback; while the fallback's
breaker is open too, nothing renders and chunks are served by the static
tier (their source pictures with the mouth closed). Half-open breakers are
tested with shadow probes: a copy of a real chunk whose result only decides
the breaker, so no session waits on a probe that hangs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from agent.breaker import BreakerState, CircuitBreaker
from agent.scheduler import Lane


class Route(StrEnum):
    PRIMARY = "primary"
    FALLBACK = "fallback"
    STATIC = "static"


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    primary_lanes: tuple[int, ...]  # free primary lanes that take real work now
    probe_lanes: tuple[int, ...]  # free primary lanes that take a shadow probe now
    fallback_wants: frozenset[Lane]  # which wanted lanes the fallback serves now
    static_wants: frozenset[Lane]  # which wanted lanes no renderer serves now
    fallback_probe: bool  # a free fallback lane takes a shadow probe now


class FallbackRouter:
    def __init__(self, primary: Sequence[CircuitBreaker], fallback: CircuitBreaker) -> None:
        if not primary:
            raise ValueError("at least one primary lane is needed")
        self.primary = tuple(primary)
        self.fallback = fallback

    def primary_available(self, now: float) -> bool:
        return any(b.allows_traffic(now) for b in self.primary)

    def plan(self, now: float, free_primary: Sequence[int], free_fallback: int,
             can_probe: bool = True) -> RoutingPlan:
        """Routing for this step, given the indices of idle primary lanes and the
        number of idle fallback lanes; `can_probe` is False while there is no chunk
        to probe with (no traffic yet).

        Takes the probe slot of each half-open breaker it asks to probe
        (`probe_lanes`, `fallback_probe`): the caller must send a probe there
        and report its result with `probe=True`.
        """
        take = tuple(i for i in free_primary if self.primary[i].allows_traffic(now))
        probes = tuple(i for i in free_primary if can_probe and self.primary[i].try_probe(now))
        displaced = frozenset() if self.primary_available(now) else frozenset({Lane.PRIMARY})
        wants = frozenset({Lane.FALLBACK}) | displaced
        if self.fallback.state(now) is BreakerState.CLOSED:
            return RoutingPlan(take, probes, wants, frozenset(), False)
        probe = can_probe and free_fallback > 0 and self.fallback.try_probe(now)
        return RoutingPlan(take, probes, frozenset(), wants, probe)

    def states(self, now: float) -> tuple[tuple[BreakerState, ...], BreakerState]:
        return tuple(b.state(now) for b in self.primary), self.fallback.state(now)
