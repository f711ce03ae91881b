"""LatentSync UNet speed on one GPU: each optimisation separately, the reference re-measured.

Run (on a CUDA machine; the architecture comes from the manifest, weights are random:
the cost does not depend on their values):
    python bench/latentsync_bench.py --config ../shared/manifests/latentsync_unet_stage2.json \
        --out bench/results/latentsync_h100.md
`--tiny` runs every CPU-capable row at toy size (a smoke test of this script).

A chunk is 16 frames; one denoising loop renders a batch of B chunks (B sessions'
chunks) with classifier-free guidance, so the UNet sees 2B videos. fps = 16 * B /
seconds per loop. Rows:
- reference: eager fp16 UNet, B=1, 20 DDIM steps, guidance 1.5 (our UNet; LatentSync's
  own code is not run here);
- batching: the same with B chunks in one UNet call;
- CUDA graphs: `GraphPredictor` (captured once per shape, replayed);
- attention backend (flash / memory-efficient / cuDNN / math) and channels_last: one
  UNet call, B=8;
- approximations: DeepCache interval 3, DPM-Solver++ 10 / 8 steps, combined; each with
  the relative L2 difference of its final latents against the exact 20-step DDIM result
  on the same inputs and noise (B=1, fp16, graphs). With random weights the UNet is no
  denoiser, so these differences measure how far each sampler's trajectory moves, not
  image quality: re-measure them with the released weights;
- VAE (SD's AutoencoderKL architecture, random weights): encode x2 + decode per batch,
  serial after the loop and overlapped with it on a second CUDA stream;
- first chunk: audio features (Whisper-tiny, random weights) + 20 steps + VAE decode +
  frames copied to the host, B=1;
- memory: weights, eager peak allocated, graph footprint (reserved after capture).
Optional sections (not in the default 'all'): `profile` (top kernels of one eager call)
`aot` (the server's `aot` runner: weightless AOTInductor artifacts with a symbolic
batch, compiled or loaded from `--aot-dir`, under CUDA graphs; its speed against graphs
and eager in the same run, then a fresh process's warm start from the disk cache) and
`compile` (torch.compile under CUDA graphs against plain graphs, exact and fast
samplers, cold compile time, then a fresh process's warm start from Inductor's disk
caches, TORCHINDUCTOR_CACHE_DIR, default .cache/inductor). `tune` compares compiled
variants of the exact 20-step loop at B=`--tune-batch` chunks against plain graphs in
the same run: Inductor settings (freezing, 1x1 convolutions as matmuls, coordinate-
descent tuning, max-autotune) and FP8 linear layers (`media/latentsync/fp8.py`), each
separately and combined, with cold compile time, the difference from the fp16 graphs and
a GPU-time breakdown by kernel kind. `choices` runs the exact loop at `--tune-batch`
chunks under CUDA graphs with each fused SDPA backend pinned (cuDNN, flash,
memory-efficient), then with cuDNN's convolution autotuning, against PyTorch's
defaults, no compiling.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from media.latentsync.accel import (  # noqa: E402
    CompiledPredictor,
    GraphPredictor,
    NoisePredictor,
    SchedulerKind,
    UNetPredictor,
    denoise,
    make_scheduler,
)
from media.latentsync.aot import AotLoad, AotPredictor  # noqa: E402
from media.latentsync.audio_features import (  # noqa: E402
    AudioFeatureExtractor,
    ChunkAudio,
    required_samples,
)
from media.latentsync.config import UNetConfig  # noqa: E402
from media.latentsync.fp8 import fp8_linears  # noqa: E402
from media.latentsync.unet import UNet3DConditionModel  # noqa: E402
from media.latentsync.verify import relative_error  # noqa: E402
from media.latentsync.whisper import WhisperEncoder  # noqa: E402

FRAMES = 16
FPS = 25
GUIDANCE = 1.5
GIB = 1024**3
VAE_SCALE = 0.18215


def stages_text(load: AotLoad) -> str:
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in load.stages.items())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_unet(config: UNetConfig, device: str, dtype: torch.dtype) -> UNet3DConditionModel:
    """Random weights, initialised on the device (fast), output scaled to unit std.

    PyTorch's default init makes the output's scale arbitrary; unit-std noise
    predictions keep 20 fp16 steps in range, as a trained model's would.
    """
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet3DConditionModel(config).to(dtype).eval().requires_grad_(False)
    noise, conditions, audio = chunk_inputs(1, 8, device, dtype, seed=99)
    with torch.inference_mode():
        x = torch.cat([torch.cat([noise, noise]), conditions], dim=1)  # (2B, 13, F, h, w)
        std = unet(x, 500, audio).float().std()
        unet.conv_out.weight.div_(std)
        assert unet.conv_out.bias is not None
        unet.conv_out.bias.div_(std)
    return unet


def build_vae(tiny: bool, device: str, dtype: torch.dtype) -> AutoencoderKL:
    """Stable Diffusion's VAE architecture (LatentSync uses sd-vae-ft-mse), random weights."""
    channels = (32, 32, 32, 32) if tiny else (128, 256, 512, 512)
    with torch.device(device):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=channels,
            layers_per_block=1 if tiny else 2,
            latent_channels=4,
        )
    return vae.to(dtype).eval().requires_grad_(False)


