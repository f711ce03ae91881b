"""Telemetry pieces: turn records, GPU readings without a GPU, bounded samples, profiling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.telemetry import SampleWriter, TurnTrace, read_gpus

pytestmark = pytest.mark.unit


def test_turn_trace_totals_and_spans() -> None:
    tr = TurnTrace("s", "t1", "trace", t0=10.0)
    tr.add("inference", 10.5, 0.25)
    tr.add("inference", 11.0, 0.5)
    tr.add("encode", 11.6, 0.002)
    rec = tr.record()
    assert rec["stage_totals_s"] == {"inference": 0.75, "encode": 0.002}
    assert rec["stage_counts"] == {"inference": 2, "encode": 1}
    assert rec["spans"][0] == {"stage": "inference", "start_s": 0.5, "duration_s": 0.25}
    json.dumps(rec)  # exportable


def test_no_gpu_means_no_readings() -> None:
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU is present")
    assert read_gpus() == []


def test_sample_writer_rate_and_bound(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path / "samples", rate=0.5, max_bytes=150_000)
    chosen = [writer.wanted("s", f"t{i}") for i in range(400)]
    assert 0.4 < sum(chosen) / 400 < 0.6
    assert writer.wanted("s", "t7") == writer.wanted("s", "t7")
    assert SampleWriter(tmp_path / "none", 0.0, 1).wanted("s", "t") is False
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(25)]
    audio = rng.uniform(-0.5, 0.5, 16000).astype(np.float32)
    for i in range(4):
        folder = writer.save("s", f"t{i}", audio, 16000, frames, 25, {"turn": i})
        assert (folder / "input.wav").stat().st_size == 44 + 32000
    total = sum(f.stat().st_size for f in (tmp_path / "samples").rglob("*") if f.is_file())
    kept = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert kept[-1].endswith("t3")  # the newest survives
    assert len(kept) < 4 and total <= 150_000


def test_profiling_renderer_writes_a_trace(tmp_path: Path) -> None:
    from agent.config import CpuRendererConfig, DefaultAvatarConfig
    from media.cpu_renderer import CpuRenderer
    from media.default_avatar import ensure_default_avatar
    from media.profiling import ProfilingRenderer
    from media.types import ChunkKey, FrameSpec, RenderChunk, SourceRef

    avatar = ensure_default_avatar(tmp_path / "av", DefaultAvatarConfig(
        size=64, clip_seconds=(2.0,)), 25)
    inner = CpuRenderer(lambda _: avatar, CpuRendererConfig())
    prof = ProfilingRenderer(inner, tmp_path / "prof", chunks=1)
    chunk = RenderChunk(ChunkKey("s", "t", 0), avatar.id,
                        tuple(FrameSpec(SourceRef(1, i), speech=True) for i in range(4)), 0,
                        np.zeros(2560, np.float32), 25)
    prof.render([chunk])
    prof.render([chunk])
    assert len(prof.written) == 1
    trace = json.loads(prof.written[0].read_text())
    assert any("render[s/t/0]" in str(ev.get("name")) for ev in trace["traceEvents"])
