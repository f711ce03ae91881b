"""FP8 (e4m3) matrix multiplies for the UNet's linear layers: an approximation, opt-in.

Hopper and Ada GPUs multiply FP8 matrices at twice their fp16 rate. `fp8_linears`
swaps each `nn.Linear` whose sizes suit `torch._scaled_mm` (both multiples of 16)
for an `Fp8Linear`: the weight is quantised once, per output channel, and each
call quantises its input per row (per token) from the row's own absolute maximum,
multiplies in FP8 with fp32 accumulation, rescales and adds the bias in the
output dtype. Row-wise scales keep one outlier token from flattening the others.

e4m3 keeps 3 mantissa bits, so every product carries up to about 6 % relative
rounding: the output differs from the fp16 UNet's, and by how much is measured
(`bench/latentsync_bench.py --sections tune`), not assumed. Convolutions, norms
and attention stay in half precision. The checkpoint's key layout is untouched:
swap after loading the weights.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ALIGN = 16  # _scaled_mm's requirement on both matrix sizes
# Row-wise scaled FP8 GEMMs write bfloat16 (cuBLASLt's only row-wise output type).
ROWWISE_OUT = torch.bfloat16


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or newer."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> FP8 (M, K) and fp32 scales (M, 1) with x ~= q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """`y = x W^T + b` with W and x in FP8, row-wise scaled; same shapes as the Linear."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % ALIGN or self.out_features % ALIGN:
            raise ValueError(
                f"FP8 linear needs both sizes a multiple of {ALIGN}, got"
                f" {self.in_features} -> {self.out_features}"
            )
        weight = linear.weight.detach()
        q, scale = _quantize_rows(weight)  # per output channel
        self.register_buffer("weight_fp8", q)  # (N, K)
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, N)
        bias = linear.bias.detach().to(ROWWISE_OUT) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.weight_fp8: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = _quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(
            q,
            self.weight_fp8.t(),  # column-major (K, N), as _scaled_mm wants
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=ROWWISE_OUT,
        )
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


# Time-embedding layers see one row per video: FP8 buys nothing there, and the UNet
# reads its compute dtype from `time_embedding.linear_1.weight`.
SKIP = ("time_embedding", "time_emb_proj")


def fp8_linears(model: nn.Module) -> int:
    """Swap, in place, every suitable `nn.Linear` under `model`; returns how many."""
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            qualified = f"{parent_name}.{name}" if parent_name else name
            if (
                type(child) is nn.Linear
                and not any(part in qualified for part in SKIP)
                and child.in_features % ALIGN == 0
                and child.out_features % ALIGN == 0
            ):
                setattr(parent, name, Fp8Linear(child))
                swapped += 1
    return swapped
