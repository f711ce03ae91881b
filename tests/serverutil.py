"""Helpers for tests that run the real server on 127.0.0.1 port 0."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig
from agent.server import AgentServer
from media.types import Renderer


def small_config(cache_dir: Path, **overrides: Any) -> AgentConfig:
    """A fast config: a small default avatar and short clips."""
    base: dict[str, Any] = {
        "server.host": "127.0.0.1",
        "server.port": 0,
        "avatars.cache_dir": str(cache_dir),
        "avatars.default_avatar.size": 128,
        "avatars.default_avatar.clip_seconds": (2.0, 4.0, 6.0),
        "video.max_height": 128,
        "renderer.name": "cpu",
        "logging.format": "console",
    }
    base.update(overrides)
    return AgentConfig().with_overrides(base)


@contextlib.asynccontextmanager
async def running_server(config: AgentConfig, renderer: Renderer | None = None
                         ) -> AsyncIterator[AgentServer]:
    server = AgentServer(config, renderer=renderer)
    await server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.close()


def speech_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Syllable-rate modulated harmonic noise: loud and quiet stretches like speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 20 * np.sin(2 * math.pi * 0.7 * t)
    voiced = sum(np.sin(2 * math.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * math.pi * 4.0 * t), 0, None) ** 0.5
    noise = rng.normal(0, 0.05, len(t))
    return (0.5 * envelope * voiced + noise * envelope).astype(np.float32) * 0.6
