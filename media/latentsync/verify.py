"""Faithfulness check of our UNet against golden reference outputs.

Golden file (`tiny_unet_io.safetensors`): `sample` (B, 13, F, H, W), `audio`
(B*F, 50, 384), `timestep` (1,) and `expected` (B, 4, F, H, W), the reference
implementation's float32 CPU output. Faithful: relative L2 error below 1e-4.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from agent.errors import ConfigError
from media.latentsync.checkpoint import load_unet
from media.latentsync.config import UNetConfig

FAITHFUL_RELATIVE_ERROR = 1e-4
IO_KEYS = ("sample", "audio", "timestep", "expected")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (L2 over all elements, in float64)."""
    diff = actual.double() - expected.double()
    return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(expected.double()))


def verify_unet(
    config_path: Path,
    weights_path: Path,
    io_path: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Load the UNet strictly, run the golden input, return the relative error vs `expected`."""
    io = load_file(io_path)
    absent = [k for k in IO_KEYS if k not in io]
    if absent:
        raise ConfigError(f"{io_path}: golden file lacks {absent}")
    model = load_unet(UNetConfig.from_json(config_path), weights_path, device, dtype)
    # cuDNN's default TF32 convolutions alone put float32 CUDA results at ~3e-4: off here.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.inference_mode():
        out = model(
            io["sample"].to(device, dtype),
            io["timestep"].to(device),
            io["audio"].to(device, dtype),
        )
    return relative_error(out.float().cpu(), io["expected"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--io", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    try:
        error = verify_unet(args.config, args.weights, args.io, device=args.device, dtype=dtype)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    print(f"relative_error={error:.3e}")
    return 0 if error < FAITHFUL_RELATIVE_ERROR else 1


if __name__ == "__main__":
    raise SystemExit(main())
