"""Typed settings of a load run: what a user does, the run itself, the SLOs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DecodeMode = Literal["all", "keyframes", "none"]


@dataclass(frozen=True, slots=True)
class Persona:
    """How a simulated user behaves. Lengths in seconds of audio or wall time."""

    idle_s: tuple[float, float] = (1.0, 3.0)  # after ready, before the first turn (uniform)
    # Turn lengths follow a log-normal: most replies are a few seconds, some run long.
    turn_median_s: float = 4.0
    turn_sigma: float = 0.6
    turn_min_s: float = 1.0
    turn_max_s: float = 15.0
    # Think time between turns (the person speaking, the bot thinking): log-normal too.
    think_median_s: float = 2.5
    think_sigma: float = 0.5
    think_max_s: float = 10.0
    realtime_share: float = 0.5  # turns streamed at 1x (paced TTS); the rest in bursts
    burst_speed: tuple[float, float] = (1.5, 4.0)  # TTS faster than real time
    barge_in: float = 0.0  # probability that a turn is interrupted
    reconnect: float = 0.0  # probability per turn that the connection drops and resumes

    def __post_init__(self) -> None:
        for name in ("barge_in", "reconnect", "realtime_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be a probability in [0, 1]")
        if not 0 < self.turn_min_s <= self.turn_median_s <= self.turn_max_s:
            raise ValueError(f"need 0 < turn_min_s={self.turn_min_s} <= turn_median_s="
                             f"{self.turn_median_s} <= turn_max_s={self.turn_max_s}")
        if self.think_median_s < 0 or self.think_max_s < self.think_median_s:
            raise ValueError(f"need 0 <= think_median_s={self.think_median_s} <= "
                             f"think_max_s={self.think_max_s}")


@dataclass(frozen=True, slots=True)
class SloLimits:
    """Upper limits; None means not checked."""

    ttff_p95_s: float | None = None
    gap_p95_s: float | None = None

    def given(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.ttff_p95_s is not None:
            out["ttff_p95_s"] = self.ttff_p95_s
        if self.gap_p95_s is not None:
            out["gap_p95_s"] = self.gap_p95_s
        return out


@dataclass(frozen=True, slots=True)
class LoadConfig:
    url: str
    metrics_url: str  # the server's /metrics (RSS, CPU, sessions)
    users: int
    duration_s: float
    spawn_rate: float  # users started per second
    persona: Persona = field(default_factory=Persona)
    decode: DecodeMode = "keyframes"
    codec: Literal["h264", "jpeg"] | None = None  # None: the server's default
    max_height: int | None = None
    audio_rate: int = 16000
    avatar: str | None = None
    token: str | None = None
    seed: int = 0
    playout_buffer_s: float = 0.1  # a frame later than this behind the fastest one is late
    sample_interval_s: float = 2.0  # /metrics and client CPU sampling
    stop_grace_s: float = 10.0  # after the run: time to say bye before tasks are cancelled

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"users={self.users} must be at least 1")
        if self.duration_s <= 0 or self.spawn_rate <= 0:
            raise ValueError(f"duration={self.duration_s} and spawn_rate={self.spawn_rate} "
                             "must be positive")
