"""Primitives shared by the UNet's spatial and temporal parts.

Video tensors are `(B, C, F, H, W)` between modules, as in LatentSync. Spatial
layers treat frames as batch items: `(B*F, C, H, W)`, batch-major (index
`b*F + f`), which is also the layout of the audio conditioning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W)."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W) (a view)."""
    bf, c, h, w = x.shape
    return x.view(bf // num_frames, num_frames, c, h, w).transpose(1, 2)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2N, ...) -> the first and the second (N, ...) along dim 0 (views). Written as a
    view and an index, not slices: with a symbolic N a slice's bounds need guards."""
    pair = x.view(2, -1, *x.shape[1:])
    return pair[0], pair[1]


def second_half(x: torch.Tensor) -> torch.Tensor:
    """(2N, ...) -> (N, ...), the second half along dim 0 (a view)."""
    return halves(x)[1]


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as the linear layer it is, over the last axis: (..., C_in) ->
    (..., C_out). On channels-last activations the channel axis is already innermost, so
    this is one GEMM with no copies. (Alone, cuBLAS ran these shapes at 2-3x cuDNN's 1x1
    speed on an H100; inside the compiled UNet it did not pay: `accel.COMPILED_KERNELS`.)"""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class FrameConv2d(nn.Conv2d):
    """A 2D convolution applied to every frame of a video; weights keep the 2D shape.

    `as_linear` (a 1x1 convolution only; see UNet.set_kernels): computed by `pointwise`
    on the channels-last view instead of as a convolution. Same math."""

    as_linear = False  # an instance attribute overrides it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, F, H, W) -> (B, C_out, F, H', W')
        if self.as_linear:
            return pointwise(self, x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        y = super().forward(frames_to_batch(x))
        return batch_to_frames(y, x.shape[2])

    def is_pointwise(self) -> bool:
        """A 1x1 convolution with stride 1, no padding, one group: a linear layer."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1)
                and self.padding in ((0, 0), "valid") and self.groups == 1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matmuls, the softmax in float32.

    (N, heads, S, d), (N, heads, S_kv, d) x2 -> (N, heads, S, d). For short
    sequences (the motion modules' 16 frames) where a fused kernel's query tile
    (64-128 rows) is mostly padding and a compiler can fuse the softmax instead.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (N, heads, S, S_kv)
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def inline_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention as products and sums over broadcast axes, in float32.

    (N, heads, S, d), (N, heads, S_kv, d) x2 -> (N, heads, S, d). Only for a compiler:
    eager, it would materialise (N, heads, S, S_kv, d) products. Inductor turns each
    sum into a reduction kernel with the products computed inline. Measured on an H100
    (bench/results/unet_parts_h100.md) those reductions are slower than
    `math_attention`'s small matmuls (242 against 197 ms a step); kept for the benchmark.
    """
    scale = q.shape[-1] ** -0.5
    scores = (q.unsqueeze(-2).float() * k.unsqueeze(-3).float()).sum(-1) * scale  # (N,h,S,S_kv)
    probs = scores.softmax(dim=-1)
    out: torch.Tensor = (probs.unsqueeze(-1) * v.unsqueeze(-3).float()).sum(-2)  # (N,h,S,d)
    return out.to(v.dtype)


class Attention(nn.Module):
    """Multi-head attention without q/k/v bias, LatentSync's (and diffusers') key layout.

    Self-attention when `context` is None, cross-attention otherwise. Uses
    `F.scaled_dot_product_attention`, which picks a fused (flash / memory
    efficient) kernel on GPU, or `math_attention` / `inline_attention` /
    `frame_attention.frame_attention` (one Triton kernel) when `kernel` is "math" /
    "inline" / "triton".
    """

    kernel = "sdpa"  # an instance attribute overrides it (see UNet.set_kernels)
    # kernel "triton": (N, S, C) projections x3, heads -> (N, S, C), set with the kernel
    fused_op: Any = None
    # Self-attention only: q, k and v as one GEMM (see UNet.set_kernels).
    packed = False  # an instance attribute overrides it

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} does not divide by {heads} heads")
        self.heads = heads
        self.self_attention = context_dim is None
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        # A list so the key is `to_out.0` (LatentSync's `to_out.1` is a parameterless dropout).
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def _projections(self, x: torch.Tensor, context: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (N, S, C); context: (N, S_ctx, C_ctx) or None -> q (N, S, C), k and v (N, S_ctx, C)
        if context is None and self.packed and self.self_attention:
            # One GEMM of the three weights side by side: the (3C, C) concatenation costs
            # 3C^2 copied values a call, far less than the two GEMM launches, reads of x
            # and tails it saves, and the parameters stay the checkpoint's own tensors.
            weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, weight).chunk(3, dim=-1)  # views of one (N, S, 3C)
            return q, k, v
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, S, C); context: (N, S_ctx, C_ctx) or None -> (N, S, C)
        q, k, v = self._projections(x, context)
        if self.kernel == "triton":  # heads stay side by side: no split or merge copies
            fused: torch.Tensor = self.fused_op(q, k, v, self.heads)
            out_fused: torch.Tensor = self.to_out[0](fused)
            return out_fused
        q = self._split_heads(q)  # (N, heads, S, C/heads)
        k = self._split_heads(k)  # (N, heads, S_ctx, C/heads)
        v = self._split_heads(v)
        if self.kernel == "math":
            out = math_attention(q, k, v)  # (N, heads, S, C/heads)
        elif self.kernel == "inline":
            out = inline_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)  # (N, S, C)
        projected: torch.Tensor = self.to_out[0](out)
        return projected

    def zero_context_output(self) -> torch.Tensor:
        """(C,) what every query's output is when the context is all zeros: `to_k` and
        `to_v` have no bias, so keys and values are zero, the attended value is 0 and
        the output projection leaves its bias."""
        linear = self.to_out[0]
        assert isinstance(linear, nn.Linear) and linear.bias is not None
        return linear.bias

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (N, S, C) -> (N, heads, S, C/heads)
        n, s, c = x.shape
        return x.view(n, s, self.heads, c // self.heads).transpose(1, 2)