def chunk_inputs(
    b: int, latent: int, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """noise (B,4,F,h,w), conditions (2B,9,F,h,w), audio (2B*F,50,384) unconditional half 0."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, 4, FRAMES, latent, latent, generator=gen)
    conditions = torch.randn(b, 9, FRAMES, latent, latent, generator=gen).repeat(2, 1, 1, 1, 1)
    audio = torch.randn(b * FRAMES, 50, 384, generator=gen)
    audio = torch.cat([torch.zeros_like(audio), audio])
    return noise.to(device, dtype), conditions.to(device, dtype), audio.to(device, dtype)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.cuda = self.device == "cuda"
        self.card = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.started = time.perf_counter()
        self.unet = build_unet(read_config(args), self.device, self.dtype)
        self.weights_gib = torch.cuda.memory_allocated() / GIB if self.cuda else 0.0
        self.vae = build_vae(args.tiny, self.device, self.dtype)
        self.vae_gib = torch.cuda.memory_allocated() / GIB - self.weights_gib if self.cuda else 0.0
        self.exact: dict[int, torch.Tensor] = {}  # latent side -> exact 20-step result, B=1
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.skipped: list[str] = []

    # ---------------------------------------------------------------- measurement helpers

    def time_left(self) -> bool:
        return time.perf_counter() - self.started < self.args.budget_s

    def loop(
        self,
        predictor: NoisePredictor,
        b: int,
        latent: int,
        *,
        steps: int = 20,
        kind: SchedulerKind = "ddim",
        reps: int | None = None,
    ) -> tuple[float, torch.Tensor]:
        """(median seconds per loop, final latents of seed-0 inputs) after a short warm loop."""
        noise, conditions, audio = chunk_inputs(b, latent, self.device, self.dtype)
        with torch.inference_mode():
            denoise(predictor, make_scheduler(kind), noise, conditions, audio, steps=3)
            times = []
            out = noise
            for _ in range(reps or self.args.reps):
                sync()
                t0 = time.perf_counter()
                out = denoise(
                    predictor, make_scheduler(kind), noise, conditions, audio, steps=steps
                )
                sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def call_ms(self, predictor: NoisePredictor, b: int, latent: int, calls: int = 5) -> float:
        """Median ms of one UNet call (the exact path) after two warm calls."""
        noise, conditions, audio = chunk_inputs(b, latent, self.device, self.dtype)
        x = torch.cat([torch.cat([noise, noise]), conditions], dim=1)  # (2B, 13, F, h, w)
        t = torch.tensor(500)
        times = []
        with torch.inference_mode():
            for i in range(calls + 2):
                predictor.reset()
                sync()
                t0 = time.perf_counter()
                predictor(x, t, audio)
                sync()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    @contextmanager
    def memory(self) -> Iterator[dict[str, float]]:
        """Peak allocated and (after empty_cache) reserved GiB over the block."""
        found: dict[str, float] = {}
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        yield found
        if self.cuda:
            torch.cuda.empty_cache()
            found["peak"] = torch.cuda.max_memory_allocated() / GIB
            found["held"] = torch.cuda.memory_reserved() / GIB

    def add(
        self,
        row: str,
        px: int,
        b: int,
        steps: int,
        seconds: float,
        diff: float | None = None,
        mem: str = "",
    ) -> None:
        fps = FRAMES * b / seconds
        cells = [
            row,
            str(px),
            str(b),
            str(steps),
            f"{seconds * 1000:.0f}",
            f"{fps:.1f}",
            f"{seconds * 1000 / steps:.1f}",
            "" if diff is None else f"{diff:.2e}",
            mem,
        ]
        self.rows.append(cells)
        log(" | ".join(cells))
        self.save()  # a run killed at its time limit still leaves every finished row

    def diff(self, latent: int, out: torch.Tensor) -> float:
        """Relative L2 of chunk 0 against the exact 20-step DDIM result (same inputs, B=1)."""
        if latent not in self.exact:
            self.exact[latent] = self.loop(self.graphs(), 1, latent, reps=1)[1]
        return relative_error(out[:1].float(), self.exact[latent][:1].float())

    def graphs(self, interval: int = 1, **kw: Any) -> NoisePredictor:
        if self.cuda:
            return GraphPredictor(self.unet, interval, **kw)
        return UNetPredictor(self.unet, interval)  # CPU smoke run: same rows, eager

    # ---------------------------------------------------------------- sections

    def throughput(self, px: int, batches: list[int], eager_batches: list[int]) -> None:
        latent = px // 8
        with self.memory() as mem:
            ref_s, _ = self.loop(UNetPredictor(self.unet), 1, latent)
        self.add("reference: eager, 1 chunk", px, 1, 20, ref_s, mem=fmt_mem(mem, "peak"))
        for b in eager_batches:
            if not self.time_left():
                self.skipped.append(f"{px}px eager B={b}")
                continue
            with self.memory() as mem:
                s, _ = self.loop(UNetPredictor(self.unet), b, latent)
            self.add("+ batching (eager)", px, b, 20, s, mem=fmt_mem(mem, "peak"))
        for b in batches:
            if not self.time_left():
                self.skipped.append(f"{px}px graphs B={b}")
                continue
            with self.memory() as mem:
                pred = self.graphs()
                s, out = self.loop(pred, b, latent)
            del pred  # after the memory reading: its graph pool is part of the footprint
            if b == 1:
                self.exact[latent] = out
            self.add("+ CUDA graphs", px, b, 20, s, mem=fmt_mem(mem, "held"))

    def approximations(self, px: int, batches: list[int]) -> None:
        latent = px // 8
        variants: list[tuple[str, int, SchedulerKind, int]] = [
            ("DeepCache interval 3", 3, "ddim", 20),
            ("DPM-Solver++ 10 steps", 1, "dpm++", 10),
            ("DPM-Solver++ 8 steps", 1, "dpm++", 8),
            ("DPM-Solver++ 10 + DeepCache 3", 3, "dpm++", 10),
            ("DPM-Solver++ 8 + DeepCache 3", 3, "dpm++", 8),
        ]
        for name, interval, kind, steps in variants:
            pred = self.graphs(interval)
            for b in batches:
                if not self.time_left():
                    self.skipped.append(f"{px}px {name} B={b}")
                    continue
                s, out = self.loop(pred, b, latent, steps=steps, kind=kind)
                self.add(name, px, b, steps, s, self.diff(latent, out) if b == 1 else None)
            del pred

    def kernels(self, px: int, b: int) -> None:
        """One UNet call, B chunks: attention backends (graphs) and channels_last (eager)."""
        latent = px // 8
        eager_ms = self.call_ms(UNetPredictor(self.unet), b, latent)
        self.notes.append(
            f"{px}px B={b} one UNet call, eager, default attention: {eager_ms:.1f} ms"
        )
        if self.cuda:
            for backend in (
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH,
            ):
                try:
                    ms = self.call_ms(GraphPredictor(self.unet, sdpa=[backend]), b, latent)
                    self.notes.append(
                        f"{px}px B={b} one UNet call, graphs, {backend.name}: {ms:.1f} ms"
                    )
                except RuntimeError as exc:  # a backend that refuses these shapes
                    self.notes.append(f"{px}px B={b} {backend.name}: not usable ({str(exc)[:120]})")
                gc.collect()
                torch.cuda.empty_cache()
            ms = self.call_ms(GraphPredictor(self.unet), b, latent)
            self.notes.append(f"{px}px B={b} one UNet call, graphs, default attention: {ms:.1f} ms")
        self.unet.to(memory_format=torch.channels_last)
        try:
            ms = self.call_ms(UNetPredictor(self.unet), b, latent)
            self.notes.append(
                f"{px}px B={b} one UNet call, eager, channels_last weights: {ms:.1f} ms"
            )
        finally:
            self.unet.to(memory_format=torch.contiguous_format)

    def vae_and_overlap(self, px: int, b: int) -> None:
        """VAE cost per batch, then the exact loop with the VAE work serial vs overlapped."""
        latent = px // 8
        images = torch.randn(FRAMES * b, 3, px, px, device=self.device, dtype=self.dtype)
        latents = torch.randn(FRAMES * b, 4, latent, latent, device=self.device, dtype=self.dtype)

        def encode2() -> None:
            for _ in range(2):  # masked frames and reference frames
                self.vae.encode(images).latent_dist.mode()

        def decode() -> torch.Tensor:
            out: torch.Tensor = self.vae.decode(latents / VAE_SCALE).sample
            return out

        with torch.inference_mode():
            enc_ms = timed_ms(encode2)
            dec_ms = timed_ms(decode)
        self.notes.append(
            f"{px}px VAE for {b} chunk(s) ({FRAMES * b} frames): encode x2 {enc_ms:.0f} ms,"
            f" decode {dec_ms:.0f} ms"
        )
        pred = self.graphs()
        loop_s, _ = self.loop(pred, b, latent)
        serial = loop_s + (enc_ms + dec_ms) / 1000
        self.add("exact graphs + VAE enc x2 + dec, serial", px, b, 20, serial)
        if not self.cuda:
            return
        noise, conditions, audio = chunk_inputs(b, latent, self.device, self.dtype)
        side = torch.cuda.Stream()
        times = []
        with torch.inference_mode():
            for _ in range(self.args.reps + 1):
                sync()
                t0 = time.perf_counter()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # the previous batch's decode, the next's encode
                    decode()
                    encode2()
                denoise(pred, make_scheduler(), noise, conditions, audio, steps=20)
                sync()
                times.append(time.perf_counter() - t0)
        self.add(
            "exact graphs + VAE on a 2nd stream, overlapped",
            px,
            b,
            20,
            statistics.median(times[1:]),
        )

    def first_chunk(
        self, px: int, variants: list[tuple[str, NoisePredictor, SchedulerKind, int, bool]]
        | None = None,
    ) -> None:
        """Audio available -> 16 frames on the host, B=1, warm (graphs captured).
        variants: (name, predictor, sampler, steps, with VAE encode)."""
        latent = px // 8
        encoder = WhisperEncoder().to(self.device)
        extractor = AudioFeatureExtractor(encoder, device=self.device, dtype=self.dtype)
        samples = required_samples(FRAMES, FPS)
        rng = np.random.default_rng(0)
        audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)
        chunk = ChunkAudio(audio, 0, FRAMES, FPS)
        noise, conditions, _ = chunk_inputs(1, latent, self.device, self.dtype)
        images = torch.randn(FRAMES, 3, px, px, device=self.device, dtype=self.dtype)
        for name, pred, kind, steps, with_encode in variants or [
            ("exact, avatar latents cached", self.graphs(), "ddim", 20, False),
            ("exact, + VAE encode x2", self.graphs(), "ddim", 20, True),
            ("DPM-Solver++ 10 + DeepCache 3", self.graphs(3), "dpm++", 10, False),
        ]:
            parts: dict[str, list[float]] = {"features": [], "encode": [], "unet": [], "decode": []}
            totals = []
            for rep in range(self.args.reps + 2):  # the first rep warms (captures graphs)
                marks = [time.perf_counter()]
                with torch.inference_mode():
                    feats = extractor.chunk_features([chunk])  # (F, 50, 384)
                    sync()
                    marks.append(time.perf_counter())
                    if with_encode:
                        for _ in range(2):
                            self.vae.encode(images).latent_dist.mode()
                    sync()
                    marks.append(time.perf_counter())
                    cond_audio = torch.cat([torch.zeros_like(feats), feats])
                    out = denoise(
                        pred, make_scheduler(kind), noise, conditions, cond_audio, steps=steps
                    )
                    sync()
                    marks.append(time.perf_counter())
                    frames = self.vae.decode(out[0].transpose(0, 1) / VAE_SCALE).sample
                    pixels = ((frames.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1)
                    pixels.cpu()
                    marks.append(time.perf_counter())
                if rep >= 2:
                    for key, a, z in zip(parts, marks[:-1], marks[1:], strict=True):
                        parts[key].append(z - a)
                    totals.append(marks[-1] - marks[0])
            split = ", ".join(f"{k} {1000 * statistics.median(v):.0f}" for k, v in parts.items())
            self.notes.append(
                f"{px}px first chunk ({name}): {1000 * statistics.median(totals):.0f} ms"
                f" audio->16 frames on host ({split} ms)"
            )
            log(self.notes[-1])

    def aot(self, px: int, b: int) -> None:
        """The AOT runner (exact forward, batch symbolic up to B chunks) vs graphs and eager
        in the same run, then a fresh process's warm start from the stored artifact."""
        latent = px // 8
        sample_shape = (2 * b, 13, FRAMES, latent, latent)
        audio_shape = (2 * b * FRAMES, 50, 384)
        graphs = self.graphs()
        t0 = time.perf_counter()
        if isinstance(graphs, GraphPredictor):
            graphs.warmup(sample_shape, audio_shape)
        self.notes.append(
            f"{px}px B={b} CUDA graph capture at start (no compiling):"
            f" {time.perf_counter() - t0:.2f} s"
        )
        # Eager and graphs with the default kernels, measured first: the AOT predictor then
        # sets the UNet's compiled-forward choices (accel.COMPILED_KERNELS), which move the
        # convolution weights to channels-last (and graphs captured before would capture
        # again, on those).
        eager_ms = self.call_ms(UNetPredictor(self.unet), b, latent)
        graphs_ms = self.call_ms(graphs, b, latent)
        graph_s, graph_out = self.loop(graphs, b, latent)
        pred = self.aot_predictor(b)
        t0 = time.perf_counter()
        if isinstance(pred, AotPredictor):
            pred.warmup(sample_shape, audio_shape)
        ready = time.perf_counter() - t0
        for load in pred.loads if isinstance(pred, AotPredictor) else []:
            size = load.path.stat().st_size / 2**20
            self.notes.append(
                f"{px}px AOTInductor {load.kind} artifact {load.path.name} ({size:.1f} MiB):"
                f" {'exported, compiled, stored and loaded' if load.compiled_now else 'loaded'}"
                f" in {load.seconds:.1f} s ({stages_text(load)}); 2-row call vs eager:"
                f" rel. L2 {load.error:.2e};"
                f" ready with B={b} graphs captured after {ready:.1f} s"
            )
            log(self.notes[-1])
        self.notes.append(f"{px}px B={b} one UNet call, eager: {eager_ms:.1f} ms")
        self.notes.append(f"{px}px B={b} one UNet call, CUDA graphs: {graphs_ms:.1f} ms")
        ms = self.call_ms(pred, b, latent)
        self.notes.append(f"{px}px B={b} one UNet call, AOTInductor + CUDA graphs: {ms:.1f} ms")
        log(self.notes[-1])
        self.add("+ CUDA graphs (this run's baseline)", px, b, 20, graph_s)
        s, out = self.loop(pred, b, latent)
        self.add("AOTInductor + CUDA graphs, exact (guided forward)", px, b, 20, s,
                 relative_error(out.float(), graph_out.float()))
        self.notes.append(
            "AOTInductor row: rel. L2 is against the CUDA-graph (eager kernels) result on the"
            " same B-chunk inputs, not the B=1 exact run"
        )
        if "aotwarm" not in self.args.sections:  # the parent: a fresh process's warm start
            self.fresh_process(["--sections", "aotwarm", "--aot-dir", str(self.args.aot_dir),
                                "--aot-batch", str(b)], "artifact on disk")

    def aot_predictor(self, b: int) -> NoisePredictor:
        if not self.cuda:
            return UNetPredictor(self.unet)  # --tiny on the CPU: the bench's plumbing only
        # as the renderer builds it with guidance: the guided forward, one copy of the pair
        return AotPredictor(self.unet, cache_dir=self.args.aot_dir, max_rows=2 * b, guided=True)

    def compiled_predictor(self, interval: int) -> NoisePredictor:
        dynamic = None if self.args.compile_dynamic else False
        if self.cuda:
            if self.args.compile_renderer:  # as `renderer.noise_predictor_for` builds it
                from types import SimpleNamespace

                from agent.config import LatentSyncConfig
                from media.latentsync.pipeline import LatentSyncModels
                from media.latentsync.renderer import compiled_kernels

                device = self.unet.conv_in.weight.device  # compiled_kernels reads only this
                on = cast(LatentSyncModels, SimpleNamespace(device=device))
                return CompiledPredictor(self.unet, interval, mode=self.args.compile_mode,
                                         dynamic=dynamic, guided=True,
                                         kernels=compiled_kernels(LatentSyncConfig(), on))
            return CompiledPredictor(self.unet, interval, mode=self.args.compile_mode,
                                     dynamic=dynamic)
        return UNetPredictor(torch.compile(self.unet, dynamic=dynamic), interval)  # type: ignore[arg-type]

    def compile_section(self, px: int, batches: list[int]) -> None:
        """torch.compile (Inductor) under CUDA graphs against plain CUDA graphs, same run:
        cold compile + capture time, speed, difference; then a fresh process's warm start
        from Inductor's on-disk caches."""
        latent = px // 8
        mode = self.args.compile_mode
        if self.args.compile_dynamic:  # one predictor: later batch sizes use symbolic shapes
            mode += ", dynamic batch"
        if self.args.compile_renderer:
            mode += ", the renderer's guided forward and kernels"
            shared = self.compiled_predictor(1)
        for b in batches:
            if not self.time_left():
                self.skipped.append(f"{px}px compile B={b}")
                continue
            base_s, base_out = self.loop(self.graphs(), b, latent)
            self.add("+ CUDA graphs (this run's baseline)", px, b, 20, base_s)
            pred = shared if self.args.compile_dynamic else self.compiled_predictor(1)
            t0 = time.perf_counter()
            if isinstance(pred, GraphPredictor):
                pred.warmup((2 * b, 13, FRAMES, latent, latent), (2 * b * FRAMES, 50, 384))
            cold = time.perf_counter() - t0
            s, out = self.loop(pred, b, latent)
            self.add(f"torch.compile ({mode}) + CUDA graphs", px, b, 20, s,
                     relative_error(out.float(), base_out.float()))
            self.notes.append(f"{px}px B={b} torch.compile ({mode}) cold compile + capture"
                              f" {cold:.1f} s (rel. L2 column: against this run's CUDA-graph"
                              " result, same B-chunk inputs)")
            log(self.notes[-1])
            del pred
        b = max(batches)
        for name, interval, kind, steps in (("DPM-Solver++ 8 + DeepCache 3", 3, "dpm++", 8),):
            if not self.time_left():
                self.skipped.append(f"{px}px compile {name}")
                continue
            base_s, base_out = self.loop(self.graphs(interval), b, latent, steps=steps, kind=kind)
            self.add(f"{name} (this run's baseline)", px, b, steps, base_s)
            pred = self.compiled_predictor(interval)
            t0 = time.perf_counter()
            s, out = self.loop(pred, b, latent, steps=steps, kind=kind)
            self.add(f"{name}, torch.compile ({mode})", px, b, steps, s,
                     relative_error(out.float(), base_out.float()))
            del pred
        if self.time_left():  # the first chunk of a turn, B=1, compiled
            self.first_chunk(px, [
                ("exact, compiled", self.compiled_predictor(1), "ddim", 20, False),
                ("DDIM 20 + DeepCache 3 (turn start), compiled", self.compiled_predictor(3),
                 "ddim", 20, False),
                ("DPM-Solver++ 8 + DeepCache 3, compiled", self.compiled_predictor(3), "dpm++",
                 8, False),
            ])
        if "compilewarm" not in self.args.sections:  # the parent: a fresh process's start
            self.fresh_process(["--sections", "compilewarm", "--compile-batch",
                                str(min(batches)), "--compile-mode", self.args.compile_mode]
                               + (["--compile-dynamic"] if self.args.compile_dynamic else [])
                               + (["--compile-renderer"] if self.args.compile_renderer else []),
                               f"Inductor caches on disk ({os.environ['TORCHINDUCTOR_CACHE_DIR']})")

    def fresh_process(self, args: list[str], what: str) -> None:
        """Run this script again in a new process (a warm start: `args` pick a child
        section) and note its time from launch to exit with the child's 'warm start:' line."""
        cmd = [sys.executable, __file__, "--config", self.args.config, *args]
        cmd += ["--tiny"] if self.args.tiny else []
        t0 = time.perf_counter()
        child = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("warm start:")]
        self.notes.append(
            f"fresh process, {what}: {wall:.1f} s from launch to exit"
            f" ({lines[-1] if lines else 'child failed: ' + child.stderr[-300:]})")
        log(self.notes[-1])

    def tune(self, px: int, b: int, variants: list[str]) -> None:
        """Exact 20-step DDIM, B chunks, compiled variants under CUDA graphs against plain
        graphs (this run's baseline): Inductor settings and FP8 linear layers, each
        separately, with cold compile time, speed, difference and a kernel breakdown."""
        latent = px // 8
        sample_shape = (2 * b, 13, FRAMES, latent, latent)
        audio_shape = (2 * b * FRAMES, 50, 384)
        base_s, base_out = self.loop(self.graphs(), b, latent)
        self.add("+ CUDA graphs (this run's baseline)", px, b, 20, base_s)
        for name in variants:
            if not self.time_left():
                self.skipped.append(f"{px}px tune {name}")
                continue
            options, fp8 = TUNE_VARIANTS[name]
            unet = self.unet
            if fp8:
                unet = copy.deepcopy(self.unet)
                swapped = fp8_linears(unet)
                self.notes.append(f"FP8: {swapped} linear layers swapped for row-wise e4m3")
            pred: NoisePredictor
            if self.cuda:
                pred = CompiledPredictor(unet, 1, options=options or None, dynamic=False)
            else:
                pred = UNetPredictor(unet)
            t0 = time.perf_counter()
            if isinstance(pred, GraphPredictor):
                pred.warmup(sample_shape, audio_shape)
            cold = time.perf_counter() - t0
            s, out = self.loop(pred, b, latent)
            self.add(f"tune: {name}", px, b, 20, s, relative_error(out.float(), base_out.float()))
            self.notes.append(f"{px}px B={b} tune {name}: options {options or 'default'},"
                              f" fp8 {fp8}; cold compile + capture {cold:.1f} s; rel. L2"
                              " against this run's CUDA-graph result, same inputs")
            log(self.notes[-1])
            if self.cuda and isinstance(pred, CompiledPredictor):
                self.notes.append(f"{px}px B={b} tune {name} kernels (one call, no graph): "
                                  + kernel_breakdown(pred._run, sample_shape, audio_shape,
                                                     self.dtype))
                log(self.notes[-1])
            del pred, unet
            gc.collect()
            torch.cuda.empty_cache() if self.cuda else None

    def choices(self, px: int, b: int) -> None:
        """Exact 20-step loop, B chunks, under CUDA graphs, with the library kernels chosen
        otherwise, against PyTorch's defaults in the same run: one fused attention backend
        pinned for every SDPA call (spatial, audio and temporal attention), and cuDNN's
        convolution autotuning (cudnn.benchmark). No compiling: seconds per row."""
        latent = px // 8
        base_s, base_out = self.loop(self.graphs(), b, latent)
        self.add("+ CUDA graphs, attention as PyTorch picks (this run's baseline)", px, b, 20,
                 base_s)
        for name, backend in (("cuDNN", SDPBackend.CUDNN_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION),
                              ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION)):
            if not self.time_left():
                self.skipped.append(f"{px}px attention {name}")
                continue
            try:
                s, out = self.loop(self.graphs(sdpa=[backend]), b, latent)
            except RuntimeError as exc:  # a backend that does not take some shape
                self.notes.append(f"{px}px B={b} {name} attention: not run ({exc})"[:300])
                log(self.notes[-1])
                continue
            finally:
                gc.collect()
                torch.cuda.empty_cache() if self.cuda else None
            self.add(f"+ CUDA graphs, {name} attention pinned", px, b, 20, s,
                     relative_error(out.float(), base_out.float()))
        if self.time_left():
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True  # tunes at the warm-up before capture
            try:
                s, out = self.loop(self.graphs(), b, latent)
            finally:
                torch.backends.cudnn.benchmark = before
            self.add("+ CUDA graphs, cudnn.benchmark (convolutions autotuned)", px, b, 20, s,
                     relative_error(out.float(), base_out.float()))

    def compile_warm_start(self, px: int, b: int) -> None:
        """Child process: compile (from the disk caches) and capture one shape."""
        latent = px // 8
        built = time.perf_counter() - self.started
        pred = self.compiled_predictor(1)
        t0 = time.perf_counter()
        if isinstance(pred, GraphPredictor):
            pred.warmup((2 * b, 13, FRAMES, latent, latent), (2 * b * FRAMES, 50, 384))
        else:
            self.loop(pred, b, latent, steps=1, reps=1)
        sync()
        print(f"warm start: model built {built:.1f} s (imports excluded), B={b} compiled from"
              f" the caches and captured in {time.perf_counter() - t0:.1f} s", flush=True)

    def profile(self, px: int, b: int) -> None:
        """Where one eager UNet call spends GPU time: the top kernels, to a text file."""
        latent = px // 8
        noise, conditions, audio = chunk_inputs(b, latent, self.device, self.dtype)
        x = torch.cat([torch.cat([noise, noise]), conditions], dim=1)
        with torch.inference_mode():
            for _ in range(2):
                self.unet(x, 500, audio)
            sync()
            with torch.profiler.profile() as prof:
                self.unet(x, 500, audio)
                sync()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
        Path(self.args.profile_out).write_text(f"{px}px B={b} one eager UNet call\n{table}\n")
        log(table[:6000])

    def aot_warm_start(self, px: int, b: int) -> None:
        """Child process: load the stored artifact, capture B's graphs, first call."""
        latent = px // 8
        sample_shape = (2 * b, 13, FRAMES, latent, latent)
        audio_shape = (2 * b * FRAMES, 50, 384)
        built = time.perf_counter() - self.started
        pred = self.aot_predictor(b)
        t0 = time.perf_counter()
        if isinstance(pred, AotPredictor):
            pred.warmup(sample_shape, audio_shape)
        ready = time.perf_counter() - t0
        loads = pred.loads if isinstance(pred, AotPredictor) else []
        noise, conditions, audio = chunk_inputs(b, latent, self.device, self.dtype)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pred(torch.cat([torch.cat([noise, noise]), conditions], dim=1), 500, audio)
        sync()
        first = time.perf_counter() - t0
        how = ", ".join(f"{load.kind} {'compiled' if load.compiled_now else 'loaded'} in"
                        f" {load.seconds:.2f} s ({stages_text(load)})" for load in loads
                        ) or "no artifact (CPU)"
        print(
            f"warm start: model built {built:.1f} s (imports excluded), {how}; B={b} graphs"
            f" captured, ready after {ready:.1f} s; first UNet call {1000 * first:.0f} ms",
            flush=True,
        )

    # ---------------------------------------------------------------- report

    def markdown(self) -> str:
        header = [
            "row",
            "px",
            "B chunks",
            "steps",
            "ms / batch",
            "fps",
            "ms / step",
            "rel. L2 vs exact",
            "GPU mem GiB",
        ]
        lines = [
            f"# LatentSync UNet benchmark: {self.card}",
            "",
            f"Machine: {describe()}; torch {torch.__version__}; {self.dtype}; random weights;"
            f" 16-frame chunks, CFG (UNet batch 2B), guidance {GUIDANCE}.",
            f"UNet weights: {self.weights_gib:.2f} GiB, VAE {self.vae_gib:.2f} GiB. Memory column:"
            " eager rows peak allocated; graph rows memory held after capture (UNet and VAE"
            " weights + graph pool + static inputs). Both include UNet + VAE weights.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        if self.skipped:
            lines += ["", f"Skipped (time budget): {', '.join(self.skipped)}"]
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        text = self.markdown()
        for path in self.args.out:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


# name -> (Inductor options, FP8 linear layers). Options follow PyTorch's published
# recipe for diffusion UNets (freezing folds the weights into the graph so convolution
# weights get the activations' layout once; 1x1 convolutions become matmuls;
# coordinate descent tunes the generated kernels' block sizes).
TUNED: dict[str, Any] = {"freezing": True, "conv_1x1_as_mm": True,
                         "coordinate_descent_tuning": True}
TUNE_VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "default": ({}, False),
    "freezing": ({"freezing": True}, False),
    "tuned": (TUNED, False),
    "fp8": ({}, True),
    "tuned+fp8": (TUNED, True),
    "autotune": ({**TUNED, "max_autotune": True, "triton.cudagraphs": False}, False),
    "autotune+fp8": ({**TUNED, "max_autotune": True, "triton.cudagraphs": False}, True),
}
KERNEL_KINDS = (  # first match wins, on the lower-cased kernel name
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("fp8 gemm", ("e4m3", "f8", "fp8")),
    ("convolution", ("conv", "implicit_gemm", "xmma_fprop", "sm90_xmma_fprop", "dgrad",
                     "wgrad", "fprop")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "mm_", "triton_tem")),
    ("triton fused", ("triton",)),
    ("layout / copy", ("copy", "transpose", "nchw", "nhwc", "elementwise", "memcpy",
                       "memset")),
)


