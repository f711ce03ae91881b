"""The feed-forward's GEGLU projection as one GEMM with the gating in its epilogue: the
module's computation on the CPU, the Triton kernel against it in Triton's interpreter
and on CUDA (eager, compiled, in the UNet)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import FeedForward

from media.latentsync import geglu
from media.latentsync.verify import relative_error
from tests.latentsyncutil import assert_cuda_kernels_compute_the_default_unet

pytestmark = [pytest.mark.unit]
CUDA_TRITON = pytest.mark.skipif(not geglu.AVAILABLE, reason="needs Triton and a CUDA GPU")
COMPILER_WARNINGS = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def test_fused_feed_forward_is_the_modules_computation() -> None:
    """`feed_forward(fused=True)` (the op, or its reference where the op is absent) gives
    diffusers' FeedForward output, with its own weights."""
    torch.manual_seed(0)
    ff = FeedForward(32, activation_fn="geglu").eval()
    x = torch.randn(3, 10, 32)
    with torch.inference_mode():
        expected = ff(x)
        assert torch.equal(geglu.feed_forward(ff, x, fused=False), expected)
        got = geglu.feed_forward(ff, x, fused=True)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-6


INTERPRETER_SCRIPT = """
import torch, triton
from media.latentsync import geglu
torch.manual_seed(0)
for m, k, n, block in [(256, 64, 128, 64), (200, 96, 80, 32)]:
    x, w, b = torch.randn(m, k), torch.randn(2 * n, k) * 0.1, torch.randn(2 * n)
    out = torch.empty(m, n)
    grid = (triton.cdiv(m, block) * triton.cdiv(n, block),)
    geglu._geglu_tile[grid](x, w, b, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                            BLOCK_M=block, BLOCK_N=block, BLOCK_K=32, GROUP_M=2, IEEE=True)
    ref = geglu.geglu_reference(x, w, b)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, (m, k, n, err)
print("ok")
"""


@pytest.mark.skipif(not geglu.KERNEL_DEFINED,
                    reason="needs Triton (its interpreter runs on CPU)")
def test_kernel_in_triton_interpreter() -> None:
    """Tiles that do not divide the sizes (masked rows, columns and K), grouped order."""
    from tests.tritonutil import run_interpreted

    assert run_interpreted(INTERPRETER_SCRIPT) == "ok"


@pytest.mark.gpu
@CUDA_TRITON
@COMPILER_WARNINGS
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "width"), [(4096, 320), (1000, 640), (512, 1280)])
def test_kernel_matches_the_module(dtype: torch.dtype, rows: int, width: int) -> None:
    """The UNet's widths (K = 320 / 640 / 1280, N = 4K), a row count no tile divides;
    eager and compiled."""
    torch.manual_seed(rows + width)
    ff = FeedForward(width, activation_fn="geglu").to("cuda", dtype).eval()
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    with torch.inference_mode():
        expected = ff.net[0](x).float()
        proj = ff.net[0].proj
        got = geglu.geglu_linear(x, proj.weight, proj.bias)
        assert got.shape == (rows, 4 * width) and got.dtype == dtype
        tolerance = 2e-3 if dtype == torch.float16 else 1e-5
        assert relative_error(got.float(), expected) < tolerance, "eager"
        compiled = torch.compile(lambda t: geglu.feed_forward(ff, t, fused=True),
                                 fullgraph=True)
        try:
            out = compiled(x).float()
        finally:
            torch._dynamo.reset()
        assert relative_error(out, ff(x).float()) < tolerance, "compiled"


@pytest.mark.gpu
@CUDA_TRITON
@COMPILER_WARNINGS
def test_unet_with_every_choice_computes_the_default_unet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fused GEGLU with the other execution choices (packed q/k/v, padded thin
    convolutions, the frames' attention kernel, channels-last), eager and compiled."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions
    assert_cuda_kernels_compute_the_default_unet(
        channels_last=True, temporal_attention="triton", packed_qkv=True,
        padded_convs=True, fused_geglu=True)
