"""Measured render latency of a lane: seconds for a batch of F frames, sans I/O.

Modelled as `a + b * F` (a fixed cost per call, b per frame), fitted by least
squares with exponential forgetting so the model follows a renderer whose
speed changes (thermal limits, other load, a degraded GPU). With too little
spread in batch sizes to separate a from b it falls back to cost
proportional to frames. The scheduler sizes batches from it, admission reads
the per-frame cost.
"""

from __future__ import annotations


class LatencyModel:
    def __init__(self, prior_per_frame_s: float, forget: float = 0.9) -> None:
        if prior_per_frame_s <= 0 or not 0 < forget < 1:
            raise ValueError("prior_per_frame_s must be > 0 and forget in (0, 1)")
        self.prior = prior_per_frame_s
        self.forget = forget
        self.samples = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, frames: int, seconds: float) -> None:
        if frames <= 0 or seconds < 0:
            raise ValueError(f"bad observation: {frames} frames in {seconds} s")
        f = self.forget
        x, y = float(frames), seconds
        self._w = f * self._w + 1.0
        self._x = f * self._x + x
        self._y = f * self._y + y
        self._xx = f * self._xx + x * x
        self._xy = f * self._xy + x * y
        self.samples += 1

    def coefficients(self) -> tuple[float, float]:
        """(a, b): fixed seconds per call and seconds per frame."""
        if self.samples == 0:
            return 0.0, self.prior
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 0.25:  # batch sizes differ enough (in frames) to tell a from b
            b = (self._xy / self._w - mx * my) / var
            a = my - b * mx
            if a >= 0 and b > 0:
                return a, b
        return 0.0, self._y / self._x

    def estimate(self, frames: int) -> float:
        a, b = self.coefficients()
        return a + b * frames

    def per_frame(self, frames: int) -> float:
        """Seconds per frame for a call of `frames` frames."""
        return self.estimate(frames) / frames
