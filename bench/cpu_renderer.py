"""CPU renderer speed: ms per frame at 512 and 256 px, with the default avatar.

Run: .venv/bin/python bench/cpu_renderer.py [--seconds 8] [--threads 1]

Rows (all per output frame, chunks of 8 frames rendered back to back):
- `copy (baseline)`: np.copyto of one frame into a chunk buffer: the floor.
- `source frame`: the procedural avatar computing one source frame.
- `idle`: render with speech=False (source frame, closed mouth).
- `speech`: render of a spoken turn (source frame + audio features + mouth warp).
- `speech + blend`: the same with every frame a pixel blend of two source frames.
`p95` is over chunks (per-frame time of each chunk). Stage columns split the
`speech` row. `--threads` sets cv2.setNumThreads (the server uses 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import CpuRendererConfig, DefaultAvatarConfig  # noqa: E402
from bench.machine import describe  # noqa: E402
from media.cpu_renderer import CpuRenderer  # noqa: E402
from media.default_avatar import ensure_default_avatar  # noqa: E402
from media.types import (  # noqa: E402
    RENDER_SAMPLE_RATE,
    ChunkKey,
    FrameSpec,
    RenderChunk,
    SourceRef,
    samples_per_frame,
)

FPS = 25
CHUNK = 8


def speech(seconds: float) -> np.ndarray:
    """Syllables: harmonics of a gliding f0, 4 Hz on/off envelope, a little noise."""
    t = np.arange(round(seconds * RENDER_SAMPLE_RATE)) / RENDER_SAMPLE_RATE
    f0 = 140 + 25 * np.sin(2 * math.pi * 0.6 * t)
    phase = 2 * math.pi * np.cumsum(f0) / RENDER_SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * math.pi * 4.0 * t), 0, None) ** 0.5
    noise = np.random.default_rng(0).normal(0, 0.03, t.size)
    return (0.25 * envelope * (voiced + noise)).astype(np.float32)


def per_frame(fn: Callable[[], int], repeats: int) -> tuple[float, float]:
    """(mean, p95) ms per frame of `fn`, which returns the frames it made."""
    fn()  # warm
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = fn()
        samples.append((time.perf_counter() - t0) * 1000 / frames)
    return float(np.mean(samples)), float(np.percentile(samples, 95))


def bench_size(size: int, seconds: float, root: Path) -> list[str]:
    config = DefaultAvatarConfig(size=size)
    t0 = time.perf_counter()
    avatar = ensure_default_avatar(root / str(size), config, FPS)
    build_s = time.perf_counter() - t0
    renderer = CpuRenderer({avatar.id: avatar}.__getitem__, CpuRendererConfig(chunk_frames=CHUNK))
    renderer.warmup()
    n = int(seconds * FPS) // CHUNK * CHUNK
    audio = speech(n / FPS + 0.1)
    spf = samples_per_frame(FPS)
    clip = 2
    frames_in_clip = avatar.clips[clip].num_frames

    def refs(i: int) -> SourceRef:
        return SourceRef(clip, i % frames_in_clip)

    def chunks(kind: str) -> list[RenderChunk]:
        specs = []
        for i in range(n):
            if kind == "idle":
                specs.append(FrameSpec(refs(i)))
            elif kind == "speech":
                specs.append(FrameSpec(refs(i), speech=True))
            else:
                specs.append(FrameSpec(refs(i), SourceRef(0, i % 200), 0.4, speech=True))
        return [
            RenderChunk(
                ChunkKey("bench", "t", c),
                avatar.id,
                tuple(specs[c * CHUNK : (c + 1) * CHUNK]),
                c * CHUNK,
                audio[: ((c + 1) * CHUNK + 1) * spf],
                FPS,
            )
            for c in range(n // CHUNK)
        ]

    rows = []
    buffer = np.empty((CHUNK, size, size, 3), np.uint8)
    picture = avatar.source.frame(refs(0))

    def copy_chunk() -> int:
        for i in range(CHUNK):
            np.copyto(buffer[i], picture)
        return CHUNK

    rows.append(("copy (baseline)", *per_frame(copy_chunk, 200)))

    def source_chunk(start: list[int] = [0]) -> int:  # noqa: B006 - a counter across calls
        for i in range(CHUNK):
            avatar.source.frame(refs(start[0] + i))
        start[0] += CHUNK
        return CHUNK

    rows.append(("source frame", *per_frame(source_chunk, n // CHUNK)))
    stages: dict[str, float] = {}
    for kind in ("idle", "speech", "blend"):
        work = chunks(kind)
        samples = []
        for chunk in work:
            t1 = time.perf_counter()
            (result,) = renderer.render([chunk])
            samples.append((time.perf_counter() - t1) * 1000 / CHUNK)
            if kind == "speech":
                for name, value in result.stages.items():
                    stages[name] = stages.get(name, 0.0) + value * 1000 / n
        label = {"idle": "idle", "speech": "speech", "blend": "speech + blend"}[kind]
        rows.append((label, float(np.mean(samples)), float(np.percentile(samples, 95))))
    out = [f"{size} px ({build_s * 1000:.0f} ms to build or load the avatar, {n} frames)"]
    out.append(f"  {'':18} {'mean ms':>8} {'p95 ms':>8}")
    for label, mean, p95 in rows:
        out.append(f"  {label:18} {mean:8.2f} {p95:8.2f}")
    split = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
    out.append(f"  speech stages, ms per frame: {split}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="turn length per row")
    parser.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    print(f"CPU renderer, {describe()}")
    print(f"cv2 threads {cv2.getNumThreads()}, numpy {np.__version__}, OpenCV {cv2.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            print("\n".join(bench_size(size, args.seconds, Path(tmp))))


if __name__ == "__main__":
    main()
