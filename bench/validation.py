"""Frame validation per chunk: what it costs the render lane (CPU), before and after.

The engine checks every rendered chunk in the lane's thread before it is shown
(`agent.framechecks.FrameChecks.validate`: two source pictures composed, then
`agent.validation.validate_chunk`), so on a GPU lane this time is added to every
chunk's latency and the device idles through it. Rows, per chunk of 16 frames of
the default avatar (512 px unless --size):
- `previous validate_chunk`: the algorithm before session 13 (kept below as the
  baseline: per-frame loops over strided views, float64 statistics, a boolean mask
  for the coherence check);
- `validate_chunk`: the current one (one contiguous copy of the sampled pixels,
  float32 statistics, vectorised clipped counts, the mouth box subtracted);
- `FrameChecks.validate`: the current check as the engine runs it (the two source
  pictures are composed first: procedural frames for the default avatar).
Both algorithms must give the same verdicts; the bench checks that on clean and
corrupted chunks before timing.

    python -m bench.validation [--size 512] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import DefaultAvatarConfig, ValidationConfig
from agent.framechecks import FrameChecks, mouth_box
from agent.validation import OK, Box, Verdict, validate_chunk
from bench.machine import describe
from media.default_avatar import ensure_default_avatar
from media.idle_video import compose
from media.types import ChunkKey, FrameSpec, RenderChunk, RenderResult


def previous_validate_chunk(frames: npt.NDArray[Any], expected_frames: int,
                            sources: npt.NDArray[np.uint8], mouth: list[Box],
                            config: ValidationConfig, stride: int = 2) -> Verdict:
    """`validate_chunk` as it was before session 13 (pixel checks only; the baseline)."""
    def clipped(pixels: npt.NDArray[np.uint8]) -> float:
        return float(np.count_nonzero((pixels <= 3) | (pixels >= 252))) / max(pixels.size, 1)

    want = (expected_frames, *sources.shape[1:])
    if frames.shape != want or frames.dtype != np.uint8:
        return Verdict(False, "shape")
    view = frames[:, ::stride, ::stride]
    src_view = sources[:, ::stride, ::stride]
    floor_std = float(src_view.std(axis=(1, 2, 3)).min())
    stds = view.reshape(len(view), -1).std(axis=1)
    if float(stds.min()) < min(config.blank_std, floor_std / 2):
        return Verdict(False, "blank")
    src_clipped = max(clipped(s) for s in src_view)
    for frame in view:
        if clipped(frame) - src_clipped > config.saturated_share:
            return Verdict(False, "saturated")
    n = len(frames)
    for j, (source, (x0, y0, x1, y1)) in enumerate(zip(sources, mouth, strict=True)):
        i = j * (n - 1) // max(len(sources) - 1, 1)
        diff = np.abs(frames[i, ::stride, ::stride].astype(np.int16)
                      - source[::stride, ::stride].astype(np.int16))
        keep = np.ones(diff.shape[:2], bool)
        keep[y0 // stride : -(-y1 // stride), x0 // stride : -(-x1 // stride)] = False
        if keep.any() and float(diff[keep].mean()) > config.max_mean_diff:
            return Verdict(False, "incoherent")
    return OK


def timed_ms(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="default avatar's frame size")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    config = ValidationConfig()
    with tempfile.TemporaryDirectory() as root:
        avatar = ensure_default_avatar(Path(root), DefaultAvatarConfig(size=args.size,
                                                                       clip_seconds=(4.0,)), 25)
    specs = tuple(FrameSpec(s.source, speech=True) for s in avatar.idle_loop[: args.frames])
    n = len(specs)
    chunk = RenderChunk(ChunkKey("s", "t", 0), avatar.id, specs, 0,
                        np.zeros(16000, np.int16), 25)
    frames = np.stack([compose(avatar, s) for s in specs])  # a render that matches its sources
    picks = [0, n - 1]
    sources = np.stack([compose(avatar, specs[i]) for i in picks])
    boxes = [mouth_box(avatar.source.geometry(specs[i].source), avatar.width, avatar.height)
             for i in picks]  # no blends: each frame's own geometry
    checks = FrameChecks({avatar.id: avatar}.__getitem__, config)

    # The same verdicts, on the clean chunk and on each kind of garbage.
    cases = {
        "clean": frames,
        "blank": np.where(np.arange(n)[:, None, None, None] == n // 2, 0, frames).astype(np.uint8),
        "saturated": np.where(frames > 100, 255, 0).astype(np.uint8),
        "incoherent": np.roll(frames, 24, axis=2),
    }
    for name, case in cases.items():
        old = previous_validate_chunk(case, n, sources, boxes, config).check
        new = validate_chunk(case, n, sources, boxes, config).check
        if old != new:
            raise SystemExit(f"verdicts differ on the {name} chunk: {old} against {new}")

    rows = [
        ("previous validate_chunk (baseline)",
         lambda: previous_validate_chunk(frames, n, sources, boxes, config)),
        ("validate_chunk", lambda: validate_chunk(frames, n, sources, boxes, config)),
        ("FrameChecks.validate (+ 2 source pictures composed)",
         lambda: checks.validate(chunk, RenderResult(chunk.key, frames))),
    ]
    print(f"# Frame validation of one chunk ({n} frames, {avatar.width} px default avatar)\n")
    print(f"Machine: {describe()}; numpy {np.__version__}; median (min) of {args.reps}.\n")
    print("| what | ms a chunk (median) | min ms |")
    print("|---|---|---|")
    for name, fn in rows:
        med, low = timed_ms(fn, args.reps)
        print(f"| {name} | {med:.1f} | {low:.1f} |")
    print("\nVerdicts agree on clean, blank, saturated and incoherent chunks.")


if __name__ == "__main__":
    main()
