"""LatentSync's lip-sync UNet (v1.5 / v1.6 "stage2"), inference only.

A Stable-Diffusion-1.5-shaped UNet run on every frame of a 16-frame chunk, with
- 13 input channels: noisy latent 4, mask 1, masked-face latent 4, reference latent 4;
- spatial transformers whose cross-attention (`attn2`) reads the frame's audio
  features (50 tokens of 384: Whisper-tiny) instead of text;
- AnimateDiff motion modules (temporal self-attention) after each spatial layer;
- ResNet GroupNorms whose statistics span all frames of a video.

Module names equal the released checkpoint's keys (`latentsync_unet.pt`), so its
state dict loads strictly (see `media.latentsync.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from media.latentsync.config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNetConfig
from media.latentsync.layers import (
    Attention,
    FrameConv2d,
    batch_to_frames,
    frames_to_batch,
    second_half,
)
from media.latentsync.motion import TemporalAttention, TemporalTransformerBlock
from media.latentsync.unet_blocks import (
    BasicTransformerBlock,
    DownBlock3D,
    MidBlock3D,
    ResnetBlock3D,
    SpatialTransformer,
    UpBlock3D,
)

TEMPORAL_ATTENTION_KERNELS = ("sdpa", "math", "inline", "triton")
TIME_TABLE_STEPS = 1000  # LatentSync's schedulers' training timesteps (num_train_timesteps)


@dataclass(slots=True)
class DeepCacheState:
    """DeepCache (Ma et al., CVPR 2024) at its shallowest branch, for one denoising loop.

    The input of the last up block's last layer changes slowly between steps.
    A forward with `refresh=True` runs the whole UNet and stores that tensor in
    `deep`; one with `refresh=False` runs only `conv_in`, that last layer (fed
    `deep` and the fresh `conv_in` skip) and `conv_out`. This is the computation
    of LatentSync's `DeepCacheSDHelper` with `cache_branch_id=0`, without the
    motion modules that helper re-runs on cached inputs (whose outputs it then
    discards or recomputes identically). Mutable: the owner flips `refresh`.
    """

    refresh: bool = True
    deep: torch.Tensor | None = None  # (B, C0', F, H, W) from the last refresh


class UNet3DConditionModel(nn.Module):
    """Predicts the noise of a chunk of face latents, conditioned on per-frame audio."""

    conv_in_padded: torch.Tensor | None
    conv_out_padded: torch.Tensor | None
    conv_out_bias_padded: torch.Tensor | None

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        temb = config.time_embed_dim
        groups, eps = config.norm_num_groups, config.norm_eps
        audio_dim = config.cross_attention_dim if config.add_audio_layer else None
        motion = config.motion_module_kwargs if config.use_motion_module else None

        self.conv_in = FrameConv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            has_motion = 2**i in config.motion_module_resolutions
            self.down_blocks.append(
                DownBlock3D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    temb,
                    layers=config.layers_per_block,
                    groups=groups,
                    eps=eps,
                    heads=config.attention_head_dim if block_type == CROSS_ATTN_DOWN else None,
                    audio_dim=audio_dim,
                    motion=motion if has_motion and not config.motion_module_decoder_only else None,
                    add_downsample=i < n - 1,
                    downsample_padding=config.downsample_padding,
                )
            )

        self.mid_block = MidBlock3D(
            channels[-1],
            temb,
            groups=groups,
            eps=eps,
            heads=config.attention_head_dim,
            audio_dim=audio_dim,
            motion=motion if config.motion_module_mid_block else None,
            output_scale_factor=config.mid_block_scale_factor,
        )

        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            level = n - 1 - i  # resolution level this block works at, 2**level downsampling
            self.up_blocks.append(
                UpBlock3D(
                    channels[max(level - 1, 0)],
                    channels[level],
                    channels[min(level + 1, n - 1)],
                    temb,
                    layers=config.layers_per_block + 1,
                    groups=groups,
                    eps=eps,
                    heads=config.attention_head_dim if block_type == CROSS_ATTN_UP else None,
                    audio_dim=audio_dim,
                    motion=motion if 2**level in config.motion_module_resolutions else None,
                    add_upsample=i < n - 1,
                )
            )

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = FrameConv2d(channels[0], config.out_channels, kernel_size=3, padding=1)
        self.channels_last = False
        self.temporal_attention = "sdpa"
        self.pointwise_linear = False
        self.packed_qkv = False
        self.padded_convs = False
        self.fused_geglu = False
        # padded_convs: zero-padded copies of conv_in's and conv_out's weights (buffers,
        # not in the state dict)
        self.register_buffer("conv_in_padded", None, persistent=False)
        self.register_buffer("conv_out_padded", None, persistent=False)
        self.register_buffer("conv_out_bias_padded", None, persistent=False)
        # timestep_table: (TIME_TABLE_STEPS, sum of the resnets' C_out), not in the state dict
        self.time_table: torch.Tensor | None
        self.register_buffer("time_table", None, persistent=False)
        # Bumped whenever set_kernels moves weights to new memory: CUDA graphs captured
        # before then read freed memory (GraphPredictor recaptures when it changes).
        self.weights_version = 0

    def set_kernels(self, *, channels_last: bool | None = None,
                    temporal_attention: str | None = None,
                    pointwise_linear: bool | None = None,
                    packed_qkv: bool | None = None,
                    padded_convs: bool | None = None,
                    fused_geglu: bool | None = None,
                    timestep_table: bool | None = None) -> UNet3DConditionModel:
        """Execution choices that leave the weights' values and the math unchanged.

        channels_last: activations as (B, F, H, W, C) in memory (`channels_last_3d` of
        the 5D tensors; per-frame views are then channels-last images, the layout
        tensor-core convolutions run natively, and the token views of the spatial
        transformers need no copy) and the convolution weights channels-last (new
        tensors: `weights_version` counts such moves).
        temporal_attention: the motion modules' attention over frames: "sdpa" (fused
        kernels), "math" (`math_attention`: two batched matmuls) or "inline"
        (`inline_attention`: for compiled forwards only) or "triton" (one Triton kernel,
        `media.latentsync.frame_attention`; CUDA only).
        pointwise_linear: the 1x1 convolutions (the spatial transformers' projections,
        the resnets' shortcuts) as linear layers over the channel axis (`layers.pointwise`):
        one cuBLAS GEMM each on channels-last activations.
        packed_qkv: each self-attention's q, k and v projections as one GEMM of the three
        weights side by side (the cross-attentions' keys and values read other inputs).
        padded_convs: `conv_in` (13 input channels) and `conv_out` (4 output channels)
        with their thin side zero-padded to a multiple of 16, the width tensor-core
        convolution kernels take (derived copies of the weights: set it again after
        loading new weights).
        fused_geglu: each transformer block's feed-forward GEGLU projection as one GEMM with
        the gating in its epilogue (`media.latentsync.geglu`, a Triton kernel on CUDA; the
        reference computation elsewhere).
        timestep_table: every resnet's time projection, `time_emb_proj(silu(temb))`, for
        each integer timestep 0 .. TIME_TABLE_STEPS - 1, computed once into a table
        (TIME_TABLE_STEPS x the resnets' channels, about 40 MB in float16 at 256 px); a
        call then gathers its timesteps' rows (one kernel for about 25 small GEMMs a call).
        The samplers' timesteps are such integers; a timestep given as a number or a CPU
        tensor is checked. Derived from the weights: set it again after loading new ones.
        `accel.COMPILED_KERNELS` names the choices that paid off on an H100, and why the
        others did not. Returns self.
        """
        if channels_last is not None:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            moved = False
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    weight = module.weight.data.contiguous(memory_format=fmt)
                    if weight.data_ptr() != module.weight.data.data_ptr():
                        module.weight.data = weight
                        moved = True
            self.weights_version += moved
            self.channels_last = channels_last
        if temporal_attention is not None:
            if temporal_attention not in TEMPORAL_ATTENTION_KERNELS:
                raise ValueError(
                    f"temporal_attention must be one of {TEMPORAL_ATTENTION_KERNELS},"
                    f" got {temporal_attention!r}"
                )
            op = None
            if temporal_attention == "triton":
                from media.latentsync import frame_attention

                if not frame_attention.AVAILABLE:
                    raise ValueError("temporal_attention 'triton' needs Triton and a CUDA GPU")
                op = frame_attention.frame_attention
            for module in self.modules():
                if isinstance(module, TemporalAttention):
                    module.kernel = temporal_attention
                    module.fused_op = op
            self.temporal_attention = temporal_attention
        if pointwise_linear is not None:
            for module in self.modules():
                if isinstance(module, FrameConv2d) and module.is_pointwise():
                    module.as_linear = pointwise_linear
                elif isinstance(module, SpatialTransformer):
                    module.as_linear = pointwise_linear
            self.pointwise_linear = pointwise_linear
        if packed_qkv is not None:
            for module in self.modules():
                if isinstance(module, Attention):
                    module.packed = packed_qkv
            self.packed_qkv = packed_qkv
        if fused_geglu is not None:
            for module in self.modules():
                if isinstance(module, (BasicTransformerBlock, TemporalTransformerBlock)):
                    module.fused_geglu = fused_geglu
            self.fused_geglu = fused_geglu
        if timestep_table is not None:
            self._build_time_table(timestep_table)
        if padded_convs is not None or (channels_last is not None and self.padded_convs):
            # (again after a layout change: the padded copies take the weights' layout)
            self._pad_thin_convs(self.padded_convs if padded_convs is None else padded_convs)
        return self

    def kernels(self) -> dict[str, Any]:
        """The `set_kernels` choices in force (compiled artifacts depend on them)."""
        return {"channels_last": self.channels_last,
                "temporal_attention": self.temporal_attention,
                "pointwise_linear": self.pointwise_linear,
                "packed_qkv": self.packed_qkv,
                "padded_convs": self.padded_convs,
                "fused_geglu": self.fused_geglu,
                "timestep_table": self.time_table is not None}

    def _resnets(self) -> list[ResnetBlock3D]:
        return [m for m in self.modules() if isinstance(m, ResnetBlock3D)]

    @torch.no_grad()
    def _build_time_table(self, on: bool) -> None:
        if on or self.time_table is not None:
            self.weights_version += 1  # new (or freed) tensors: graphs must capture again
        resnets = self._resnets()
        if not on:
            self.time_table = None
            for block in resnets:
                block.time_columns = None
            return
        weight = self.time_embedding.linear_1.weight
        steps = torch.arange(TIME_TABLE_STEPS, device=weight.device)
        temb = F.silu(self.time_embedding(self.time_proj(steps).to(weight.dtype)))
        parts, start = [], 0
        for block in resnets:
            parts.append(block.time_emb_proj(temb))  # (steps, C_out)
            block.time_columns = (start, start + parts[-1].shape[1])
            start += parts[-1].shape[1]
        self.time_table = torch.cat(parts, dim=1)  # (steps, sum of C_out)

    def _pad_thin_convs(self, padded: bool) -> None:
        if padded or self.padded_convs:
            self.weights_version += 1  # new (or freed) tensors: graphs must capture again
        self.padded_convs = padded
        if not padded:
            self.conv_in_padded = self.conv_out_padded = self.conv_out_bias_padded = None
            return
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        w_in = self.conv_in.weight.detach()  # (C0, in, 3, 3)
        width = -(-w_in.shape[1] // 16) * 16
        padded_in = w_in.new_zeros(w_in.shape[0], width, *w_in.shape[2:])
        padded_in[:, : w_in.shape[1]] = w_in
        self.conv_in_padded = padded_in.contiguous(memory_format=fmt)
        w_out = self.conv_out.weight.detach()  # (out, C0, 3, 3)
        rows = -(-w_out.shape[0] // 16) * 16
        padded_out = w_out.new_zeros(rows, *w_out.shape[1:])
        padded_out[: w_out.shape[0]] = w_out
        self.conv_out_padded = padded_out.contiguous(memory_format=fmt)
        assert self.conv_out.bias is not None
        bias = self.conv_out.bias.detach()
        self.conv_out_bias_padded = torch.cat([bias, bias.new_zeros(rows - bias.shape[0])])

    def _conv_in(self, sample: torch.Tensor) -> torch.Tensor:
        # (B, in, F, H, W) -> (B, C0, F, H, W)
        weight = self.conv_in_padded
        if weight is None:
            x: torch.Tensor = self.conv_in(sample)
            return x
        extra = weight.shape[1] - sample.shape[1]
        sample = F.pad(sample, (0, 0, 0, 0, 0, 0, 0, extra))  # zero channels at the end
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last_3d)
        y = F.conv2d(frames_to_batch(sample), weight, self.conv_in.bias, padding=1)
        return batch_to_frames(y, sample.shape[2])

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        cache: DeepCacheState | None = None,
        guided: bool = False,
        halved: bool = False,
    ) -> torch.Tensor:
        """Predict noise.

        sample: (B, in_channels, F, H, W) latents; timestep: a scalar, (1,) or (B,)
        (pass a tensor when compiling: a Python number is baked into the graph);
        encoder_hidden_states: (B*F, 50, 384) audio features, batch-major (index b*F + f);
        cache: DeepCache state (see `DeepCacheState`); None runs the exact UNet.
        guided: the batch is a classifier-free-guidance pair, as the pipeline builds it:
        its two halves of `sample` are equal and the first half's audio rows are all
        zero (the caller's promise; nothing checks it). The shared part is then computed
        once: everything before the first cross-attention runs on one half, and each
        cross-attention of the unconditional half is its output projection's bias
        (all-zero features give zero keys and values: `to_k` and `to_v` have no bias).
        The result equals the plain forward's up to float reordering.
        halved (with guided): `sample` and `encoder_hidden_states` are already one copy of
        the pair and its conditional audio rows (B/2 items each), so nothing is halved
        inside: a compiler tracing a symbolic batch then only ever doubles it (halving a
        symbolic size made torch 2.11 break the graph).
        Returns (B, out_channels, F, H, W) (with halved: twice the rows given).
        """
        if halved and not guided:
            raise ValueError("halved inputs are one copy of a guidance pair: pass guided=True")
        self._check_inputs(sample, encoder_hidden_states, guided, halved)
        b = sample.shape[0] * (2 if halved else 1)
        audio = encoder_hidden_states
        if guided and not halved:  # one copy of the pair, and the conditional audio rows
            sample, audio = second_half(sample), second_half(audio)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # Time embedding. The sinusoid is float32; cast to the weights' dtype (fp16/bf16
        # weights would otherwise receive a float32 input).
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)  # (B,)
        temb: torch.Tensor
        if self.time_table is not None:  # every resnet's projection, gathered (B, sum C_out)
            _check_table_steps(timestep)
            temb = self.time_table[t.long()]
        else:
            t_emb = self.time_proj(t).to(self.time_embedding.linear_1.weight.dtype)  # (B, C0)
            temb = self.time_embedding(t_emb)  # (B, 4*C0)

        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last_3d)
        x = self._conv_in(sample)  # (B, C0, F, H, W); with guided (B/2, ...)
        k = self.config.layers_per_block + 1  # skips (and layers) of each up block
        last = self._last_up_block()  # full resolution; never upsamples
        if cache is not None and not cache.refresh:
            deep = self._cached_deep(cache, x, b)
            skip = torch.cat([x, x]) if guided else x
            x = last.layer(k - 1, deep, skip, temb, audio)  # the skip is conv_in's output
            return self._head(x)

        skips = [torch.cat([x, x]) if guided else x]
        for i, down in enumerate(self.down_blocks):
            # The first block turns one copy of the pair into both halves at its first
            # cross-attention.
            x, states = down(x, temb, audio, split=guided and i == 0)
            skips.extend(states)

        x = self.mid_block(x, temb, audio)  # (B, C_last, F, H/2^(n-1), W/2^(n-1))

        for up in self.up_blocks[:-1]:
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample to the next level's skip size (2x, or the odd size the down path had).
            out_size = (skips[-1].shape[-2], skips[-1].shape[-1])
            x = up(x, block_skips, temb, audio, out_size)  # (B, C, F, ...) one level up
        for i in range(k):  # the last up block, layer by layer; skips hold exactly its k
            if i == k - 1 and cache is not None:
                cache.deep = x  # (B, C0', F, H, W)
            x = last.layer(i, x, skips[-1 - i], temb, audio)
        return self._head(x)

    def _last_up_block(self) -> UpBlock3D:
        block = self.up_blocks[-1]
        assert isinstance(block, UpBlock3D)
        return block

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C0, F, H, W) -> (B, out_channels, F, H, W)
        x = F.silu(self.conv_norm_out(x))
        weight = self.conv_out_padded
        if weight is None:
            out: torch.Tensor = self.conv_out(x)
            return out
        y = F.conv2d(frames_to_batch(x), weight, self.conv_out_bias_padded, padding=1)
        return batch_to_frames(y, x.shape[2])[:, : self.conv_out.out_channels]

    @staticmethod
    def _cached_deep(cache: DeepCacheState, x: torch.Tensor, rows: int) -> torch.Tensor:
        deep = cache.deep
        if deep is None:
            raise ValueError("DeepCache: a step without refresh needs an earlier refresh step")
        if deep.shape[0] != rows or deep.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"DeepCache: cached features {tuple(deep.shape)} do not fit input {tuple(x.shape)}"
            )
        return deep

    def _check_inputs(self, sample: torch.Tensor, audio: torch.Tensor, guided: bool,
                      halved: bool = False) -> None:
        cfg = self.config
        if sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must be (B, {cfg.in_channels}, F, H, W), got {tuple(sample.shape)}"
            )
        b, _, f = sample.shape[:3]
        if guided and ((not halved and b % 2) or not cfg.add_audio_layer):
            raise ValueError(
                "guided needs an even batch (the unconditional half, then the conditional)"
                f" and a UNet with audio layers; got B={b}, audio layers {cfg.add_audio_layer}"
            )
        if audio.ndim != 3 or audio.shape[0] != b * f or audio.shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (B*F={b * f}, S, {cfg.cross_attention_dim}),"
                f" got {tuple(audio.shape)}"
            )
        max_frames = cfg.motion_module_kwargs.temporal_position_encoding_max_len
        if cfg.use_motion_module and f > max_frames:
            raise ValueError(f"{f} frames exceed the motion modules' {max_frames} positions")


def _check_table_steps(timestep: torch.Tensor | int | float) -> None:
    """The timestep table covers integers 0 .. TIME_TABLE_STEPS - 1: a timestep on the
    host is checked (one on the device is not: that would wait for it)."""
    if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
        return
    values = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
    if ((values != values.round()) | (values < 0) | (values >= TIME_TABLE_STEPS)).any():
        raise ValueError(f"timestep {values.tolist()} is not in the timestep table (integers"
                         f" 0 to {TIME_TABLE_STEPS - 1}); set_kernels(timestep_table=False)")
