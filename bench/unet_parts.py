"""Where one exact LatentSync UNet call spends GPU time, part by part, and what the
execution choices of `UNet3DConditionModel.set_kernels` change: channels-last
activations and weights, the motion modules' attention as two matmuls instead of a
fused SDPA kernel, cuDNN autotuning. Each choice leaves the math unchanged; every row
gives its relative L2 difference against the default in the same run.

    python3 bench/unet_parts.py --config media/latentsync/configs/stage2.json --batch 8 \
        --sections parts,whole,compiled --out out/parts.md

Sections:
- `parts`: the UNet's residual parts (resnets, spatial transformers, motion modules,
  down/upsamplers) with the input shapes one call gives them, each timed alone as a
  replayed CUDA graph, times its count in a call: the sum is close to one call's GPU time.
- `whole`: the exact 20-step DDIM loop of B chunks under CUDA graphs (no compiling),
  one row per choice.
- `compiled`: the same loop compiled (`torch.compile`, static shapes, CUDA graphs) per
  `--compiled-variants`, with each variant's cold compile time and GPU-time split by
  kernel kind.
- `geglu`: each feed-forward GEGLU projection of one call alone: Inductor's compiled form
  (library GEMM, then the gating kernel) against the fused kernel (`geglu.geglu_linear`).
- `convs`: each convolution of one call alone, cuDNN's heuristic against autotuning.

A variant name is a key of VARIANTS; "+cfg" after it runs the UNet's guided forward
(the guidance pair's shared part once, the silent half's cross-attention as its bias).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latentsync_bench import (  # noqa: E402
    FRAMES,
    build_unet,
    chunk_inputs,
    kernel_breakdown,
    read_config,
)
from bench.machine import describe  # noqa: E402
from media.latentsync.accel import (  # noqa: E402
    CompiledPredictor,
    GraphPredictor,
    NoisePredictor,
    UNetPredictor,
    denoise,
    make_scheduler,
)
from media.latentsync.layers import frames_to_batch  # noqa: E402
from media.latentsync.motion import MotionModule  # noqa: E402
from media.latentsync.unet import UNet3DConditionModel  # noqa: E402
from media.latentsync.unet_blocks import ResnetBlock3D, SpatialTransformer  # noqa: E402
from media.latentsync.verify import relative_error  # noqa: E402

PART_TYPES = (ResnetBlock3D, SpatialTransformer, MotionModule)
# Variant name -> set_kernels arguments and cudnn.benchmark.
# The renderer's compiled kernels (session 11 on): channels-last, the Triton frames'
# attention, packed q/k/v projections, the timestep table.
SERVER_KERNELS: dict[str, Any] = {"channels_last": True, "temporal_attention": "triton",
                                  "packed_qkv": True, "timestep_table": True}
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "default": ({"channels_last": False, "temporal_attention": "sdpa", "pointwise_linear": False,
                 "packed_qkv": False, "padded_convs": False, "fused_geglu": False,
                 "timestep_table": False}, False),
    "cl": ({"channels_last": True, "temporal_attention": "sdpa"}, False),
    "math": ({"channels_last": False, "temporal_attention": "math"}, False),
    "cl+math": ({"channels_last": True, "temporal_attention": "math"}, False),
    "cl+math+bench": ({"channels_last": True, "temporal_attention": "math"}, True),
    "bench": ({"channels_last": False, "temporal_attention": "sdpa"}, True),
    "cl+inline": ({"channels_last": True, "temporal_attention": "inline"}, False),
    "cl+inline+bench": ({"channels_last": True, "temporal_attention": "inline"}, True),
    "inline": ({"channels_last": False, "temporal_attention": "inline"}, False),
    "cl+math+mm": ({"channels_last": True, "temporal_attention": "math"}, False),
    "cl+math+tuned": ({"channels_last": True, "temporal_attention": "math"}, False),
    "math+mm": ({"channels_last": False, "temporal_attention": "math"}, False),
    "cl+triton": ({"channels_last": True, "temporal_attention": "triton"}, False),
    "triton": ({"channels_last": False, "temporal_attention": "triton"}, False),
    "cl+triton+autotune": ({"channels_last": True, "temporal_attention": "triton"}, False),
    "cl+triton+autoconv": ({"channels_last": True, "temporal_attention": "triton"}, False),
    # session 9: 1x1 convolutions as GEMMs, packed q/k/v projections, padded thin convs
    "cl+triton+lin": ({"channels_last": True, "temporal_attention": "triton",
                       "pointwise_linear": True}, False),
    "cl+triton+qkv": ({"channels_last": True, "temporal_attention": "triton",
                       "packed_qkv": True}, False),
    "cl+triton+pad": ({"channels_last": True, "temporal_attention": "triton",
                       "padded_convs": True}, False),
    "cl+triton+all": ({"channels_last": True, "temporal_attention": "triton",
                       "pointwise_linear": True, "packed_qkv": True, "padded_convs": True},
                      False),
    "cl+triton+geglu": ({"channels_last": True, "temporal_attention": "triton",
                         "fused_geglu": True}, False),
    "cl+triton+qkv+pad+geglu": ({"channels_last": True, "temporal_attention": "triton",
                                 "packed_qkv": True, "padded_convs": True,
                                 "fused_geglu": True}, False),
    "cl+math+qkv+pad+geglu": ({"channels_last": True, "temporal_attention": "math",
                               "packed_qkv": True, "padded_convs": True, "fused_geglu": True},
                              False),
    "cl+math+all": ({"channels_last": True, "temporal_attention": "math",
                     "pointwise_linear": True, "packed_qkv": True, "padded_convs": True},
                    False),
    # session 10: the server's kernels with Inductor options (INDUCTOR_OPTIONS)
    "cl+triton+qkv+cdt": ({"channels_last": True, "temporal_attention": "triton",
                           "packed_qkv": True}, False),
    "cl+triton+qkv+combo": ({"channels_last": True, "temporal_attention": "triton",
                             "packed_qkv": True}, False),
    "cl+triton+qkv+bfuse": ({"channels_last": True, "temporal_attention": "triton",
                             "packed_qkv": True}, False),
    # session 11: every resnet's time projection gathered from a table (one kernel)
    "cl+triton+qkv+ttab": (SERVER_KERNELS, False),
    # session 13: the same with programmatic dependent launch for the generated kernels
    # (INDUCTOR_OPTIONS), and with cudnn.benchmark (convolutions measured at this batch)
    "cl+triton+qkv+ttab+pdl": (SERVER_KERNELS, False),
    "cl+triton+qkv+ttab+bench": (SERVER_KERNELS, True),
}
# Compiled variants whose name ends so also get these Inductor options.
INDUCTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "mm": {"conv_1x1_as_mm": True},
    "tuned": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
    # Inductor's own GEMM templates benchmarked against cuBLAS, with their epilogues
    # (bias, GELU, residual adds) fused in; convolutions stay cuDNN's.
    "autotune": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                 "max_autotune_conv_backends": "ATEN"},
    # The same, with Triton's convolution templates in the contest too.
    "autoconv": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                 "max_autotune_conv_backends": "ATEN,TRITON"},
    # The generated (glue) kernels' launch sizes tuned by measurement.
    "cdt": {"coordinate_descent_tuning": True},
    # Independent small kernels launched as one (fewer launches between library calls).
    "combo": {"combo_kernels": True},
    # Fusion decisions measured instead of guessed.
    "bfuse": {"benchmark_fusion": True},
    # Programmatic dependent launch (Hopper): a generated kernel starts while the one
    # before it finishes and waits on chip for its inputs (gdc_wait), hiding launch gaps.
    "pdl": {"triton.enable_pdl": True},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def variant(unet: UNet3DConditionModel, name: str) -> Iterator[None]:
    kwargs, benchmark = VARIANTS[name]
    unet.set_kernels(**kwargs)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
        unet.set_kernels(**VARIANTS["default"][0])


def graph_ms(fn: Callable[[], object], replays: int = 10) -> float:
    """Median ms of one replay of `fn` captured into a CUDA graph (eager on CPU)."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()  # type: ignore[no-untyped-call]
        graph.replay()
        end.record()  # type: ignore[no-untyped-call]
        end.synchronize()  # type: ignore[no-untyped-call]
        times.append(start.elapsed_time(end))  # type: ignore[no-untyped-call]
    del graph
    return statistics.median(times)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.card = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.started = time.perf_counter()
        self.unet = build_unet(read_config(args), self.device, self.dtype)
        self.b = args.batch
        self.latent = args.px // 8
        self.sections: list[str] = []

    def time_left(self) -> bool:
        return time.perf_counter() - self.started < self.args.budget_s

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return chunk_inputs(self.b, self.latent, self.device, self.dtype)

    # ------------------------------------------------------------------ parts

    def capture_parts(self) -> dict[tuple[str, tuple[Any, ...]], tuple[int, nn.Module, tuple]]:
        """(class, input shapes) -> (count in one call, a module, its first inputs)."""
        found: dict[tuple[str, tuple[Any, ...]], tuple[int, nn.Module, tuple]] = {}

        def hook(module: nn.Module, args: tuple) -> None:
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            key = (type(module).__name__, shapes)
            count, first, first_args = found.get(key, (0, module, args))
            if count == 0:
                first_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            found[key] = (count + 1, first, first_args)

        self.call_with_hook(PART_TYPES, hook)
        return found

    def call_with_hook(self, types: tuple[type, ...], hook: Callable[..., None]) -> None:
        """One exact UNet call with `hook` as forward pre-hook of every module of `types`."""
        handles = [module.register_forward_pre_hook(hook) for module in self.unet.modules()
                   if isinstance(module, types)]
        noise, conditions, audio = self.inputs()
        try:
            with torch.inference_mode():
                self.unet(torch.cat([torch.cat([noise, noise]), conditions], dim=1), 500, audio)
        finally:
            for handle in handles:
                handle.remove()

    def parts(self) -> None:
        names = self.args.part_variants.split(",")
        found = self.capture_parts()
        header = ["part", "input", "count"] + [f"{n} ms (x count)" for n in names]
        rows: list[list[str]] = []
        totals = {n: 0.0 for n in names}
        by_class: dict[tuple[str, str], float] = {}
        with torch.inference_mode():
            for (cls, shapes), (count, module, args) in found.items():
                cells = [cls, "x".join(map(str, shapes[0])), str(count)]
                default_ms = 0.0
                for name in names:
                    if name == "math" and cls != "MotionModule" and "default" in names:
                        ms = default_ms  # the same computation as the default
                        totals[name] += ms * count
                        by_class[(cls, name)] = by_class.get((cls, name), 0.0) + ms * count
                        cells.append("=")
                        continue
                    with variant(self.unet, name):
                        fmt = torch.channels_last_3d if "cl" in name else torch.contiguous_format
                        call_args = tuple(
                            a.contiguous(memory_format=fmt)
                            if isinstance(a, torch.Tensor) and a.dim() == 5 else a
                            for a in args
                        )
                        ms = graph_ms(lambda m=module, a=call_args: m(*a))
                    totals[name] += ms * count
                    by_class[(cls, name)] = by_class.get((cls, name), 0.0) + ms * count
                    cells.append(f"{ms:.2f} ({ms * count:.1f})")
                    if name == "default":
                        default_ms = ms
                rows.append(cells)
                log(" | ".join(cells))
        rows.append(["**sum**", "", ""] + [f"{totals[n]:.1f}" for n in names])
        for cls in sorted({c for c, _ in by_class}):
            rows.append([f"all {cls}", "", ""]
                        + [f"{by_class[(cls, n)]:.1f}" if (cls, n) in by_class else ""
                           for n in names])
        self.sections.append(
            f"## Parts of one UNet call ({self.args.px} px, B = {self.b} chunks: UNet batch"
            f" {2 * self.b}), each part alone as a replayed CUDA graph\n\n"
            + table(header, rows)
            + "\nVariants: " + "; ".join(f"`{n}` = {VARIANTS[n][0]}, cudnn.benchmark"
                                         f" {VARIANTS[n][1]}" for n in names) + "\n"
        )
        self.save()

    def convs(self) -> None:
        """Every 2D convolution of one call (channels-last, as Inductor runs them), alone:
        cuDNN's heuristic choice against its autotuned one (cudnn.benchmark)."""
        found: dict[tuple[Any, ...], list[Any]] = {}

        def hook(module: nn.Module, args: tuple) -> None:
            assert isinstance(module, nn.Conv2d)
            x = args[0] if args[0].dim() == 4 else frames_to_batch(args[0])  # FrameConv2d
            key = (tuple(x.shape), tuple(module.weight.shape), module.stride)
            entry = found.setdefault(key, [0, module, x.clone()])
            entry[0] += 1

        self.call_with_hook((nn.Conv2d,), hook)
        header = ["input", "weight", "stride", "count", "TFLOP", "heuristic ms",
                  "TFLOP/s", "autotuned ms", "TFLOP/s"]
        rows = []
        totals = [0.0, 0.0, 0.0]
        before = torch.backends.cudnn.benchmark
        with torch.inference_mode():
            for (shape, wshape, stride), (count, module, x) in sorted(
                    found.items(), key=lambda kv: -kv[1][0] * math.prod(kv[0][1])):
                x = x.contiguous(memory_format=torch.channels_last)
                w = module.weight.detach().contiguous(memory_format=torch.channels_last)
                out_hw = (shape[2] // stride[0]) * (shape[3] // stride[1])
                tflop = 2 * shape[0] * out_hw * math.prod(wshape) / 1e12
                cells = ["x".join(map(str, shape)), "x".join(map(str, wshape)),
                         str(stride[0]), str(count), f"{tflop:.3f}"]
                for i, benchmark in enumerate((False, True)):
                    torch.backends.cudnn.benchmark = benchmark
                    ms = graph_ms(lambda m=module, x=x, w=w: torch.nn.functional.conv2d(
                        x, w, m.bias, m.stride, m.padding))
                    totals[i] += ms * count
                    cells += [f"{ms:.3f}", f"{tflop / ms * 1e3:.0f}"]
                totals[2] += tflop * count
                rows.append(cells)
                log(" | ".join(cells))
        torch.backends.cudnn.benchmark = before
        rows.append(["**all, x count**", "", "", "", f"{totals[2]:.2f}", f"{totals[0]:.1f}",
                     f"{totals[2] / totals[0] * 1e3:.0f}", f"{totals[1]:.1f}",
                     f"{totals[2] / totals[1] * 1e3:.0f}"])
        self.sections.append(
            f"## Convolutions of one UNet call ({self.args.px} px, B = {self.b}), channels-last"
            " fp16, each alone as a replayed CUDA graph\n\n" + table(header, rows))
        self.save()

    def geglu(self) -> None:
        """Every feed-forward GEGLU projection of one call (input shapes as the UNet gives
        them), alone as a replayed CUDA graph: Inductor's compiled form (the library GEMM,
        then a fused gating kernel) against the one-kernel `geglu.geglu_linear`."""
        from diffusers.models.attention import FeedForward

        from media.latentsync import geglu

        found: dict[tuple[int, ...], list[Any]] = {}

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            entry = found.setdefault(tuple(x.shape), [0, module, x.clone()])
            entry[0] += 1

        self.call_with_hook((FeedForward,), hook)
        header = ["tokens x width", "count", "TFLOP", "compiled GEMM + gating ms", "TFLOP/s",
                  "fused ms", "TFLOP/s", "saved ms (x count)", "rel. L2"]
        rows = []
        saved = 0.0
        with torch.inference_mode():
            for shape, (count, ff, x) in sorted(found.items(), key=lambda kv: -kv[1][0]):
                proj = ff.net[0].proj
                tokens = math.prod(shape[:-1])
                tflop = 2 * tokens * proj.weight.shape[0] * proj.weight.shape[1] / 1e12
                library = torch.compile(ff.net[0])
                ms_lib = graph_ms(lambda f=library, x=x: f(x))
                torch._dynamo.reset()
                if geglu.AVAILABLE:
                    ms_fused = graph_ms(lambda p=proj, x=x: geglu.geglu_linear(x, p.weight, p.bias))
                    diff = relative_error(geglu.geglu_linear(x, proj.weight, proj.bias).float(),
                                          ff.net[0](x).float())
                else:
                    ms_fused, diff = float("nan"), float("nan")
                saved += (ms_lib - ms_fused) * count
                cells = [f"{tokens}x{shape[-1]}", str(count), f"{tflop:.3f}", f"{ms_lib:.3f}",
                         f"{tflop / ms_lib * 1e3:.0f}", f"{ms_fused:.3f}",
                         f"{tflop / ms_fused * 1e3:.0f}",
                         f"{(ms_lib - ms_fused) * count:.2f}", f"{diff:.1e}"]
                rows.append(cells)
                log(" | ".join(cells))
        rows.append(["**all**", "", "", "", "", "", "", f"{saved:.1f}", ""])
        chosen = ""
        if geglu.AVAILABLE:
            cache = getattr(geglu._geglu_kernel, "cache", {})
            chosen = "\nAutotuned tiles (key: M, N, K, ...): " + "; ".join(
                f"{key[:3]}: {cfg}" for key, cfg in cache.items()) + "\n"
        self.sections.append(
            f"## Feed-forward GEGLU projections of one UNet call ({self.args.px} px, B ="
            f" {self.b}), each alone as a replayed CUDA graph\n\n" + table(header, rows)
            + chosen)
        self.save()

    # ------------------------------------------------------------------ loops

    def loop(self, predictor: NoisePredictor, reps: int = 2) -> tuple[float, torch.Tensor]:
        noise, conditions, audio = self.inputs()
        with torch.inference_mode():
            denoise(predictor, make_scheduler(), noise, conditions, audio, steps=2)
            times, out = [], noise
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                out = denoise(predictor, make_scheduler(), noise, conditions, audio,
                              steps=self.args.steps)
                sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def whole(self, compiled: bool) -> None:
        what = "compiled" if compiled else "graphs"
        names = (self.args.compiled_variants if compiled else self.args.whole_variants).split(",")
        header = ["variant", "ms / loop", "fps", "ms / step", "rel. L2 vs default",
                  "cold start s"]
        rows: list[list[str]] = []
        base: torch.Tensor | None = None
        notes: list[str] = []
        for name in names:
            if not self.time_left():
                notes.append(f"{name}: not run (budget)")
                continue
            try:
                row, note = self._whole_row(name, compiled, base)
            except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not the end
                notes.append(f"{name}: failed: {type(exc).__name__}: {str(exc)[:400]}")
                log(notes[-1])
                gc.collect()
                torch.cuda.empty_cache() if self.cuda else None
                continue
            if note:
                notes.append(note)
            if base is None:
                base = row.pop()
            else:
                row.pop()
            rows.append(row)
            log(" | ".join(rows[-1]))
            self.save(extra=(what, header, rows, notes))
        self.sections.append(self._loop_section(what, header, rows, notes))
        self.save()

    def _whole_row(self, name: str, compiled: bool, base: torch.Tensor | None
                   ) -> tuple[list[Any], str]:
        """One variant's row cells (and its output last), and its kernel note."""
        note = ""
        # "+cfg": the UNet's guided forward (the guidance pair's shared part once)
        guided = name.endswith("+cfg")
        kernels = name.removesuffix("+cfg")
        with variant(self.unet, kernels):
            torch._dynamo.reset()
            pred: NoisePredictor
            if not self.cuda:
                pred = UNetPredictor(self.unet, guided=guided)
            elif compiled:
                options = INDUCTOR_OPTIONS.get(kernels.rsplit("+", 1)[-1])
                pred = CompiledPredictor(self.unet, dynamic=False, options=options,
                                         kernels=None, guided=guided)
            else:
                pred = GraphPredictor(self.unet, guided=guided)
            shape = (2 * self.b, 13, FRAMES, self.latent, self.latent)
            audio_shape = (2 * self.b * FRAMES, 50, 384)
            t0 = time.perf_counter()
            if isinstance(pred, GraphPredictor):
                pred.warmup(shape, audio_shape)
            cold = time.perf_counter() - t0
            seconds, out = self.loop(pred)
            if isinstance(pred, CompiledPredictor):
                compiled_pred = pred

                def forward(sample: torch.Tensor, t: torch.Tensor,
                            audio: torch.Tensor) -> torch.Tensor:
                    return compiled_pred._forward(sample, t, audio, None, refresh=True)

                note = f"{name}: " + kernel_breakdown(forward, shape, audio_shape, self.dtype)
                log(note)
        diff = "" if base is None else f"{relative_error(out.float(), base.float()):.2e}"
        fps = FRAMES * self.b / seconds
        row: list[Any] = [name, f"{1000 * seconds:.0f}", f"{fps:.1f}",
                          f"{1000 * seconds / self.args.steps:.1f}", diff, f"{cold:.1f}", out]
        del pred
        gc.collect()
        torch.cuda.empty_cache() if self.cuda else None
        return row, note

    def _loop_section(self, what: str, header: list[str], rows: list[list[str]],
                      notes: list[str]) -> str:
        return (f"## Exact loop ({self.args.steps} DDIM steps, CFG) of B = {self.b} chunks at"
                f" {self.args.px} px, {what}\n\n" + table(header, rows)
                + "".join(f"\n- {n}" for n in notes) + "\n")

    # ------------------------------------------------------------------ report

    def save(self, extra: tuple[str, list[str], list[list[str]], list[str]] | None = None
             ) -> None:
        parts = list(self.sections)
        if extra is not None:
            parts.append(self._loop_section(*extra))
        versions = f"torch {torch.__version__}"
        text = (f"# UNet parts and execution choices: {self.card}\n\nMachine: {describe()};"
                f" {versions}; {self.dtype}; random weights; 16-frame chunks.\n\n"
                + "\n".join(parts))
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(text)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="UNet config or manifest JSON")
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="chunks per UNet call (CFG doubles)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sections", default="parts,whole")
    p.add_argument("--part-variants", default="default,cl,math,cl+math,bench")
    p.add_argument("--whole-variants", default="default,cl,math,cl+math")
    p.add_argument("--compiled-variants", default="default,cl+math")
    p.add_argument("--budget-s", type=float, default=500)
    p.add_argument("--out", default="out/unet_parts.md")
    args = p.parse_args()
    study = Study(args)
    log(f"{study.card}: UNet built")
    for section in args.sections.split(","):
        if section == "parts":
            study.parts()
        elif section == "convs":
            study.convs()
        elif section == "whole":
            study.whole(compiled=False)
        elif section == "compiled":
            study.whole(compiled=True)
        elif section == "geglu":
            study.geglu()
        else:
            raise SystemExit(
                f"unknown section {section!r} (parts, convs, geglu, whole, compiled)")
    log(f"done; table in {args.out}")


if __name__ == "__main__":
    main()
