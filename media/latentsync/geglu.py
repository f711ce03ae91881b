# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton's decorators are untyped, and a kernel's arguments are pointers and constexprs.)
"""The feed-forward's GEGLU projection as one GEMM with the gating in its epilogue (CUDA).

Every transformer block of the UNet (spatial and temporal) ends in diffusers'
`FeedForward(dim, activation_fn="geglu")`: `proj` maps C channels to 8C, the halves
`x, gate` give `x * gelu(gate)` (4C), then a linear layer maps back to C. Run as a
library GEMM, the 8C-wide product goes to memory and an elementwise kernel reads it
back to write the 4C-wide result: at 32 x 32 latents and 8 chunks, 1.3 GB written
and read again per block, about 0.66 ms, ten times a UNet call.

`geglu_linear(x, weight, bias)` computes both halves' tiles of the product in one
program (two accumulators over the same input tile), adds the bias and applies
`x * gelu(gate)` (exact erf GELU, float32) before the only store: the 8C-wide product
never exists. It is a `torch.library.triton_op`, so `torch.compile` and `torch.export`
see the kernel; its CPU kernel is the reference computation (`geglu_reference`).
Without Triton or CUDA the op is absent (`AVAILABLE`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton
from torch.utils._triton import has_triton


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU: (..., K) x (2N, K) weight, (2N,) bias -> (..., N)."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


AVAILABLE = has_triton()
geglu_linear: Any = None
# The kernel is defined wherever Triton imports (its interpreter, TRITON_INTERPRET=1,
# runs it on CPU tensors); the op only where it can run on a GPU.
KERNEL_DEFINED = AVAILABLE or importlib.util.find_spec("triton") is not None

if KERNEL_DEFINED:
    import triton
    import triton.language as tl

    # Tile shapes for the UNet's products (M = tokens, K = 320..1280, N = 4K): the
    # product of both halves is a 128 x 256 tile, cuBLAS's choice for the plain GEMM.
    CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8},
                      num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=8, num_stages=3),
    ]

    @triton.jit
    def _geglu_tile(
        a_ptr, w_ptr, b_ptr, o_ptr, M, N, K, stride_am, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, IEEE: tl.constexpr,
    ):
        # Grouped order: GROUP_M row tiles share their column tiles' weights in L2.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # of each half
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < N
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :]
        # (BLOCK_K, BLOCK_N) tiles of W^T: the value half's rows, and the gate half's N on
        wx_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
        wg_ptrs = wx_ptrs + N * stride_wn
        acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = ks < K - k
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wx = tl.load(wx_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:  # float32 inputs: no TF32 rounding
                acc_x = tl.dot(a, wx, acc_x, input_precision="ieee")
                acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
            else:
                acc_x = tl.dot(a, wx, acc_x)
                acc_g = tl.dot(a, wg, acc_g)
            a_ptrs += BLOCK_K
            wx_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
        bx = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        bg = tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)
        value = acc_x + bx[None, :]
        gate = acc_g + bg[None, :]
        out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        o_ptrs = o_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    _geglu_kernel = triton.autotune(configs=CONFIGS, key=["M", "N", "K"])(_geglu_tile)

if AVAILABLE:

    @triton_op("latentsync::geglu_linear", mutates_args=())
    def _geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        n = weight.shape[0] // 2
        a = x.reshape(-1, k)
        if a.stride(-1) != 1:
            a = a.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        m = a.shape[0]
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)

        def grid(meta: dict[str, int]) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(_geglu_kernel)[grid](
            a, w, bias, out, m, n, k, a.stride(0), w.stride(0), out.stride(0),
            IEEE=x.dtype == torch.float32,
        )
        return out.view(*x.shape[:-1], n)

    @_geglu_linear.register_kernel("cpu")
    def _geglu_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                          ) -> torch.Tensor:
        return geglu_reference(x, weight, bias)

    geglu_linear = _geglu_linear


def feed_forward(ff: torch.nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """diffusers' `FeedForward(activation_fn="geglu")` on x (..., C) -> (..., C); fused: its
    GEGLU projection through `geglu_linear` (where the op is absent, `geglu_reference`:
    the same computation as the module's)."""
    if not fused:
        out: torch.Tensor = ff(x)
        return out
    net = ff.net
    assert isinstance(net, torch.nn.ModuleList)
    proj = net[0].proj
    assert isinstance(proj, torch.nn.Linear) and proj.bias is not None
    op = geglu_linear if geglu_linear is not None else geglu_reference
    hidden: torch.Tensor = op(x, proj.weight, proj.bias)
    for module in list(net)[1:]:  # dropout (inference: identity), the output linear
        hidden = module(hidden)
    return hidden
