"""Helpers for tests that run the real server on 127.0.0.1 port 0."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterator
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
async def running_server(config: AgentConfig, renderer: Renderer | None = None,
                         **kwargs: Any) -> AsyncIterator[AgentServer]:
    server = AgentServer(config, renderer=renderer, **kwargs)
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(*args: str, ready_timeout: float = 60.0) -> Iterator[tuple[Any, str]]:
    """`python -m agent serve --port 0 ARGS` in its own process; yields (Popen, ws url).

    Waits for /readyz 200. The process is killed on exit if still running.
    """
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    cmd = [sys.executable, "-m", "agent", "serve", "--port", "0", "--log-format", "console",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(ws://\S+)", line)
        if match is None:
            raise RuntimeError(f"server did not start: {line!r}")
        url = match.group(1)
        ready = url.replace("ws://", "http://").replace("/v1/session", "/readyz")
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(ready, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
