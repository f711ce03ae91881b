"""The leak guard trips once, on sustained RSS or GPU memory over the threshold."""

from __future__ import annotations

import pytest

from agent.config import LeakGuardConfig
from agent.leakguard import LeakGuard, MemorySample
from agent.resources import memory_limit_bytes, rss_bytes

pytestmark = pytest.mark.unit

GIB = 1 << 30


def test_trips_after_consecutive_samples_only() -> None:
    g = LeakGuard(LeakGuardConfig(threshold=0.9, samples=3))
    high, low = MemorySample(int(0.95 * GIB), GIB), MemorySample(int(0.5 * GIB), GIB)
    assert g.observe(high) is None and g.observe(high) is None
    assert g.observe(low) is None  # a spike that passed
    assert g.observe(high) is None and g.observe(high) is None
    reason = g.observe(high)
    assert reason is not None and "RSS at 95%" in reason
    assert g.observe(high) is None  # once


def test_gpu_memory_counts_too() -> None:
    g = LeakGuard(LeakGuardConfig(threshold=0.9, samples=1))
    assert g.observe(MemorySample(1, GIB, 80, 100)) is None
    reason = g.observe(MemorySample(1, GIB, 95, 100))
    assert reason is not None and "GPU memory at 95%" in reason


def test_this_process_is_measured() -> None:
    rss, limit = rss_bytes(), memory_limit_bytes()
    assert 10 << 20 < rss < limit
