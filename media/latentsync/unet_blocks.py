"""The UNet's building blocks: resnets, spatial (audio) transformers, down/mid/up blocks.

Attribute names are the checkpoint's keys (`resnets.N`, `attentions.N`,
`motion_modules.N`, `downsamplers.0.conv`, `upsamplers.0.conv`), so LatentSync's
released state dict loads with strict key matching. A block without spatial
attention has an empty `attentions` list and a block without motion modules has
`nn.Identity` in their place; neither adds keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from media.latentsync.config import MotionModuleConfig
from media.latentsync.geglu import feed_forward
from media.latentsync.layers import (
    Attention,
    FrameConv2d,
    batch_to_frames,
    frames_to_batch,
    halves,
    pointwise,
    second_half,
)
from media.latentsync.motion import MotionModule


class ResnetBlock3D(nn.Module):
    """Norm-SiLU-conv twice with the time embedding added in between; 1x1 shortcut if widths differ.

    The GroupNorms see the whole video tensor (B, C, F, H, W): their statistics
    span all frames of a batch item, as LatentSync's (non-inflated) GroupNorm does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = FrameConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            FrameConv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )
        self.output_scale_factor = output_scale_factor

    # (start, end) of this block's time projection in the UNet's timestep table rows
    # (`UNet3DConditionModel.set_kernels(timestep_table=...)`); None: computed here.
    time_columns: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, F, H, W); temb: (B, T), or with `time_columns` the timestep table's
        # rows (B, sum of the blocks' C_out) -> (B, C_out, F, H, W)
        h: torch.Tensor = self.conv1(F.silu(self.norm1(x)))
        if self.time_columns is None:
            projected = self.time_emb_proj(F.silu(temb))
        else:
            projected = temb[:, self.time_columns[0] : self.time_columns[1]]
        h = h + projected[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut: torch.Tensor = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class BasicTransformerBlock(nn.Module):
    """Self-attention over a frame's pixels, cross-attention to the frame's audio, GEGLU FF.

    `fused_geglu` (see UNet.set_kernels): the feed-forward's GEGLU projection as one
    kernel (`geglu.geglu_linear`)."""

    fused_geglu = False  # an instance attribute overrides it

    def __init__(self, dim: int, heads: int, audio_dim: int | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        if audio_dim is not None:
            self.norm2: nn.LayerNorm | None = nn.LayerNorm(dim)
            self.attn2: Attention | None = Attention(dim, heads, context_dim=audio_dim)
        else:
            self.norm2 = self.attn2 = None
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, split: bool = False) -> torch.Tensor:
        """x: (N, H*W, C) tokens of N frames; audio: (N, S_audio, C_audio), or (N/2, ...):
        the features of the last N/2 frames, the first half's being all zero (a guidance
        pair's unconditional half). split: x is one copy of such a pair (audio has as
        many rows); it becomes both halves after the self-attention. -> (N, H*W, C), or
        (2N, H*W, C) with split."""
        x = self.attn1(self.norm1(x)) + x
        if split:
            x = torch.cat([x, x])  # (2N, H*W, C)
        if self.attn2 is not None and self.norm2 is not None:
            if audio.shape[0] == x.shape[0]:
                x = self.attn2(self.norm2(x), audio) + x
            elif 2 * audio.shape[0] == x.shape[0]:
                silent, heard = halves(x)  # (N/2, H*W, C) each
                x = torch.cat([silent + self.attn2.zero_context_output(),
                               self.attn2(self.norm2(heard), audio) + heard])
            else:
                raise ValueError(f"{audio.shape[0]} audio rows for {x.shape[0]} frames")
        out: torch.Tensor = feed_forward(self.ff, self.norm3(x), self.fused_geglu) + x
        return out


class SpatialTransformer(nn.Module):
    """LatentSync's Transformer3DModel: per-frame GroupNorm, 1x1 conv in, blocks, 1x1 conv out.

    `as_linear` (see UNet.set_kernels): the 1x1 projections as linear layers over the
    tokens (`pointwise`). Same math; on channels-last activations no copies."""

    as_linear = False  # an instance attribute overrides it

    def __init__(self, channels: int, heads: int, groups: int, audio_dim: int | None) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, audio_dim)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, split: bool = False) -> torch.Tensor:
        # x: (B, C, F, H, W); audio: (B*F, S_audio, C_audio), or the last B/2 items' (see
        # BasicTransformerBlock) -> (B, C, F, H, W); split: x is one copy of a guidance
        # pair (audio of B items) -> (2B, C, F, H, W)
        f, h, w = x.shape[2:]
        y = self.norm(frames_to_batch(x))  # (B*F, C, H, W)
        if not self.as_linear:
            y = self.proj_in(y)
        c = y.shape[1]
        y = y.permute(0, 2, 3, 1).reshape(y.shape[0], h * w, c)  # (B*F, H*W, C)
        if self.as_linear:
            y = pointwise(self.proj_in, y)
        for i, block in enumerate(self.transformer_blocks):
            y = block(y, audio, split=split and i == 0)
        if self.as_linear:
            y = pointwise(self.proj_out, y)
        y = y.view(y.shape[0], h, w, c).permute(0, 3, 1, 2)  # (B*F or 2B*F, C, H, W)
        if not self.as_linear:
            y = self.proj_out(y)
        if split:
            x = torch.cat([x, x])
        return batch_to_frames(y, f) + x


