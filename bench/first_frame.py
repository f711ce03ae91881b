"""A turn's first chunk through the LatentSync renderer: audio available -> first frame out.

Builds the server's renderer (`LatentSyncRenderer`, the path `serve --renderer latentsync`
takes) over RANDOM full-size weights (bench.gpu_serve.build_models: the stage2.json UNet
at 256 px, Whisper tiny, SD's VAE) with the exact settings (20-step DDIM, CFG 1.5), the
default avatar prepared (its latents cached, as the server does at start-up), and warms
it up (compiles, captures). Then, per runner, it renders a turn's first chunk (16 speech
frames, B = 1, the GPU otherwise idle) `--reps` times each way:
- `render`: the chunk comes out whole (the baseline, and what renderers did before
  streaming);
- `render_streaming`: its first frames are handed over as soon as they are decoded and
  pasted (`media.types.StreamsFrames`), the rest a few at a time.

The clock starts when the render call starts: the chunk's audio (16 frames plus the
look-ahead) is there, its features are computed inside the call. "first frame" is the
first hand-over (the whole chunk for `render`). "cadence slack" is the least, over the
chunk's frames, of (when frame k is due at 25 fps after the first) - (when it was handed
over): negative means playout would repeat a picture. The streaming call's stages split
the first frame's time: audio features, face inputs (cached latents), UNet, then the
first frames' decode and paste-back ("UNet end -> first frame").
Each runner is measured in three variants (`VARIANTS`), on the same warmed-up renderer:
- serial: the renderer's order before session 11 (`overlap` off): a wait for the device
  at every stage's end, each piece's paste-back planned after its decode;
- overlap + audio graph: the paste-back's host work (backgrounds, where the faces go)
  done while the device runs the UNet, every stage queued without a wait, the pasted
  windows copied back through pinned memory, and the audio encoder (front end and
  Whisper) replayed as a CUDA graph, captured at warm-up;
- + compiled VAE decode: the decoder through Inductor, a turn's lead frames' decodes as
  CUDA graphs (the compiled path only; elsewhere the same as the row before). Where the
  renderer compiled the decoder, the rows before run the eager decoder in its
  channels-last weights (about 10 % slower than contiguous: bench/vae_decode.py).
"GC pauses" is the time the garbage collector held the process during the streaming
call.

    python -m bench.first_frame --out out/first_frame            # CUDA machine
    python -m bench.first_frame --tiny --out out/first_frame_dry # CPU dry run
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.config import DefaultAvatarConfig, LatentSyncConfig
from bench.gpu_serve import build_models
from bench.machine import describe
from media.avatar import Avatar
from media.default_avatar import ensure_default_avatar
from media.latentsync.renderer import LOOKAHEAD_MS, LatentSyncRenderer
from media.types import (
    RENDER_SAMPLE_RATE,
    ChunkKey,
    Frames,
    FrameSpec,
    RenderChunk,
    SourceRef,
    samples_per_frame,
)

FPS = 25
FRAMES = 16
# The renderer's choices, measured in turn on each warmed-up renderer:
# (LatentSyncRenderer.overlap, AudioFeatureExtractor.use_graphs, LatentCodec.use_compiled;
# the last only where the renderer compiled the decoder: its compiled path).
VARIANTS = {
    "serial (before session 11)": (False, False, False),
    "overlap + audio graph (session 11)": (True, True, False),
    "+ compiled VAE decode": (True, True, True),
}
RUNNERS: dict[str, dict[str, Any]] = {
    "graphs": {"cuda_graphs": True},
    "compiled": {"cuda_graphs": True, "compile": True},
}
# Runners that also change the UNet's kernels (`set_kernels`) after the renderer applied
# its own: the compiled path with the timestep table (session 11).
KERNELS: dict[str, tuple[str, dict[str, Any]]] = {
    "compiled+ttab": ("compiled", {"timestep_table": True}),
}


def use_variant(renderer: LatentSyncRenderer, models: Any,
                choices: tuple[bool, bool, bool]) -> None:
    """Set one of `VARIANTS` on a renderer and its (shared) models."""
    renderer.overlap, models.audio.use_graphs, models.codec.use_compiled = choices


class GcPauses:
    """Seconds the garbage collector held the process, summed since `reset`."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._note)

    def reset(self) -> None:
        self.total = 0.0

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def turn_start(avatar: Avatar, turn: int) -> RenderChunk:
    """A turn's first 16 frames, all speech, with speech-like audio and the look-ahead."""
    clip = len(avatar.clips) - 1
    length = avatar.clips[clip].num_frames
    specs = tuple(FrameSpec(SourceRef(clip, (turn * FRAMES + f) % length), speech=True)
                  for f in range(FRAMES))
    n = FRAMES * samples_per_frame(FPS) + LOOKAHEAD_MS * RENDER_SAMPLE_RATE // 1000
    rng = np.random.default_rng(turn)
    t = np.arange(n) / RENDER_SAMPLE_RATE
    voice = np.sin(2 * np.pi * 140 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = (0.2 * voice + 0.02 * rng.standard_normal(n)).astype(np.float32)
    return RenderChunk(ChunkKey("bench", f"t{turn}", 0), avatar.id, specs, 0, audio, FPS)


def measure(renderer: LatentSyncRenderer, avatar: Avatar, reps: int, pauses: GcPauses,
            turn: int = 0) -> dict[str, list[float]]:
    """Per rep: whole-chunk time, streaming first frame, streaming chunk time, slack (ms)."""
    out: dict[str, list[float]] = {"whole": [], "first": [], "done": [], "slack": [],
                                   "unet": [], "features": [], "face": [], "decode": [],
                                   "after": [], "gc": []}
    for rep in range(turn, turn + reps):
        chunk = turn_start(avatar, rep)
        t0 = time.perf_counter()
        renderer.render([chunk])
        out["whole"].append(1000 * (time.perf_counter() - t0))
        handed: list[tuple[float, int]] = []
        pauses.reset()
        t0 = time.perf_counter()
        (result,) = renderer.render_streaming([chunk], functools.partial(_note, handed))
        end = time.perf_counter()
        handed.append((end, len(result.frames)))
        first = handed[0][0]
        ready = np.empty(len(result.frames))
        done = 0
        for at, count in handed:
            ready[done:count] = at
            done = count
        due = first + np.arange(len(ready)) / FPS
        out["first"].append(1000 * (first - t0))
        out["done"].append(1000 * (end - t0))
        out["slack"].append(1000 * float((due - ready)[1:].min()))
        stages = result.stages
        out["unet"].append(1000 * stages["inference"])
        out["features"].append(1000 * stages["audio_features"])
        out["face"].append(1000 * stages["face"])
        out["decode"].append(1000 * stages["decode"])
        before = stages["audio_features"] + stages["face"] + stages["inference"]
        out["after"].append(1000 * (first - t0 - before))
        out["gc"].append(1000 * pauses.total)
    return out


def later_chunks(avatar: Avatar, count: int, rep: int) -> list[RenderChunk]:
    """`count` sessions' chunks in mid-turn (16 speech frames each, not a turn's first)."""
    out = []
    for b in range(count):
        first = turn_start(avatar, rep * count + b)
        out.append(RenderChunk(ChunkKey("bench", f"s{b}-{rep}", 1), avatar.id, first.frames,
                               FRAMES, np.concatenate([first.audio, first.audio]), FPS))
    return out


def measure_batch(renderer: LatentSyncRenderer, avatar: Avatar, count: int, reps: int,
                  vae_variants: dict[str, bool], models: Any) -> list[list[str]]:
    """Steady state: `count` mid-turn chunks in one call, whole (UNet, decode, paste-back);
    the decoder's variants take turns per rep."""
    runs: dict[str, dict[str, list[float]]] = {}
    for rep in range(reps):
        for name, compiled in vae_variants.items():
            models.codec.use_compiled = compiled
            batch = later_chunks(avatar, count, rep)
            t0 = time.perf_counter()
            results = renderer.render(batch)
            ms = 1000 * (time.perf_counter() - t0)
            m = runs.setdefault(name, {"ms": [], "unet": [], "decode": [], "paste": []})
            m["ms"].append(ms)
            m["unet"].append(1000 * results[0].stages["inference"])
            m["decode"].append(1000 * results[0].stages["decode"])
            m["paste"].append(1000 * results[0].stages["paste"])
    rows = []
    for name, m in runs.items():
        fps = [count * FRAMES / (ms / 1000) for ms in m["ms"]]
        rows.append([name, str(count), fmt(m["ms"]), f"{statistics.median(fps):.1f}",
                     fmt(m["unet"]), fmt(m["decode"]), fmt(m["paste"])])
        log(" | ".join(rows[-1]))
    return rows


def _note(handed: list[tuple[float, int]], i: int, frames: Frames) -> None:
    handed.append((time.perf_counter(), len(frames)))


def device_gaps(renderer: LatentSyncRenderer, avatar: Avatar, turn: int) -> str:
    """One streaming call under the profiler: the device's kernel timeline from the first
    kernel to the last, its busy time, and its longest idle gaps (what ran around each).
    Where the host falls behind the device, the gaps show it."""
    from torch.profiler import ProfilerActivity, profile

    chunk = turn_start(avatar, turn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        renderer.render_streaming([chunk], lambda i, frames: None)
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.time_range.end > e.time_range.start),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return "no device activity recorded"
    start, end = kernels[0].time_range.start, max(e.time_range.end for e in kernels)
    busy, reach, gaps = 0.0, start, []
    for before, e in zip([None, *kernels[:-1]], kernels, strict=True):
        s, f = e.time_range.start, e.time_range.end
        if s > reach and before is not None:
            gaps.append((s - reach, reach - start, before.name, e.name))
        busy += max(0.0, f - max(s, reach))
        reach = max(reach, f)
    gaps.sort(reverse=True)
    small = sum(g for g, *_ in gaps if g < 20)
    lines = [f"span {(end - start) / 1000:.1f} ms, busy {busy / 1000:.1f} ms, {len(kernels)}"
             f" kernels; idle {sum(g for g, *_ in gaps) / 1000:.1f} ms in {len(gaps)} gaps"
             f" ({small / 1000:.1f} ms in gaps under 20 us)"]
    for gap, at, a, b in gaps[:12]:
        lines.append(f"  {gap / 1000:.2f} ms idle at {at / 1000:.1f} ms: {a[:50]} -> {b[:50]}")
    return "\n".join(lines)


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU")
    p.add_argument("--out", type=Path, default=Path("out/first_frame"))
    p.add_argument("--runners", default="compiled",
                   help=f"comma-separated: {','.join([*RUNNERS, *KERNELS])}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--avatar-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=0,
                   help="also render this many mid-turn chunks per call (steady state),"
                   " with the eager and the compiled VAE decode")
    p.add_argument("--profile", action="store_true",
                   help="also profile one streaming call per variant: the device's idle gaps")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda:0")
    dtype = torch.float32 if args.tiny else torch.float16
    models = build_models(args.tiny, device, dtype)
    resolution = 64 if args.tiny else 256
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (tiny dry run)"
    folder = Path(tempfile.mkdtemp(prefix="first_frame_"))
    avatar = ensure_default_avatar(folder, DefaultAvatarConfig(
        size=args.avatar_size, clip_seconds=(8.0,)), FPS)
    rows = []
    profiles: list[str] = []
    batch_rows: list[list[str]] = []
    pauses = GcPauses()
    for name in args.runners.split(","):
        base, kernels = KERNELS.get(name, (name, {}))
        settings = {} if args.tiny else RUNNERS[base]
        config = LatentSyncConfig(max_batch=max(1, args.batch),
                                  compile_cache_dir=folder / "inductor",
                                  **settings)
        renderer = LatentSyncRenderer.from_models(lambda _: avatar, models, config,
                                                  resolution=resolution)
        models.unet.set_kernels(**kernels)
        t0 = time.perf_counter()
        renderer.prepare_avatar(avatar.id)
        prepared = time.perf_counter() - t0
        t0 = time.perf_counter()
        renderer.warmup()
        warm = time.perf_counter() - t0
        log(f"{name}: avatar prepared in {prepared:.1f} s, warm-up (compile, capture)"
            f" {warm:.1f} s")
        # The variants take turns, one rep each, so that a drift of the card's speed over
        # the run (clocks, heat) is shared by all of them.
        runs: dict[str, dict[str, list[float]]] = {}
        for rep in range(args.reps):
            for variant, choices in VARIANTS.items():
                use_variant(renderer, models, choices)
                m = measure(renderer, avatar, 1, pauses, turn=rep)
                for key, values in m.items():
                    runs.setdefault(variant, {}).setdefault(key, []).extend(values)
        if args.profile:
            for variant, choices in VARIANTS.items():
                use_variant(renderer, models, choices)
                report = device_gaps(renderer, avatar, args.reps)
                profiles.append(f"### {name}, {variant}\n\n```\n{report}\n```\n")
                log(f"{name}, {variant}: {report}")
        if args.batch:
            batch_rows.extend(measure_batch(
                renderer, avatar, args.batch, args.reps, {
                    f"{name}, eager VAE decode": False,
                    f"{name}, compiled VAE decode": models.codec.compiled}, models))
        for variant, m in runs.items():
            rows.append([f"{name}, {variant}", fmt(m["whole"]),
                         fmt(m["first"]), fmt(m["done"]), fmt(m["slack"]), fmt(m["features"]),
                         fmt(m["face"]), fmt(m["unet"]), fmt(m["decode"]), fmt(m["after"]),
                         fmt(m["gc"]), f"{warm:.0f}"])
            log(" | ".join(rows[-1]))
        renderer.close()
        models.unet.set_kernels(**{k: False for k in kernels})
    header = ["runner", "whole chunk ms (render)", "first frame ms (streaming)",
              "chunk done ms (streaming)", "cadence slack ms", "audio features ms", "face ms",
              "UNet ms", "decode ms (all stages)", "UNet end -> first frame ms", "GC pauses ms",
              "warm-up s"]
    text = (f"# A turn's first chunk, audio available -> first frame out: {card}\n\n"
            f"Machine: {describe()}; torch {torch.__version__}; {str(dtype)[6:]}; random"
            f" weights; {resolution} px crops of a {args.avatar_size} px avatar; exact settings"
            f" (20-step DDIM, CFG 1.5); B = 1; {args.reps} reps each, median (min-max).\n\n"
            "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
            + "".join("| " + " | ".join(r) + " |\n" for r in rows)
            + "".join(f"\n{p}" for p in profiles))
    if batch_rows:
        head = ["runner", "chunks a call", "call ms", "fps", "UNet ms", "decode ms",
                "paste ms"]
        text += ("\n## Steady state: mid-turn chunks, one call each\n\n| "
                 + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
                 + "".join("| " + " | ".join(r) + " |\n" for r in batch_rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_frame.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
