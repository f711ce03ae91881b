"""Stable Diffusion's VAE (`sd-vae-ft-mse`) as LatentSync uses it: strict local loading, codec.

LatentSync encodes the masked and the reference face crops with
`latent_dist.sample()` times 0.18215 (no shift) and decodes `latents / 0.18215`
(facts in ../shared/manifests/README.md). The weights come from the user's
`checkpoints/` and are never downloaded:
- a diffusers folder `checkpoints/sd-vae-ft-mse/` (`config.json` and
  `diffusion_pytorch_model.safetensors` or `.bin`), as `stabilityai/sd-vae-ft-mse`
  ships it; or
- one weights file (`sd-vae-ft-mse.safetensors` / `.ckpt` next to the folder's
  place, or alone in the folder), in diffusers' or the original LDM key layout
  (`vae-ft-mse-840000-ema-pruned`), read with the packaged `configs/sd_vae_ft_mse.json`.
Keys and shapes must match exactly; a file that differs is a `ConfigError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file

from agent.errors import ConfigError
from media.latentsync.graphs import StaticGraph

SCALING_FACTOR = 0.18215
VAE_NAME = "sd-vae-ft-mse"
PACKAGED_CONFIG = Path(__file__).with_name("configs") / "sd_vae_ft_mse.json"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_SINGLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
_SHOWN = 5  # names listed per kind of difference in an error


@dataclass(frozen=True, slots=True)
class VaeShape:
    """What a VAE config must say to be the one the UNet was trained with."""

    block_out_channels: tuple[int, ...]
    latent_channels: int


SD_VAE_SHAPE = VaeShape((128, 256, 512, 512), 4)  # 8x downsampling, 4 latent channels


def find_vae(checkpoint_dir: Path) -> Path:
    """The VAE's folder or file under `checkpoint_dir`; ConfigError saying what is expected."""
    folder = checkpoint_dir / VAE_NAME
    if folder.is_dir():
        return folder
    for suffix in _SINGLE_SUFFIXES:
        single = checkpoint_dir / f"{VAE_NAME}{suffix}"
        if single.is_file():
            return single
    raise ConfigError(f"{folder}: not found; {expected_vae_text()}")


def expected_vae_text() -> str:
    return (
        f"expected Stable Diffusion's VAE as a diffusers folder {VAE_NAME}/ (config.json +"
        f" {_DIFFUSERS_WEIGHTS[0]}, from stabilityai/sd-vae-ft-mse) or one weights file"
        f" {VAE_NAME}.safetensors/.ckpt"
    )


