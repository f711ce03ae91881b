"""Chaos specs (pure) and the chaos wrapper around the real CPU renderer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.chaos import ChaosRenderer, ChaosSpec, Fault
from agent.config import AgentConfig, CpuRendererConfig, DefaultAvatarConfig
from agent.errors import ConfigError, GpuOutOfMemory, RenderError
from media.avatar import Avatar
from media.cpu_renderer import CpuRenderer
from media.default_avatar import ensure_default_avatar
from media.types import ChunkKey, FrameSpec, RenderChunk

pytestmark = pytest.mark.unit


def test_parse_and_errors() -> None:
    spec = ChaosSpec.parse("hang=0.5, error=0.2,delay_ms=300,chunk_ms=10,for_s=4,seed=3")
    assert (spec.hang, spec.error, spec.delay_ms, spec.for_s, spec.seed) == (
        0.5, 0.2, 300.0, 4.0, 3)
    assert spec.delay_s(2) == pytest.approx(0.32)
    assert ChaosSpec.parse("").harmless and not spec.harmless
    for bad, words in [("hang", "name=value"), ("nap=1", "not one of"), ("error=x", "number"),
                       ("error=1.5", "[0, 1]"), ("hang=0.6,error=0.6", "sum"),
                       ("delay_ms=-1", ">= 0")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            ChaosSpec.parse(bad)
    with pytest.raises(ConfigError, match="chaos"):
        AgentConfig().with_overrides({"engine.chaos": "oops=1"})


@given(st.floats(0, 0.25), st.floats(0, 0.25), st.floats(0, 0.25), st.floats(0, 0.25))
def test_fault_draws_follow_the_probabilities(hang: float, error: float, oom: float,
                                              corrupt: float) -> None:
    spec = ChaosSpec(hang=hang, error=error, oom=oom, corrupt=corrupt)
    grid = (np.arange(2000) + 0.5) / 2000
    faults = [spec.fault(float(u), 0.25) for u in grid]
    for fault, p in ((Fault.HANG, hang), (Fault.ERROR, error), (Fault.OOM, oom),
                     (Fault.CORRUPT_NAN, corrupt)):
        assert abs(faults.count(fault) / len(grid) - p) <= 1e-3
    assert spec.fault(0.999, 0.9) in (Fault.NONE, Fault.CORRUPT_BLACK)


def test_window() -> None:
    spec = ChaosSpec(error=1.0, after_s=2.0, for_s=3.0)
    assert [spec.active(t) for t in (0.0, 1.99, 2.0, 4.99, 5.0)] == [
        False, False, True, True, False]
    assert ChaosSpec(error=1.0).active(1e9)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=64, clip_seconds=(2.0,), seed=2)
    return ensure_default_avatar(Path(tmp_path_factory.mktemp("avatars")), config, 25)


def chunk(avatar: Avatar) -> RenderChunk:
    specs = tuple(FrameSpec(s.source) for s in avatar.idle_loop[:4])
    return RenderChunk(ChunkKey("s", "t", 0), avatar.id, specs, 0,
                       np.zeros(16000, np.float32), 25)


def wrapped(avatar: Avatar, spec: str) -> ChaosRenderer:
    inner = CpuRenderer({avatar.id: avatar}.__getitem__, CpuRendererConfig())
    return ChaosRenderer(inner, ChaosSpec.parse(spec))


def test_errors_oom_corruption_and_delay(avatar: Avatar) -> None:
    c = chunk(avatar)
    with pytest.raises(RenderError) as err:
        wrapped(avatar, "error=1").render([c])
    assert not err.value.retryable
    with pytest.raises(GpuOutOfMemory) as oom:
        wrapped(avatar, "oom=1").render([c])
    assert oom.value.retryable
    outs = [wrapped(avatar, f"corrupt=1,seed={seed}").render([c])[0].frames
            for seed in range(12)]
    assert any(o.dtype == np.float32 and np.isnan(o).all() for o in outs)
    assert any(o.dtype == np.uint8 and not o.any() for o in outs)
    r = wrapped(avatar, "delay_ms=150")
    started = time.perf_counter()
    (result,) = r.render([c])
    assert time.perf_counter() - started >= 0.15
    assert result.frames.shape == (4, 64, 64, 3) and r.injected[Fault.NONE] == 1


def test_a_hang_lasts_until_the_fault_is_lifted(avatar: Avatar) -> None:
    r = wrapped(avatar, "hang=1")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            r.render([chunk(avatar)])
        except RenderError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # hanging
    r.set_spec(ChaosSpec())
    thread.join(2.0)
    assert not thread.is_alive() and len(errors) == 1
    (result,) = r.render([chunk(avatar)])  # lifted: renders normally
    assert result.frames.dtype == np.uint8
