"""The motion modules' attention over frames as one Triton kernel: the reference
computation on the CPU, the kernel against it on CUDA (eager, compiled, in the UNet)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from media.latentsync import frame_attention as fa
from media.latentsync.verify import relative_error
from tests.latentsyncutil import tiny_unet_for_runners

pytestmark = [pytest.mark.unit]
CUDA_TRITON = pytest.mark.skipif(not fa.AVAILABLE, reason="needs Triton and a CUDA GPU")


def projections(n: int, s: int, c: int, device: str, dtype: torch.dtype
                ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device).manual_seed(n + s + c)
    return tuple(torch.randn(n, s, c, generator=gen, device=device, dtype=dtype)
                 for _ in range(3))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    n, s, c = q.shape
    split = [t.view(n, s, heads, c // heads).transpose(1, 2).float() for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(n, s, c)


def test_reference_is_multi_head_attention_with_heads_side_by_side() -> None:
    q, k, v = projections(6, 16, 64, "cpu", torch.float32)
    out = fa.frame_attention_reference(q, k, v, heads=8)
    assert out.shape == q.shape
    assert relative_error(out, sdpa(q, k, v, 8)) < 1e-6
    # Each head reads only its own channels.
    v2 = v.clone()
    v2[..., 8:] = 0
    assert torch.equal(fa.frame_attention_reference(q, k, v2, 8)[..., :8], out[..., :8])


@pytest.mark.gpu
@CUDA_TRITON
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("frames", "width"), [(16, 320), (16, 640), (16, 1280), (12, 320)])
def test_kernel_matches_attention(dtype: torch.dtype, frames: int, width: int) -> None:
    """Head widths 40 / 80 / 160 (the UNet's levels, padded to 64 / 128 / 256 in the
    kernel), and a sequence that is not a power of two (padded keys masked)."""
    q, k, v = projections(257, frames, width, "cuda", dtype)
    expected = sdpa(q, k, v, 8)
    got = fa.frame_attention(q, k, v, 8)
    assert got.shape == q.shape and got.dtype == dtype
    assert relative_error(got.float(), expected) < (2e-3 if dtype == torch.float16 else 1e-5)
    compiled = torch.compile(lambda *t: fa.frame_attention(*t, 8), fullgraph=True)
    assert relative_error(compiled(q, k, v).float(), expected) < (
        2e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.gpu
@CUDA_TRITON
def test_unet_with_the_kernel_computes_the_default_unet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions
    unet = tiny_unet_for_runners().cuda()
    gen = torch.Generator("cuda").manual_seed(0)
    sample = torch.randn(2, 13, 16, 8, 8, generator=gen, device="cuda")
    audio = torch.randn(32, 50, 384, generator=gen, device="cuda")
    with torch.inference_mode():
        expected = unet(sample, 500, audio)
        unet.set_kernels(channels_last=True, temporal_attention="triton")
        got = unet(sample, 500, audio)
        compiled = torch.compile(unet)(sample, torch.tensor([500], device="cuda"), audio)
    torch._dynamo.reset()
    assert relative_error(got, expected) < 1e-4
    assert relative_error(compiled, expected) < 1e-4
