"""The temporal ("motion") module: self-attention across the frames of each pixel.

AnimateDiff's "Vanilla" motion module as LatentSync ships it. Every spatial
position of every video attends over the F frames; the result is added back
to the input (the module is a residual branch). Keys follow the released
checkpoint: `temporal_transformer.{norm, proj_in, transformer_blocks.N, proj_out}`.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from media.latentsync.config import MotionModuleConfig
from media.latentsync.geglu import feed_forward
from media.latentsync.layers import Attention, frames_to_batch

# LatentSync never passes its norm_num_groups to the motion modules: they use 32 always.
MOTION_NORM_GROUPS = 32


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """The transformer's sine/cosine table: (1, max_len, dim), sin on even, cos on odd channels."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    table = torch.zeros(1, max_len, dim)
    table[0, :, 0::2] = torch.sin(position * inv_freq)
    table[0, :, 1::2] = torch.cos(position * inv_freq)
    return table


class PositionalEncoding(nn.Module):
    """Adds a frame-position table. `pe` is a persistent buffer: it is in the checkpoint."""

    pe: torch.Tensor

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_len, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, F, C) -> (N, F, C)
        return x + self.pe[:, : x.shape[1]]


class TemporalAttention(Attention):
    """Self-attention over frames, with frame positions added to its input (not the residual)."""

    def __init__(self, dim: int, heads: int, max_len: int | None) -> None:
        super().__init__(dim, heads)
        self.pos_encoder = PositionalEncoding(dim, max_len) if max_len is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B*H*W, F, C) -> (B*H*W, F, C)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        return super().forward(x)


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal self-attentions, then a GEGLU feed-forward, each residual.

    `fused_geglu`: as `BasicTransformerBlock`'s."""

    fused_geglu = False  # an instance attribute overrides it

    def __init__(self, dim: int, cfg: MotionModuleConfig) -> None:
        super().__init__()
        max_len = cfg.temporal_position_encoding_max_len if cfg.temporal_position_encoding else None
        n = len(cfg.attention_block_types)
        self.attention_blocks = nn.ModuleList(
            TemporalAttention(dim, cfg.num_attention_heads, max_len) for _ in range(n)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B*H*W, F, C) -> (B*H*W, F, C)
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attn(norm(x)) + x
        out: torch.Tensor = feed_forward(self.ff, self.ff_norm(x), self.fused_geglu) + x
        return out


class TemporalTransformer(nn.Module):
    """Per-frame GroupNorm, projection to tokens, temporal blocks, projection back, residual."""

    def __init__(self, channels: int, cfg: MotionModuleConfig) -> None:
        super().__init__()
        inner = channels // cfg.temporal_attention_dim_div
        self.norm = nn.GroupNorm(MOTION_NORM_GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, cfg) for _ in range(cfg.num_transformer_block)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, F, H, W) -> (B, C, F, H, W)
        b, c, f, h, w = x.shape
        # Normalised per frame (statistics over C/groups x H x W), as in LatentSync.
        y: torch.Tensor = self.norm(frames_to_batch(x))  # (B*F, C, H, W)
        y = y.reshape(b, f, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, f, c)  # (B*HW, F, C)
        y = self.proj_in(y)  # (B*HW, F, inner)
        for block in self.transformer_blocks:
            y = block(y)
        y = self.proj_out(y)  # (B*HW, F, C)
        y = y.view(b, h, w, f, c).permute(0, 4, 3, 1, 2)  # (B, C, F, H, W)
        # x first: the sum takes x's memory layout (channels-last stays channels-last).
        return x + y


class MotionModule(nn.Module):
    """Holder that gives the checkpoint's `temporal_transformer.` key prefix."""

    def __init__(self, channels: int, cfg: MotionModuleConfig) -> None:
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, F, H, W) -> (B, C, F, H, W)
        out: torch.Tensor = self.temporal_transformer(x)
        return out
