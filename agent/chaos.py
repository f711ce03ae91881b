"""Chaos mode: injected faults around the primary renderer (`serve --chaos SPEC`).

A spec is comma-separated `name=value` pairs:

    hang=P       a render blocks until the fault is lifted or the server closes
    error=P      a render raises a RenderError
    oom=P        a render raises GpuOutOfMemory (retryable: tried on the fallback)
    corrupt=P    a render returns garbage: NaN float frames or black frames
    delay_ms=N   every render takes N ms longer (a stand-in for GPU time)
    chunk_ms=N   ... plus N ms per chunk in the batch
    after_s=S    faults start S seconds after start-up (default 0)
    for_s=S      ... and last S seconds (default: for ever)
    seed=N       seed of the fault draws

The probabilities are per render call and exclusive (one uniform draw picks
at most one of hang, error, oom, corrupt), so they may sum to at most 1.
`ChaosSpec` and its `fault` draw are pure; `ChaosRenderer` is the shell that
sleeps, blocks and raises. Only the primary renderer is wrapped: the
fallbacks must stay healthy to show that the server routes around faults.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum

import numpy as np

from agent.errors import GpuOutOfMemory, RenderError
from media.types import (
    AvatarPrep,
    Frames,
    FrameSink,
    RenderChunk,
    Renderer,
    RendererCapabilities,
    RenderResult,
    prepare_inner,
    render_inner,
)


class Fault(StrEnum):
    NONE = "none"
    HANG = "hang"
    ERROR = "error"
    OOM = "oom"
    CORRUPT_NAN = "corrupt_nan"
    CORRUPT_BLACK = "corrupt_black"


_PROBABILITIES = ("hang", "error", "oom", "corrupt")


@dataclass(frozen=True, slots=True)
class ChaosSpec:
    hang: float = 0.0
    error: float = 0.0
    oom: float = 0.0
    corrupt: float = 0.0
    delay_ms: float = 0.0
    chunk_ms: float = 0.0
    after_s: float = 0.0
    for_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"chaos {name}={p}: a probability must be in [0, 1]")
        total = sum(getattr(self, n) for n in _PROBABILITIES)
        if total > 1.0 + 1e-9:
            raise ValueError(f"chaos probabilities sum to {total:g}; at most 1 (one fault a call)")
        for name in ("delay_ms", "chunk_ms", "after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"chaos {name} must be >= 0")
        if self.for_s is not None and self.for_s < 0:
            raise ValueError("chaos for_s must be >= 0")

    @classmethod
    def parse(cls, text: str) -> ChaosSpec:
        """'hang=1.0,delay_ms=300' -> ChaosSpec; ValueError names the bad part."""
        known = {f.name for f in fields(cls)}
        values: dict[str, float | int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, raw = part.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(f"chaos: {part!r} is not one of "
                                 f"{', '.join(sorted(known))} as name=value")
            try:
                values[name] = int(raw) if name == "seed" else float(raw)
            except ValueError:
                raise ValueError(f"chaos: {name}={raw!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]

    def active(self, elapsed_s: float) -> bool:
        """Whether faults apply `elapsed_s` after start-up."""
        if elapsed_s < self.after_s:
            return False
        return self.for_s is None or elapsed_s < self.after_s + self.for_s

    def fault(self, u: float, v: float) -> Fault:
        """The fault for one call from two uniform draws in [0, 1)."""
        edge = 0.0
        for name, fault in (("hang", Fault.HANG), ("error", Fault.ERROR), ("oom", Fault.OOM)):
            edge += getattr(self, name)
            if u < edge:
                return fault
        if u < edge + self.corrupt:
            return Fault.CORRUPT_NAN if v < 0.5 else Fault.CORRUPT_BLACK
        return Fault.NONE

    def delay_s(self, chunks: int) -> float:
        return (self.delay_ms + self.chunk_ms * chunks) / 1000.0

    @property
    def harmless(self) -> bool:
        return self == replace(ChaosSpec(), seed=self.seed)


class ChaosRenderer:
    """A Renderer that injects the faults of a `ChaosSpec` into another one."""

    def __init__(self, inner: Renderer, spec: ChaosSpec,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._rng = random.Random(spec.seed)
        self._spec = spec
        self._lifted = threading.Event()
        self.injected: dict[Fault, int] = dict.fromkeys(Fault, 0)

    @property
    def spec(self) -> ChaosSpec:
        return self._spec

    def set_spec(self, spec: ChaosSpec) -> None:
        """Change the faults from now on; renders hanging now are released."""
        with self._lock:
            self._spec = spec
            self._lifted.set()
            self._lifted = threading.Event()

    @property
    def capabilities(self) -> RendererCapabilities:
        return self.inner.capabilities

    def warmup(self) -> None:
        self.inner.warmup()

    def prepare_avatar(self, avatar: str, max_frames: int | None = None) -> AvatarPrep:
        """The inner renderer's, without faults: chaos is for renders."""
        return prepare_inner(self.inner, avatar, max_frames)

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]:
        return self._render(batch, None)

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]:
        """The inner renderer's streaming render (its plain one when it does not stream),
        with the same faults; a corrupting fault corrupts the early frames too."""
        return self._render(batch, on_frames)

    def _render(self, batch: Sequence[RenderChunk],
                on_frames: FrameSink | None) -> list[RenderResult]:
        with self._lock:
            spec, lifted = self._spec, self._lifted
            active = spec.active(self._clock() - self._started)
            fault = spec.fault(self._rng.random(), self._rng.random()) if active else Fault.NONE
            self.injected[fault] += 1
        if active and spec.delay_s(len(batch)) > 0:
            time.sleep(spec.delay_s(len(batch)))
        match fault:
            case Fault.HANG:
                lifted.wait()  # until set_spec or close
                raise RenderError("chaos: hung render released", retryable=False)
            case Fault.ERROR:
                raise RenderError("chaos: injected render error", retryable=False)
            case Fault.OOM:
                raise GpuOutOfMemory("chaos: injected out of GPU memory")
            case Fault.CORRUPT_NAN | Fault.CORRUPT_BLACK:
                sink = None
                if on_frames is not None:
                    def sink(i: int, frames: Frames) -> None:
                        on_frames(i, _corrupt_frames(frames, fault))
                return [_corrupt(r, fault) for r in render_inner(self.inner, batch, sink)]
            case Fault.NONE:
                return render_inner(self.inner, batch, on_frames)

    def close(self) -> None:
        with self._lock:
            self._lifted.set()
        self.inner.close()


def _corrupt(result: RenderResult, fault: Fault) -> RenderResult:
    return RenderResult(key=result.key, frames=_corrupt_frames(result.frames, fault),
                        stages=result.stages)


def _corrupt_frames(frames: Frames, fault: Fault) -> Frames:
    if fault is Fault.CORRUPT_NAN:
        # A renderer that forgot to clamp and convert its float output.
        return np.full(frames.shape, np.nan, np.float32)
    return np.zeros_like(frames)
