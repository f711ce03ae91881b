"""The LatentSync UNet's architecture config, parsed from the released JSON/YAML schema.

The field names are those of LatentSync's `configs/unet/stage2.yaml` (and of the
manifest's and the tiny fixture's `config`), so a config dict loads as it is.
Defaults are the released v1.5/v1.6 "stage2" values. Options the released models
never use are rejected at load instead of being half supported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

CROSS_ATTN_DOWN = "CrossAttnDownBlock3D"
PLAIN_DOWN = "DownBlock3D"
CROSS_ATTN_UP = "CrossAttnUpBlock3D"
PLAIN_UP = "UpBlock3D"
MID_BLOCK = "UNetMidBlock3DCrossAttn"


@dataclass(frozen=True, slots=True)
class MotionModuleConfig:
    """The temporal ("Vanilla" AnimateDiff) module inserted after each spatial layer."""

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    # One temporal self-attention per entry; only "Temporal_Self" exists in the releases.
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    # Sinusoidal frame positions added before each temporal attention.
    temporal_position_encoding: bool = True
    # Most frames a chunk may have (length of the position table `pe`).
    temporal_position_encoding_max_len: int = 24
    # Attention width = channels / temporal_attention_dim_div.
    temporal_attention_dim_div: int = 1
    # Training-time init of proj_out; no effect when weights are loaded.
    zero_initialize: bool = True

    def __post_init__(self) -> None:
        bad = [t for t in self.attention_block_types if t != "Temporal_Self"]
        if bad:
            raise ConfigError(f"motion_module_kwargs.attention_block_types: unsupported {bad}")
        if self.num_attention_heads < 1 or self.num_transformer_block < 1:
            raise ConfigError("motion_module_kwargs: heads and transformer blocks must be >= 1")
        if self.temporal_position_encoding_max_len < 1 or self.temporal_attention_dim_div < 1:
            raise ConfigError("motion_module_kwargs: max_len and attention_dim_div must be >= 1")


@dataclass(frozen=True, slots=True)
class UNetConfig:
    """Architecture of LatentSync's UNet3DConditionModel (stage2, audio-conditioned)."""

    # Input channels: noisy latent 4 + mask 1 + masked-face latent 4 + reference latent 4.
    in_channels: int = 13
    # Predicted noise.
    out_channels: int = 4
    # Latent side the model was trained at (informational; any multiple of 8 runs).
    sample_size: int = 64
    # Map the input from [0, 1] to [-1, 1] first.
    center_input_sample: bool = False
    # Timestep embedding: order (cos, sin) and frequency shift, as diffusers' Timesteps.
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
    mid_block_type: str = MID_BLOCK
    up_block_types: tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Resnets per down block (up blocks have one more).
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # Width of the audio features (Whisper-tiny hidden size).
    cross_attention_dim: int = 384
    # Despite the name (kept from diffusers), the NUMBER of heads of the spatial attentions.
    attention_head_dim: int = 8
    resnet_time_scale_shift: str = "default"
    # Spatial transformers attend to the audio (attn2); false in stage1 only.
    add_audio_layer: bool = True
    use_motion_module: bool = True
    # Downsampling factors (1, 2, 4, 8) whose blocks get motion modules.
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_type: str = "Vanilla"
    motion_module_kwargs: MotionModuleConfig = MotionModuleConfig()

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n < 1 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"block_out_channels ({n}), down_block_types ({len(self.down_block_types)}) and"
                f" up_block_types ({len(self.up_block_types)}) must have the same length >= 1"
            )
        for name, value, allowed in (
            ("down_block_types", self.down_block_types, {CROSS_ATTN_DOWN, PLAIN_DOWN}),
            ("up_block_types", self.up_block_types, {CROSS_ATTN_UP, PLAIN_UP}),
            ("mid_block_type", (self.mid_block_type,), {MID_BLOCK}),
            ("act_fn", (self.act_fn,), {"silu"}),
            ("resnet_time_scale_shift", (self.resnet_time_scale_shift,), {"default"}),
            ("motion_module_type", (self.motion_module_type,), {"Vanilla"}),
        ):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ConfigError(f"{name}: unsupported {bad}, expected one of {sorted(allowed)}")
        heads = self.motion_module_kwargs.num_attention_heads
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.attention_head_dim or c % heads:
                raise ConfigError(
                    f"block_out_channels {c} must divide by norm_num_groups"
                    f" {self.norm_num_groups}, attention_head_dim {self.attention_head_dim}"
                    f" and motion heads {heads}"
                )
        if self.use_motion_module and any(c % 32 for c in self.block_out_channels):
            raise ConfigError(
                f"block_out_channels {list(self.block_out_channels)} must divide by 32, the"
                " motion modules' fixed GroupNorm groups"
            )
        if self.layers_per_block < 1:
            raise ConfigError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> UNetConfig:
        """Parse a config mapping; unknown keys are an error (a typo would otherwise pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown UNet config keys: {unknown}")
        values = dict(raw)
        for key in (
            "down_block_types",
            "up_block_types",
            "block_out_channels",
            "motion_module_resolutions",
        ):
            if key in values:
                values[key] = tuple(values[key])
        if "motion_module_kwargs" in values:
            mm = dict(values["motion_module_kwargs"])
            mm_known = {f.name for f in fields(MotionModuleConfig)}
            mm_unknown = sorted(set(mm) - mm_known)
            if mm_unknown:
                raise ConfigError(f"unknown motion_module_kwargs keys: {mm_unknown}")
            if "attention_block_types" in mm:
                mm["attention_block_types"] = tuple(mm["attention_block_types"])
            values["motion_module_kwargs"] = MotionModuleConfig(**mm)
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> UNetConfig:
        """Read a bare config JSON (as `tiny_unet_config.json`)."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read UNet config: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: UNet config must be a JSON object")
        return cls.from_dict(raw)