def kernel_breakdown(fn: Callable[..., Any], sample_shape: tuple[int, ...],
                     audio_shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """GPU time of one call by kernel kind, and its top kernels (a compact string)."""
    sample = torch.randn(sample_shape, device="cuda", dtype=dtype)
    audio = torch.randn(audio_shape, device="cuda", dtype=dtype)
    t = torch.full((1,), 500, device="cuda", dtype=torch.long)
    with torch.inference_mode():
        fn(sample, t, audio)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(sample, t, audio)
            sync()
    kinds: dict[str, float] = {}
    kernels: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        us = float(getattr(ev, "self_device_time_total", 0.0))
        if us <= 0:
            continue
        name = ev.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
        kernels.append((us, ev.key[:60]))
    total = sum(kinds.values())
    parts = ", ".join(f"{k} {v / 1000:.1f} ms ({100 * v / total:.0f}%)"
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    top = "; ".join(f"{n} {us / 1000:.1f}" for us, n in sorted(kernels, reverse=True)[:8])
    return f"total {total / 1000:.1f} ms: {parts}. Top: {top}"


def fmt_mem(mem: dict[str, float], key: str) -> str:
    return f"{mem[key]:.2f}" if key in mem else ""


def timed_ms(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def read_config(args: argparse.Namespace) -> UNetConfig:
    raw = json.loads(Path(args.config).read_text())
    return UNetConfig.from_dict(raw.get("config", raw))  # a manifest or a bare config


def card_slug(name: str) -> str:
    found = re.search(r"[hab]\d{3}", name.lower())
    return found.group(0) if found else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default="../shared/manifests/latentsync_unet_stage2.json")
    parser.add_argument("--out", nargs="*", default=[], help="markdown files to write")
    parser.add_argument("--reps", type=int, default=2, help="timed loops per row (median)")
    parser.add_argument("--budget-s", type=float, default=480, help="skip rows after this")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: smoke-test the script")
    parser.add_argument(
        "--sections", default="all", help="comma-separated; 'aot' is never in 'all'"
    )
    parser.add_argument("--aot-dir", type=Path, default=Path(".cache/aoti"))
    parser.add_argument("--aot-batch", type=int, default=8,
                        help="chunks of the largest AOT-compiled call (its batch is symbolic)")
    parser.add_argument("--profile-out", default="latentsync_profile.txt")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode for the 'compile' section")
    parser.add_argument("--compile-batches", default="1,8", help="chunks per compiled call")
    parser.add_argument("--compile-batch", type=int, default=1, help="compilewarm's batch")
    parser.add_argument("--tune-batch", type=int, default=8, help="chunks per call, 'tune'")
    parser.add_argument("--tune-variants", default="default,tuned,fp8,tuned+fp8",
                        help=f"comma-separated, of: {', '.join(TUNE_VARIANTS)}")
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="a dynamic batch (the server's setting): one predictor"
                        " for every batch size, one compile")
    parser.add_argument("--compile-renderer", action="store_true",
                        help="compile as the renderer does: the guided forward (the pair's"
                        " shared part once) and its kernel choices (the Triton frame"
                        " attention where available)")
    args = parser.parse_args()
    if args.tiny:  # a CPU smoke run: 4-frame chunks, one thread (a busy shared machine)
        global FRAMES
        FRAMES = 4
        torch.set_num_threads(1)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))
    bench = Bench(args)
    log(f"{bench.card}: weights {bench.weights_gib:.2f} GiB")
    small, large = (128, 256) if args.tiny else (256, 512)
    sections = args.sections.split(",") if args.sections != "all" else ["all"]

    def want(name: str) -> bool:
        optional = name.startswith(("aot", "compile")) or name in ("profile", "tune",
                                                                    "choices")
        return name in sections or ("all" in sections and not optional)

    steps: list[tuple[str, Callable[[], None]]] = [
        ("throughput", lambda: bench.throughput(small, [1, 2, 4, 8], [2, 4, 8])),
        ("approx", lambda: bench.approximations(small, [1, 8])),
        ("kernels", lambda: bench.kernels(small, 8)),
        ("vae", lambda: bench.vae_and_overlap(small, 8)),
        ("latency", lambda: bench.first_chunk(small)),
        ("throughput512", lambda: bench.throughput(large, [1, 2, 4], [])),
        ("approx512", lambda: bench.approximations(large, [1, 4])),
        ("profile", lambda: bench.profile(small, 1)),
        ("aot", lambda: bench.aot(small, args.aot_batch)),
        ("aotwarm", lambda: bench.aot_warm_start(small, args.aot_batch)),
        ("compile", lambda: bench.compile_section(
            small, [int(x) for x in args.compile_batches.split(",")])),
        ("compilewarm", lambda: bench.compile_warm_start(small, args.compile_batch)),
        ("tune", lambda: bench.tune(small, args.tune_batch, args.tune_variants.split(","))),
        ("choices", lambda: bench.choices(small, args.tune_batch)),
    ]
    for name, run in steps:
        if not want(name):
            continue
        if not bench.time_left():
            bench.skipped.append(name)
            continue
        log(f"section {name}")
        run()
        bench.save()
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
    bench.save()
    print(bench.markdown())
    slug = card_slug(bench.card)
    log(f"card slug {slug}; {time.perf_counter() - bench.started:.0f} s; pid {os.getpid()}")
    assert math.isfinite(bench.weights_gib)


if __name__ == "__main__":
    main()