def _motion(channels: int, cfg: MotionModuleConfig | None) -> nn.Module:
    return MotionModule(channels, cfg) if cfg is not None else nn.Identity()


class DownBlock3D(nn.Module):
    """`layers` x (resnet [-> spatial transformer] [-> motion module]), optional stride-2 conv.

    Serves both CrossAttnDownBlock3D (`heads` given) and DownBlock3D (`heads` None).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        layers: int,
        groups: int,
        eps: float,
        heads: int | None,
        audio_dim: int | None,
        motion: MotionModuleConfig | None,
        add_downsample: bool,
        downsample_padding: int,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps
            )
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_channels, heads, groups, audio_dim) for _ in range(layers)]
            if heads is not None
            else []
        )
        self.motion_modules = nn.ModuleList(_motion(out_channels, motion) for _ in range(layers))
        self.downsamplers = (
            nn.ModuleList([Downsample3D(out_channels, downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor, split: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # x: (B, C_in, F, H, W) -> (B, C_out, F, H/2, W/2) and the skip tensors for the up
        # path. split: x is one copy of a guidance pair (B/2 rows; temb the pair's (B,)),
        # doubled at the first cross-attention (or after the first resnet, without one)
        skips = []
        for i, resnet in enumerate(self.resnets):
            if split and i == 0:
                x = resnet(x, second_half(temb))  # the halves' embeddings are equal
                if len(self.attentions) > 0:
                    x = self.attentions[i](x, audio, split=True)
                else:
                    x = torch.cat([x, x])
            else:
                x = resnet(x, temb)
                if len(self.attentions) > 0:
                    x = self.attentions[i](x, audio)
            x = self.motion_modules[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock3D(nn.Module):
    """resnet -> spatial transformer [-> motion module] -> resnet, at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        *,
        groups: int,
        eps: float,
        heads: int,
        audio_dim: int | None,
        motion: MotionModuleConfig | None,
        output_scale_factor: float,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, temb_channels, groups, eps, output_scale_factor)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, groups, audio_dim)])
        self.motion_modules = nn.ModuleList([_motion(channels, motion)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        # x: (B, C, F, H, W) -> (B, C, F, H, W)
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, audio)
        x = self.motion_modules[0](x)
        out: torch.Tensor = self.resnets[1](x, temb)
        return out


class UpBlock3D(nn.Module):
    """`layers` x (concat skip -> resnet [-> spatial transformer] [-> motion]) then optional 2x up.

    Serves both CrossAttnUpBlock3D (`heads` given) and UpBlock3D (`heads` None).
    Skip widths: the last resnet takes the skip from before the matching down
    block (`in_channels`), the others skips of this level (`out_channels`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_channels: int,
        temb_channels: int,
        *,
        layers: int,
        groups: int,
        eps: float,
        heads: int | None,
        audio_dim: int | None,
        motion: MotionModuleConfig | None,
        add_upsample: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                (prev_channels if i == 0 else out_channels)
                + (in_channels if i == layers - 1 else out_channels),
                out_channels,
                temb_channels,
                groups,
                eps,
            )
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_channels, heads, groups, audio_dim) for _ in range(layers)]
            if heads is not None
            else []
        )
        self.motion_modules = nn.ModuleList(_motion(out_channels, motion) for _ in range(layers))
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        audio: torch.Tensor,
        out_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        # x: (B, C_prev, F, H, W); skips: the down path's last `layers` tensors, consumed last
        # first -> (B, C_out, F, H', W') with (H', W') = out_size when upsampling
        for i in range(len(self.resnets)):
            x = self.layer(i, x, skips[-1 - i], temb, audio)
        return self.upsample(x, out_size)

    def layer(
        self, i: int, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor
    ) -> torch.Tensor:
        """Layer i alone: concat skip -> resnet [-> spatial transformer] [-> motion module]."""
        # x: (B, C, F, H, W); skip: (B, C_skip, F, H, W) -> (B, C_out, F, H, W)
        x = torch.cat([x, skip], dim=1)  # (B, C + C_skip, F, H, W)
        x = self.resnets[i](x, temb)
        if len(self.attentions) > 0:
            x = self.attentions[i](x, audio)
        out: torch.Tensor = self.motion_modules[i](x)
        return out

    def upsample(self, x: torch.Tensor, out_size: tuple[int, int] | None) -> torch.Tensor:
        # (B, C, F, H, W) -> (B, C, F, out_size) when this block upsamples, else unchanged
        if self.upsamplers is None:
            return x
        if out_size is None:
            raise ValueError("an upsampling block needs the output size")
        out: torch.Tensor = self.upsamplers[0](x, out_size)
        return out


class Downsample3D(nn.Module):
    """Stride-2 3x3 convolution per frame."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, F, H, W) -> (B, C, F, ceil(H/2), ceil(W/2))
        out: torch.Tensor = self.conv(x)
        return out


class Upsample3D(nn.Module):
    """Nearest-neighbour resize per frame to the skip's size (2x for even sizes), 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # x: (B, C, F, H, W) -> (B, C, F, size[0], size[1])
        y = F.interpolate(frames_to_batch(x), size=size, mode="nearest")  # (B*F, C, H', W')
        return batch_to_frames(self.conv(y), x.shape[2])