def load_vae(
    path: Path,
    *,
    expect: VaeShape | None = SD_VAE_SHAPE,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKL:
    """Load an AutoencoderKL from a diffusers folder or one weights file, strictly.

    `expect` checks the architecture (None: any, for tiny test models). Returns
    the model in eval mode without grads on `device`/`dtype`.
    """
    config_path, weights_path = _vae_files(path)
    config = _read_config(config_path)
    if expect is not None:
        got = VaeShape(tuple(config.get("block_out_channels", ())),
                       int(config.get("latent_channels", -1)))
        if got != expect:
            raise ConfigError(
                f"{config_path}: VAE has block_out_channels {list(got.block_out_channels)} and"
                f" {got.latent_channels} latent channels; expected sd-vae-ft-mse's"
                f" {list(expect.block_out_channels)} and {expect.latent_channels}"
            )
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model: AutoencoderKL = AutoencoderKL.from_config(config)
    state = _read_state_dict(weights_path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not set(expected) <= set(state):
        state = _from_ldm_layout(state, model.config, weights_path)
    _check_keys(state, expected, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    # nn.Module.to: diffusers' override logs a float32-modules notice on every cast.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def _vae_files(path: Path) -> tuple[Path, Path]:
    """(config.json, weights) for a diffusers folder, a folder with one file, or a file."""
    if path.is_file():
        return PACKAGED_CONFIG, path
    if not path.is_dir():
        raise ConfigError(f"{path}: not found; {expected_vae_text()}")
    if (path / "config.json").is_file():
        for name in _DIFFUSERS_WEIGHTS:
            if (path / name).is_file():
                return path / "config.json", path / name
        raise ConfigError(f"{path}: config.json without weights; {expected_vae_text()}")
    singles = sorted(p for p in path.iterdir() if p.suffix in _SINGLE_SUFFIXES and p.is_file())
    if len(singles) != 1:
        found = [p.name for p in singles] or "nothing"
        raise ConfigError(f"{path}: found {found}; {expected_vae_text()}")
    return PACKAGED_CONFIG, singles[0]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the VAE config: {exc}") from None
    if not isinstance(raw, dict) or raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"{path}: not an AutoencoderKL config")
    return raw


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state: object = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read VAE weights: {exc}") from None
    # Original LDM checkpoints nest the tensors under "state_dict".
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: VAE weights must be a name -> tensor mapping")
    return state


def _from_ldm_layout(
    state: dict[str, torch.Tensor], config: Mapping[str, Any], path: Path
) -> dict[str, torch.Tensor]:
    """Rename an original (CompVis LDM) VAE state dict to diffusers' names (their converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        converted: dict[str, torch.Tensor] = convert_ldm_vae_checkpoint(  # type: ignore[no-untyped-call]
            state, dict(config))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: VAE weights in neither diffusers' nor LDM's layout: {exc}"
                          ) from None
    return converted


def _check_keys(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: Path
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: {list(state[k].shape)} vs expected {list(expected[k])}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    parts = [
        f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{', ...' * (len(items) > _SHOWN)})"
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatches", wrong))
        if items
    ]
    if parts:
        raise ConfigError(f"{path}: VAE weights do not match the config: " + "; ".join(parts))


class LatentCodec:
    """Pictures <-> scaled latents with a loaded VAE (weights shared read-only).

    Pictures are (N, 3, r, r) in [-1, 1]; latents (N, C, r/8, r/8), scaled.
    Callers run it under `torch.inference_mode()`.

    `compile_decoder` runs the decode through Inductor (channels-last, one graph for every
    frame count) and `capture_decode` replays it as a CUDA graph for given frame counts;
    `use_compiled` switches back to the eager decoder (benchmarks compare both).
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        self.vae = vae
        self.latent_channels = int(vae.config["latent_channels"])
        self.downsample = 2 ** (len(vae.config["block_out_channels"]) - 1)
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.use_compiled = True
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._graphs: dict[tuple[int, ...], StaticGraph] = {}

    def encode(self, pictures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`latent_dist.sample()` with the given standard-normal `noise`, times 0.18215.

        `noise` (N, C, r/8, r/8) makes the sample a function of the caller's seeds
        rather than of the order frames happen to be encoded in.
        """
        dist = self.vae.encode(pictures.to(self.device, self.dtype)).latent_dist
        sample: torch.Tensor = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
        return sample * SCALING_FACTOR  # (N, C, r/8, r/8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) scaled latents -> (N, 3, 8h, 8w) pictures, nominally in [-1, 1]."""
        if self._compiled is None or not self.use_compiled:
            return self._decode(latents)
        graph = self._graphs.get(tuple(latents.shape))
        return self._compiled(latents) if graph is None else graph(latents)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def captured(self) -> list[tuple[int, ...]]:
        """The latents shapes whose decode replays a CUDA graph."""
        return sorted(self._graphs)

    def compile_decoder(self, backend: str = "inductor") -> None:
        """Decode through `torch.compile` (Inductor) from now on: the decoder's weights and
        activations channels-last, the frame count symbolic (one compile serves every
        count but 1, which Dynamo specialises). On an H100 at 256 px: 16 frames in about
        25 ms against 55 eager (bench/results/vae_decode_h100.md). The compile happens at
        the first call of each kind (tens of seconds cold; Inductor's on-disk cache after).
        The weights stay channels-last: `use_compiled` False then runs the eager decoder
        in that layout (about 10 % slower than contiguous on an H100).
        `backend`: torch.compile's (tests use "eager")."""
        if self._compiled is not None:
            return
        for module in (self.vae.post_quant_conv, self.vae.decoder):
            if module is not None:  # (torch's stubs lack `to`'s memory_format)
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        compiled = torch.compile(self._decode, backend=backend)

        def run(latents: torch.Tensor) -> torch.Tensor:
            torch._dynamo.maybe_mark_dynamic(latents, 0)  # metadata only
            out: torch.Tensor = compiled(latents)
            return out

        self._compiled = run
        self._graphs.clear()

    def capture_decode(self, shapes: Iterable[Sequence[int]]) -> None:
        """Capture the compiled decode of each latents shape (N, C, h, w) as a CUDA graph,
        replayed by later calls of that shape (at one frame the launch gaps show: 256 px
        took 2.2 ms graphed against 3.6 compiled alone on an H100). A no-op unless
        `compile_decoder` ran on a CUDA device."""
        if self._compiled is None or self.device.type != "cuda":
            return
        for shape in shapes:
            key = tuple(int(n) for n in shape)
            if key not in self._graphs:
                example = torch.randn(key, device=self.device, dtype=self.dtype)
                self._graphs[key] = StaticGraph(self._compiled, example)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.vae.decode(latents.to(self.dtype) / SCALING_FACTOR).sample
        return out
