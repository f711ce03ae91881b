"""Rate limits and quotas, sans I/O: time is a parameter (monotonic seconds).

- `TokenBucket`: the one rate primitive (a sustained rate plus a burst).
- `Strikes`: refusals in a sliding window; too many is abuse.
- `ConnectionLimiter`: new connections per client address, and a block for
  addresses that keep trying while refused or keep failing authentication.
- `SessionQuota`: sessions one principal holds at once.
- `SessionLimiter`: one session's input: JSON message rate, audio no faster
  than a multiple of real time, a send backlog bound, escalation to abuse.

A refusal is the protocol's error (`bad_request`, or `overloaded` with
`retry_after_ms` and 1013 for capacity); abuse closes with 1008. Every map
here is bounded, so an attacker cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from agent.auth import Principal
from agent.config import LimitsConfig
from agent.errors import BadRequest, Timeout

MIN_AUDIO_FRAME_S = 0.01  # every binary frame costs at least this much audio time
MAX_TRACKED_ADDRESSES = 4096


class TokenBucket:
    """`rate` units per second refill a bucket of `capacity` units, full at start."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 0:
            raise ValueError(f"rate must be positive and capacity not negative "
                             f"(rate={rate}, capacity={capacity})")
        self.rate = rate
        self.capacity = capacity
        self._level = capacity
        self._at = now

    def level(self, now: float) -> float:
        return min(self.capacity, self._level + max(now - self._at, 0.0) * self.rate)

    def take(self, amount: float, now: float) -> float:
        """Take `amount` and return 0.0, or take nothing and return the seconds until
        it could be taken. An amount larger than the capacity is taken from a full
        bucket and leaves a debt, so one big item is not refused for ever."""
        level = self.level(now)
        self._level, self._at = level, max(now, self._at)
        need = min(amount, self.capacity)
        if level >= need - 1e-9:  # float sums of exact rates must not fall short
            self._level = level - amount
            return 0.0
        return (need - level) / self.rate


