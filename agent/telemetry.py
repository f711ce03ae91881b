"""Telemetry pieces that are data first: per-turn stage records, GPU readings, samples.

- `TurnTrace` collects the spans of one turn (stage, start offset, duration)
  and renders them as one exportable record (logged as `turn_trace`).
- `read_gpus` reads utilisation and memory of every GPU through NVML
  (nvidia-ml-py); without a GPU or driver it returns nothing.
- `SampleWriter` keeps a sampled share of turns (input audio, output video)
  for quality debugging, bounded in total size: the oldest go first.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from media.types import Audio, Frame


@dataclass
class TurnTrace:
    """Spans of one turn, relative to its first audio (seconds)."""

    session_id: str
    turn_id: str
    trace_id: str
    t0: float  # clock time of the turn's first event
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, start: float, duration: float) -> None:
        self.spans.append((stage, round(start - self.t0, 6), round(duration, 6)))
        self.counts[stage] = self.counts.get(stage, 0) + 1

    def record(self) -> dict[str, Any]:
        totals: dict[str, float] = {}
        for stage, _, dur in self.spans:
            totals[stage] = totals.get(stage, 0.0) + dur
        return {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "trace_id": self.trace_id,
            "stage_totals_s": {k: round(v, 6) for k, v in totals.items()},
            "stage_counts": dict(self.counts),
            "spans": [{"stage": s, "start_s": a, "duration_s": d} for s, a, d in self.spans],
        }


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    utilization: float  # 0-1
    memory_used: int  # bytes
    memory_total: int


def read_gpus() -> list[GpuReading]:
    """Current readings of every GPU; empty without NVML (no GPU or no driver)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuReading(i, util.gpu / 100.0, int(mem.used), int(mem.total)))
        return out
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


class SampleWriter:
    """Saves a sampled share of turns under `root`, at most `max_bytes` in all."""

    def __init__(self, root: Path, rate: float, max_bytes: int) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {rate}")
        self.root = root
        self.rate = rate
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def wanted(self, session_id: str, turn_id: str) -> bool:
        """Deterministic per turn, so a turn is either kept whole or not at all."""
        digest = hashlib.sha256(f"{session_id}/{turn_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.rate

    def save(self, session_id: str, turn_id: str, audio: Audio, rate: int,
             frames: list[Frame], fps: int, record: dict[str, Any]) -> Path:
        """Write one turn (blocking: call from a worker thread)."""
        import json

        from media.mux import Mp4Writer

        stamp = f"{time.time_ns():020d}"
        folder = self.root / f"{stamp}-{session_id}-{turn_id}"
        folder.mkdir(parents=True, exist_ok=True)
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        with wave.open(str(folder / "input.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm)
        if frames:
            h, w_ = frames[0].shape[:2]
            with Mp4Writer(folder / "output.mp4", fps, w_ - w_ % 2, h - h % 2, rate) as mp4:
                for f in frames:
                    mp4.write_video(np.ascontiguousarray(f[: h - h % 2, : w_ - w_ % 2]))
                mp4.write_audio(pcm)
        (folder / "trace.json").write_text(json.dumps(record, indent=1))
        self._enforce_bound(keep=folder)
        return folder

    def _enforce_bound(self, keep: Path) -> None:
        """Delete the oldest samples until the total fits (the newest always stays)."""
        folders = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.name)
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        total = sum(sizes.values())
        for p in folders:
            if total <= self.max_bytes or p == keep:
                break
            total -= sizes[p]
            shutil.rmtree(p, ignore_errors=True)
