"""The VAE decode (SD's `sd-vae-ft-mse` decoder, latents -> 256 px face crops) by layout and
execution: what a turn's first frame waits for after the UNet, and 12 % of a one-chunk
render's device time.

Random weights at full size (cost does not depend on their values), fp16, latents of
32 x 32 (256 px crops). Per variant and frame count, the median of `--reps` timed calls
(CUDA events, after warm-up calls), TFLOP/s from torch's FLOP counter, and the output's
relative L2 difference from the `default` row of the same size:
- `default`: the decoder as diffusers builds it (contiguous NCHW activations);
- `cl`: channels-last weights and input (cuDNN's NHWC convolutions without layout
  conversions around each);
- `compiled`, `cl+compiled`: `torch.compile` (Inductor, static shapes: one compile per
  frame count, so only `--compiled-frames` are measured);
- any of them `+graph`: replayed as a CUDA graph captured per frame count
  (`media.latentsync.graphs.StaticGraph`, as the renderer does).

    python -m bench.vae_decode --out out/vae_decode           # CUDA machine
    python -m bench.vae_decode --tiny --out out/vae_dry      # CPU dry run (tiny decoder)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

from bench.machine import describe
from media.latentsync.graphs import StaticGraph
from media.latentsync.vae import PACKAGED_CONFIG, SCALING_FACTOR

Decode = Callable[[torch.Tensor], torch.Tensor]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_vae(tiny: bool, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    raw = json.loads(PACKAGED_CONFIG.read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if tiny:
        raw |= {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
                "norm_num_groups": 4, "sample_size": 64}
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL.from_config(raw)  # type: ignore[no-untyped-call]
    out: AutoencoderKL = vae.to(dtype).eval().requires_grad_(False)
    return out


def variant(vae: AutoencoderKL, name: str) -> tuple[Decode, bool]:
    """The decode function of a variant, and whether it wants channels-last input."""
    parts = set(name.split("+"))
    cl = "cl" in parts
    fmt = torch.channels_last if cl else torch.contiguous_format
    vae.post_quant_conv.to(memory_format=fmt)
    vae.decoder.to(memory_format=fmt)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = vae.decode(latents / SCALING_FACTOR).sample
        return out

    if "compiled" in parts:
        return torch.compile(decode, dynamic=False), cl  # type: ignore[return-value]
    return decode, cl


def time_calls(fn: Decode, latents: torch.Tensor, reps: int, cuda: bool) -> list[float]:
    for _ in range(3):
        fn(latents)
    out = []
    for _ in range(reps):
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            begin.record()
            fn(latents)
            end.record()
            end.synchronize()
            out.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(latents)
            out.append(1000 * (time.perf_counter() - t0))
    return out


@torch.inference_mode()
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny decoder on the CPU")
    p.add_argument("--out", type=Path, default=Path("out/vae_decode"))
    p.add_argument("--variants", default="default,cl,default+graph,cl+graph,compiled,"
                   "cl+compiled+graph")
    p.add_argument("--frames", default="1,2,4,16,32")
    p.add_argument("--compiled-frames", default="1,16")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    cuda = not args.tiny and torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    vae = build_vae(args.tiny, device, dtype)
    side = 8 if args.tiny else 32
    card = torch.cuda.get_device_name(0) if cuda else "CPU (tiny dry run)"
    frames = [int(n) for n in args.frames.split(",")]
    compiled_frames = {int(n) for n in args.compiled_frames.split(",")}
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {n: torch.randn((n, 4, side, side), generator=gen).to(device, dtype)
              for n in frames}
    flops = {}
    for n in frames:
        counter = FlopCounterMode(display=False)
        with counter:
            vae.decode(inputs[n] / SCALING_FACTOR)
        flops[n] = counter.get_total_flops()
    reference: dict[int, torch.Tensor] = {}
    rows: list[list[str]] = []
    for name in args.variants.split(","):
        fn, cl = variant(vae, name)
        for n in frames:
            if "compiled" in name and n not in compiled_frames:
                continue
            if "graph" in name and not cuda:
                continue
            x = inputs[n].contiguous(memory_format=torch.channels_last) if cl else inputs[n]
            t0 = time.perf_counter()
            run = StaticGraph(fn, x) if "graph" in name.split("+") else fn
            ms = time_calls(run, x, args.reps, cuda)
            ready = time.perf_counter() - t0
            out = run(x).float()
            if name == "default":
                reference[n] = out.clone()
            rel = ""
            if n in reference and name != "default":
                ref = reference[n]
                rel = f"{float((out - ref).norm() / ref.norm()):.2e}"
            med = statistics.median(ms)
            rows.append([name, str(n), f"{med:.2f}", f"{min(ms):.2f}", f"{med / n:.2f}",
                         f"{flops[n] / med / 1e9:.0f}", rel, f"{ready:.1f}"])
            log(" | ".join(rows[-1]))
    header = ["variant", "frames", "median ms", "min ms", "ms / frame", "TFLOP/s",
              "rel. L2 vs default", "first call + timing s"]
    text = (f"# VAE decode, 256 px crops: {card}\n\nMachine: {describe()}; torch"
            f" {torch.__version__}; {str(dtype)[6:]}; random weights; {args.reps} timed"
            f" calls each.\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header)
            + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_decode.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