class Strikes:
    """Counts refusals; `add` says when `limit` of them fell within `window_s`."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=limit)

    def add(self, now: float) -> bool:
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        return len(self._times) >= self.limit


@dataclass(frozen=True, slots=True)
class ConnectionVerdict:
    """`allowed`, or refused for `retry_after_s`; `blocked` refusals are abuse (1008).
    `new_block` marks the refusal that started a block (worth one log line)."""

    allowed: bool
    blocked: bool = False
    retry_after_s: float = 0.0
    new_block: bool = False


ALLOWED = ConnectionVerdict(True)


@dataclass(slots=True)
class _Address:
    bucket: TokenBucket
    strikes: Strikes
    blocked_until: float = 0.0


class ConnectionLimiter:
    """New connections per client address (see `agent.auth.client_address`)."""

    def __init__(self, rate_per_s: float, burst: int, strikes: int, window_s: float,
                 block_s: float, max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        self._rate, self._burst = rate_per_s, burst
        self._strikes, self._window_s, self._block_s = strikes, window_s, block_s
        self._max = max_addresses
        # Least recently seen first; the oldest goes when full. A forgotten address
        # starts again with a full bucket: eviction only ever errs towards allowing.
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: LimitsConfig) -> ConnectionLimiter:
        return cls(cfg.connections_per_s, cfg.connection_burst, cfg.abuse_strikes,
                   cfg.abuse_window_s, cfg.connection_block_s)

    def __len__(self) -> int:
        return len(self._addresses)

    def admit(self, address: str, now: float) -> ConnectionVerdict:
        entry = self._entry(address, now)
        if now < entry.blocked_until:
            return ConnectionVerdict(False, True, entry.blocked_until - now)
        wait = entry.bucket.take(1.0, now)
        if wait == 0.0:
            return ALLOWED
        if self._strike(entry, now):
            return ConnectionVerdict(False, True, self._block_s, new_block=True)
        return ConnectionVerdict(False, False, wait)

    def strike(self, address: str, now: float) -> bool:
        """A refusal that was the client's fault (failed authentication); True when
        it starts a block."""
        return self._strike(self._entry(address, now), now)

    def _strike(self, entry: _Address, now: float) -> bool:
        if entry.strikes.add(now) and self._block_s > 0:
            entry.blocked_until = now + self._block_s
            return True
        return False

    def _entry(self, address: str, now: float) -> _Address:
        entry = self._addresses.get(address)
        if entry is None:
            if len(self._addresses) >= self._max:
                self._addresses.popitem(last=False)
            entry = _Address(TokenBucket(self._rate, self._burst, now),
                             Strikes(self._strikes, self._window_s))
            self._addresses[address] = entry
        else:
            self._addresses.move_to_end(address)
        return entry


class SessionQuota:
    """Sessions held per principal; `caps` maps a principal kind to its cap (0: none)."""

    def __init__(self, caps: Mapping[str, int]) -> None:
        self._caps = dict(caps)
        self._held: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: LimitsConfig) -> SessionQuota:
        return cls({"token": cfg.max_sessions_per_token, "ticket": cfg.max_sessions_per_ticket})

    def cap(self, principal: Principal) -> int:
        return self._caps.get(principal.kind, 0)

    def held(self, principal: Principal) -> int:
        return self._held.get(principal.id, 0)

    def acquire(self, principal: Principal) -> bool:
        cap = self.cap(principal)
        n = self.held(principal)
        if cap and n >= cap:
            return False
        self._held[principal.id] = n + 1
        return True

    def release(self, principal: Principal) -> None:
        n = self._held.get(principal.id, 0) - 1
        if n < 0:
            raise ValueError(f"release of {principal.id!r} without acquire")
        if n:
            self._held[principal.id] = n
        else:
            del self._held[principal.id]  # the map only holds principals with sessions


class SessionLimiter:
    """Limits on one session's client input. Methods raise the protocol's error:
    non-fatal `bad_request` for a refused message, fatal (1008) for abuse."""

    def __init__(self, cfg: LimitsConfig, fps: int, now: float) -> None:
        self.cfg = cfg
        self._control = TokenBucket(cfg.control_messages_per_s, cfg.control_message_burst, now)
        self._audio = TokenBucket(cfg.audio_realtime_factor, cfg.audio_burst_s, now)
        self._strikes = Strikes(cfg.abuse_strikes, cfg.abuse_window_s)
        # Two wire items (video, audio) per frame slot, plus turn messages.
        self._max_backlog = int(2 * fps * cfg.max_send_backlog_s) + 16

    def control(self, now: float) -> None:
        """A JSON message arrived."""
        wait = self._control.take(1.0, now)
        if wait:
            raise BadRequest(f"more than {self.cfg.control_messages_per_s:g} messages a "
                             f"second; message ignored, slow down for {wait:.2f} s")

    def audio(self, samples: int, rate: int, now: float) -> None:
        """A binary frame of `samples` audio samples at `rate` arrived."""
        seconds = max(samples / rate, MIN_AUDIO_FRAME_S)
        wait = self._audio.take(seconds, now)
        if wait:
            raise BadRequest(
                f"audio arrives faster than {self.cfg.audio_realtime_factor:g}x real time; "
                f"frame dropped, send the next one in {wait:.2f} s")

    def refused(self, now: float) -> None:
        """A message was refused (any non-fatal error): sustained refusals are abuse."""
        if self._strikes.add(now):
            raise BadRequest(f"{self.cfg.abuse_strikes} refused messages within "
                             f"{self.cfg.abuse_window_s:g} s; closing", fatal=True)

    def backlog(self, queued_items: int) -> None:
        """The send buffer after a frame slot: a client that stopped reading is closed
        before its queued audio (never dropped) grows without bound."""
        if queued_items > self._max_backlog:
            raise Timeout(f"the client read nothing for about "
                          f"{self.cfg.max_send_backlog_s:g} s of stream; closing", fatal=True)
