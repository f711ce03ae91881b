"""Tiny LatentSync models for CPU tests: the fixture UNet and Whisper, a random tiny VAE.

The UNet is the reference architecture at `block_out_channels` [32, 64, 64, 64]
with its fixture weights (released key layout); the Whisper encoder is Whisper
tiny with the fixture's seeded weights (so the audio is the real (50, 384) per
frame); the VAE is diffusers' AutoencoderKL with 8-channel blocks, random but
seeded, downsampling 8x like sd-vae-ft-mse. Frames come out as noise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

from agent.config import LatentSyncConfig
from media.avatar import Avatar
from media.latentsync.audio_features import AudioFeatureExtractor
from media.latentsync.checkpoint import load_unet
from media.latentsync.config import (
    CROSS_ATTN_DOWN,
    CROSS_ATTN_UP,
    PLAIN_DOWN,
    PLAIN_UP,
    UNetConfig,
)
from media.latentsync.face import track_clip
from media.latentsync.pipeline import LatentSyncModels, NoisePredictor
from media.latentsync.renderer import LatentSyncRenderer
from media.latentsync.unet import UNet3DConditionModel
from media.latentsync.vae import LatentCodec
from media.latentsync.whisper import load_whisper_encoder
from tests.conftest import SHARED

CROP = 64  # crop side for tiny tests: 8 x 8 latents, like the UNet fixture
STEPS = 2  # DDIM steps for tiny tests
VAE_SEED = 5


def fixtures_dir() -> Path:
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip("../shared/fixtures is not present")
    return path


def tiny_vae() -> AutoencoderKL:
    with torch.random.fork_rng(all_devices()):  # seeded init, the global RNGs untouched
        torch.manual_seed(VAE_SEED)
        vae: AutoencoderKL = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=CROP,
        )
    vae.eval().requires_grad_(False)
    return vae


def all_devices() -> list[int]:
    """Every CUDA device, for fork_rng (which warns when several exist and none are named)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def tiny_unet_config() -> UNetConfig:
    return UNetConfig.from_json(fixtures_dir() / "tiny_unet_config.json")


def tiny_unet_for_runners() -> UNet3DConditionModel:
    """The fixture UNet; seeded random weights of its architecture where only the config
    travelled (the GPU machine: the weights file does not fit beside the wheels). For
    tests that compare one way of running the UNet with another, not with golden data."""
    weights = fixtures_dir() / "tiny_unet_weights.safetensors"
    if weights.is_file():
        return load_unet(tiny_unet_config(), weights)
    with torch.random.fork_rng(all_devices()):
        torch.manual_seed(0)
        return UNet3DConditionModel(tiny_unet_config()).eval().requires_grad_(False)


def small_unet_config() -> UNetConfig:
    """The fixture's architecture at two levels of one layer each: every block kind
    (cross-attention and plain down and up blocks, with and without a resampler; the mid
    block) and motion modules on both levels, in about a third of the fixture's graph
    (1176 exported nodes against 3817). Wider channels (64, 128) keep the weights
    about as heavy as the fixture's (19 MB against 21 MB) at little graph cost."""
    return dataclasses.replace(
        tiny_unet_config(),
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN),
        up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
        motion_module_resolutions=(1, 2),
    )


def small_unet_for_compilers(seed: int = 0) -> UNet3DConditionModel:
    """A `small_unet_config` UNet for tests whose cost is compiling or exporting the UNet
    (Dynamo, torch.export and Inductor times grow with the graph, not with the sizes),
    and which compare one way of running it with another. Its weights are seeded and
    drawn as the fixture's were (kernels N(0, 0.05), biases N(0, 0.02), norm scales
    1 + N(0, 0.02)): every tensor matters (no zero-initialised projection) and fp32
    reordering moves results as little as with the fixture's."""
    with torch.random.fork_rng(all_devices()):
        torch.manual_seed(seed)
        unet = UNet3DConditionModel(small_unet_config()).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                param.copy_(0.05 * noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            else:  # the norms' scales
                param.copy_(1 + 0.02 * noise)
    return unet


def assert_cuda_kernels_compute_the_default_unet(**kernels: Any) -> None:
    """The fixture UNet on CUDA in float32 (TF32 convolutions off: the caller's
    monkeypatch) with `set_kernels(**kernels)`, eager and compiled, against its defaults."""
    from media.latentsync.verify import relative_error

    unet = tiny_unet_for_runners().cuda()
    gen = torch.Generator("cuda").manual_seed(0)
    sample = torch.randn(2, 13, 16, 8, 8, generator=gen, device="cuda")
    audio = torch.randn(32, 50, 384, generator=gen, device="cuda")
    with torch.inference_mode():
        expected = unet(sample, 500, audio)
        unet.set_kernels(**kernels)
        got = unet(sample, 500, audio)
        compiled = torch.compile(unet)(sample, torch.tensor([500], device="cuda"), audio)
    torch._dynamo.reset()
    assert relative_error(got, expected) < 1e-4
    assert relative_error(compiled, expected) < 1e-4


@functools.cache
def tiny_models() -> LatentSyncModels:
    """Loaded once per test process and shared read-only (as a server shares its models)."""
    fixtures = fixtures_dir()
    unet = load_unet(tiny_unet_config(), fixtures / "tiny_unet_weights.safetensors")
    audio = AudioFeatureExtractor(load_whisper_encoder(fixtures / "tiny_whisper_tiny_encoder.pt"))
    return LatentSyncModels(unet, LatentCodec(tiny_vae()), audio)


class CountingCodec(LatentCodec):
    """The real codec, counting the pictures it encodes."""

    def __init__(self, codec: LatentCodec) -> None:
        super().__init__(codec.vae)
        self.encoded = 0

    def encode(self, pictures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.encoded += pictures.shape[0]
        return super().encode(pictures, noise)


def counting_models() -> LatentSyncModels:
    """The tiny models (shared UNet and audio encoder) with a fresh `CountingCodec`."""
    base = tiny_models()
    return LatentSyncModels(base.unet, CountingCodec(base.codec), base.audio)


def with_face(avatar: Avatar) -> int:
    """Source frames with a face at CROP: the ones the VAE encodes (twice: masked and whole)."""
    return sum(int(track_clip(avatar, c, CROP).has_face.sum()) for c in range(len(avatar.clips)))


def tiny_renderer(
    avatars: Callable[[str], Avatar],
    *,
    models: LatentSyncModels | None = None,
    noise_predictor: NoisePredictor | None = None,
    **config: Any,
) -> LatentSyncRenderer:
    settings = LatentSyncConfig(**{"inference_steps": STEPS, **config})
    return LatentSyncRenderer.from_models(avatars, models or tiny_models(), settings,
                                          resolution=CROP, noise_predictor=noise_predictor)
