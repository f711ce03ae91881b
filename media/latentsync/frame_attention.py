# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton's decorators are untyped, and a kernel's arguments are pointers and constexprs.)
"""The motion modules' attention over a chunk's frames as one Triton kernel (CUDA).

Every pixel of every video attends over its 16 frames: hundreds of thousands of
16 x 16 attentions a UNet call, each with 40-160 channels a head. A fused SDPA
kernel tiles 64-128 queries and gets 16; two batched matmuls (`math_attention`)
pass the scores through memory between them. Here one program takes one pixel's
one head: it loads the 16 query, key and value rows, computes the scores, the
float32 softmax and the weighted sum on chip, and stores the 16 output rows.

`frame_attention(q, k, v, heads)` takes the projections as they come from the
linear layers, (N, S, C) with heads side by side in C, and returns (N, S, C):
no head split or merge copies. It is a `torch.library.triton_op`, so
`torch.compile` and `torch.export` see the kernel; its CPU kernel is the
reference computation. Without Triton or CUDA the op is absent (`AVAILABLE`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch.library import triton_op, wrap_triton
from torch.utils._triton import has_triton

from media.latentsync.layers import math_attention


def frame_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    """(N, S, C) x3 -> (N, S, C): split heads, `math_attention`, merge heads."""
    n, s, c = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, s, heads, c // heads).transpose(1, 2)

    return math_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(n, s, c)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot needs >= 16 on every side


AVAILABLE = has_triton()
frame_attention: Any = None
# The kernel is defined wherever Triton imports (its interpreter, TRITON_INTERPRET=1,
# runs it on CPU tensors); the op only where it can run on a GPU.
KERNEL_DEFINED = AVAILABLE or importlib.util.find_spec("triton") is not None

if KERNEL_DEFINED:
    import triton
    import triton.language as tl

    @triton.jit
    def _frame_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, seq, head_dim, width, in_n, in_s,
        HEADS: tl.constexpr, S: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program per (item, head), heads fastest: the programs of one item run side
        # by side and read its rows' neighbouring head slices together.
        pid = tl.program_id(0).to(tl.int64)
        n = pid // HEADS
        h = pid % HEADS
        rows = tl.arange(0, S)
        cols = tl.arange(0, D)
        within = h * head_dim + cols[None, :]
        inputs = n * in_n + rows[:, None] * in_s + within  # q, k, v share their strides
        offsets = n * seq * width + rows[:, None] * width + within  # the output: contiguous
        mask = (rows[:, None] < seq) & (cols[None, :] < head_dim)
        q = tl.load(q_ptr + inputs, mask=mask, other=0.0)
        k = tl.load(k_ptr + inputs, mask=mask, other=0.0)
        v = tl.load(v_ptr + inputs, mask=mask, other=0.0)
        if IEEE:  # float32 inputs: no TF32 rounding
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * SCALE  # a constexpr: float32 (a float argument compiled by
        # Inductor would be float64, and symbolic under dynamic shapes)
        scores = tl.where(rows[None, :] < seq, scores, float("-inf"))  # padded keys
        scores = scores - tl.max(scores, axis=1)[:, None]
        weights = tl.exp(scores)
        weights = weights / tl.sum(weights, axis=1)[:, None]
        if IEEE:
            out = tl.dot(weights, v, input_precision="ieee")
        else:
            out = tl.dot(weights.to(v.dtype), v)
        tl.store(o_ptr + offsets, out.to(o_ptr.dtype.element_ty), mask=mask)

if AVAILABLE:

    @triton_op("latentsync::frame_attention", mutates_args=())
    def _frame_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
    ) -> torch.Tensor:
        # Views with unit channel stride and shared strides (the packed projections'
        # chunks) are read in place; anything else is made contiguous first.
        if q.stride(-1) != 1 or not q.stride() == k.stride() == v.stride():
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n, s, c = q.shape
        d = int(c // heads)  # static per layer (a symbolic width is specialised here)
        out = torch.empty((n, s, c), dtype=q.dtype, device=q.device)
        block_d = _pow2(d)
        wrap_triton(_frame_attention_kernel)[(n * heads,)](
            q, k, v, out, s, d, c, q.stride(0), q.stride(1),
            HEADS=heads, S=_pow2(int(s)), D=block_d, SCALE=d**-0.5,
            IEEE=q.dtype == torch.float32,
            num_warps=1 if block_d <= 64 else 2 if block_d <= 128 else 4,
        )
        return out

    @_frame_attention.register_kernel("cpu")
    def _frame_attention_cpu(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
    ) -> torch.Tensor:
        return frame_attention_reference(q, k, v, heads)

    frame_attention = _frame_attention
