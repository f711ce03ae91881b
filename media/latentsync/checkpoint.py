"""Loading LatentSync UNet weights: strict names and shapes, concise errors.

Two formats:
- `latentsync_unet.pt`: `torch.save({"global_step": int, "state_dict": {...}})`,
  read with `weights_only=True` (no pickled code runs) and memory-mapped;
- `.safetensors`: a flat name -> tensor file (our fixtures' format).

Nothing is renamed, dropped or reshaped: a checkpoint that is not exactly the
model's layout is an error naming the file and the first differences.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from agent.errors import ConfigError
from media.latentsync.config import UNetConfig
from media.latentsync.unet import UNet3DConditionModel

Shapes = Mapping[str, tuple[int, ...]]

_SHOWN = 5  # differences listed per kind in an error


class CheckpointMismatchError(ConfigError):
    """A state dict's tensor names or shapes differ from what the model expects."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a UNet state dict (on CPU) from `.pt` (LatentSync's format) or `.safetensors`."""
    if not path.is_file():
        raise ConfigError(f"{path}: UNet checkpoint not found")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        # mmap: the 5 GB fp32 checkpoint is paged in as tensors are used, not copied first.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several unrelated types for bad files
        raise ConfigError(f"{path}: cannot read checkpoint: {exc}") from exc
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        keys = sorted(ckpt)[:_SHOWN] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(f"{path}: expected a dict with 'state_dict', got {keys}")
    return state


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor (meta tensors included)."""
    return {name: tuple(t.shape) for name, t in state_dict.items()}


def check_shapes(actual: Shapes, expected: Shapes, source: str) -> None:
    """Raise `CheckpointMismatchError` unless `actual` has exactly `expected`'s names and shapes.

    `source` names where `actual` came from (a file path) in the message.
    """
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [
        f"{k}: {list(actual[k])} vs expected {list(expected[k])}"
        for k in expected
        if k in actual and tuple(actual[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = [
        f"{len(items)} {label} ({_first(items)})"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches", wrong),
        )
        if items
    ]
    raise CheckpointMismatchError(f"{source}: UNet weights do not match: " + "; ".join(parts))


def _first(items: Sequence[str]) -> str:
    more = f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def read_manifest(path: Path) -> tuple[UNetConfig, dict[str, tuple[int, ...]]]:
    """The config and name -> shape table of a manifest (`latentsync_unet_stage2.json`)."""
    try:
        raw = json.loads(path.read_text())
        config = UNetConfig.from_dict(raw["config"])
        tensors = {name: tuple(shape) for name, shape in raw["tensors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a UNet manifest: {exc!r}") from exc
    return config, tensors


def check_manifest(state_dict: Mapping[str, torch.Tensor], manifest_path: Path) -> None:
    """Raise unless `state_dict` has exactly the manifest's tensor names and shapes."""
    _, expected = read_manifest(manifest_path)
    check_shapes(shapes_of(state_dict), expected, source=str(manifest_path))


def load_unet(
    config: UNetConfig,
    weights_path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet3DConditionModel:
    """Build the UNet and load `weights_path` strictly; returns it in eval mode, no grads.

    The model is built on the meta device and takes the loaded tensors as they
    are (no random init, no second copy), then moves to `device`/`dtype`.
    """
    with torch.device("meta"):
        model = UNet3DConditionModel(config)
    state_dict = load_state_dict(weights_path)
    check_shapes(shapes_of(state_dict), shapes_of(model.state_dict()), source=str(weights_path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model
