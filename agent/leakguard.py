"""Leak guard: recycle the process before memory runs out, sans I/O.

RSS (against the container's memory limit) and GPU memory (against the
device) are sampled by the server; when either stays above `threshold` for
`samples` consecutive samples the guard trips once, and the server drains
and exits so that its supervisor starts a fresh process. One sample over the
line is not enough: a burst of sessions may pass briefly.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import LeakGuardConfig


@dataclass(frozen=True, slots=True)
class MemorySample:
    rss_bytes: int
    rss_limit_bytes: int
    gpu_used_bytes: int | None = None
    gpu_total_bytes: int | None = None

    @property
    def rss_share(self) -> float:
        return self.rss_bytes / self.rss_limit_bytes if self.rss_limit_bytes > 0 else 0.0

    @property
    def gpu_share(self) -> float | None:
        if self.gpu_used_bytes is None or not self.gpu_total_bytes:
            return None
        return self.gpu_used_bytes / self.gpu_total_bytes


class LeakGuard:
    def __init__(self, config: LeakGuardConfig) -> None:
        self.config = config
        self._over = 0
        self.tripped: str | None = None

    def observe(self, sample: MemorySample) -> str | None:
        """Feed one sample; returns the reason the first time the guard trips."""
        if self.tripped is not None:
            return None
        limit = self.config.threshold
        reasons = []
        if sample.rss_share > limit:
            reasons.append(f"RSS at {sample.rss_share:.0%} of {sample.rss_limit_bytes >> 20} MiB")
        gpu = sample.gpu_share
        if gpu is not None and gpu > limit:
            reasons.append(f"GPU memory at {gpu:.0%}")
        self._over = self._over + 1 if reasons else 0
        if self._over >= self.config.samples:
            self.tripped = "; ".join(reasons) + f" for {self._over} samples"
            return self.tripped
        return None
