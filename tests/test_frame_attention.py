"""The motion modules' attention over frames as one Triton kernel: the reference
computation on the CPU, the kernel against it on CUDA (eager, compiled, in the UNet)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from media.latentsync import frame_attention as fa
from media.latentsync.accel import COMPILED_KERNELS
from media.latentsync.verify import relative_error
from tests.latentsyncutil import (
    assert_cuda_kernels_compute_the_default_unet,
    tiny_unet_for_runners,
)

pytestmark = [pytest.mark.unit]
CUDA_TRITON = pytest.mark.skipif(not fa.AVAILABLE, reason="needs Triton and a CUDA GPU")
# torch.compile and Triton warn about their own APIs (the suite turns warnings into errors).
COMPILER_WARNINGS = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def projections(n: int, s: int, c: int, device: str, dtype: torch.dtype
                ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device).manual_seed(n + s + c)
    return tuple(torch.randn(n, s, c, generator=gen, device=device, dtype=dtype)
                 for _ in range(3))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    n, s, c = q.shape
    qh, kh, vh = (t.view(n, s, heads, c // heads).transpose(1, 2).float() for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(n, s, c)


def test_the_triton_kernel_is_a_config_choice_that_needs_triton() -> None:
    """Compiled forwards on CUDA use the kernel where Triton is installed ("auto", the
    default) or where the config asks for it ("triton"), the matmul form otherwise or
    when asked ("matmul"); asking for the kernel where Triton is missing is a clear
    error, not a crash at the first chunk."""
    from agent.config import LatentSyncConfig
    from agent.errors import ConfigError
    from media.latentsync.renderer import compiled_kernels
    from tests.latentsyncutil import tiny_models

    assert LatentSyncConfig().frame_attention == "auto"
    models = tiny_models()  # CPU: compiled forwards keep the default kernels there
    assert compiled_kernels(LatentSyncConfig(frame_attention="triton"), models) is None
    unet = tiny_unet_for_runners()
    cuda_models = type("Models", (), {"device": torch.device("cuda")})()
    if not fa.AVAILABLE:
        with pytest.raises(ValueError, match="needs Triton and a CUDA GPU"):
            unet.set_kernels(temporal_attention="triton")
        with pytest.raises(ConfigError, match="frame_attention: 'triton' needs Triton"):
            compiled_kernels(LatentSyncConfig(frame_attention="triton"), cuda_models)
        assert compiled_kernels(LatentSyncConfig(frame_attention="auto"), cuda_models) == {
            **COMPILED_KERNELS, "temporal_attention": "math"}  # auto, without Triton
    else:
        assert compiled_kernels(LatentSyncConfig(frame_attention="auto"), cuda_models) == {
            **COMPILED_KERNELS, "temporal_attention": "triton"}
    assert compiled_kernels(LatentSyncConfig(), cuda_models) == compiled_kernels(
        LatentSyncConfig(frame_attention="auto"), cuda_models)
    assert compiled_kernels(LatentSyncConfig(frame_attention="matmul"), cuda_models) == {
        **COMPILED_KERNELS, "temporal_attention": "math"}


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
@COMPILER_WARNINGS
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("frames", "width"), [(16, 320), (16, 640), (16, 1280), (12, 320)])
def test_kernel_matches_attention(dtype: torch.dtype, frames: int, width: int) -> None:
    """Head widths 40 / 80 / 160 (the UNet's levels, padded to 64 / 128 / 256 in the
    kernel), and a sequence that is not a power of two (padded keys masked)."""
    q, k, v = projections(257, frames, width, "cuda", dtype)
    expected = sdpa(q, k, v, 8)
    got = fa.frame_attention(q, k, v, 8)
    assert got.shape == q.shape and got.dtype == dtype
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    assert relative_error(got.float(), expected) < tolerance, "eager"
    compiled = torch.compile(lambda *t: fa.frame_attention(*t, 8), fullgraph=True)
    try:
        assert relative_error(compiled(q, k, v).float(), expected) < tolerance, "compiled"
    finally:
        torch._dynamo.reset()  # each case compiles afresh (the lambda's code is shared)


@pytest.mark.gpu
@CUDA_TRITON
@COMPILER_WARNINGS
def test_kernel_under_dynamic_shapes() -> None:
    """Compiled with symbolic sizes (a renderer marks the batch dynamic): one graph serves
    every number of pixels, the head width specialised."""
    compiled = torch.compile(lambda *t: fa.frame_attention(*t, 8), fullgraph=True,
                             dynamic=True)
    try:
        for n in (64, 200):
            q, k, v = projections(n, 16, 640, "cuda", torch.float16)
            got = compiled(q, k, v)
            assert relative_error(got.float(), sdpa(q, k, v, 8)) < 2e-3, n
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@CUDA_TRITON
@COMPILER_WARNINGS
def test_unet_with_the_kernel_computes_the_default_unet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions
    assert_cuda_kernels_compute_the_default_unet(
        channels_last=True, temporal_attention="triton")


@pytest.mark.gpu
@CUDA_TRITON
@COMPILER_WARNINGS
def test_kernel_reads_packed_projections_in_place() -> None:
    """The packed q/k/v projection (`Attention.pack_projections`) gives three strided
    views of one (N, S, 3C) tensor: the kernel reads them where they are, eager and
    compiled."""
    qkv = torch.randn(300, 16, 3 * 640, device="cuda", dtype=torch.float16)
    q, k, v = qkv.chunk(3, dim=-1)
    assert not q.is_contiguous()
    expected = sdpa(q.contiguous(), k.contiguous(), v.contiguous(), 8)
    assert relative_error(fa.frame_attention(q, k, v, 8).float(), expected) < 2e-3
    compiled = torch.compile(lambda t: fa.frame_attention(*t.chunk(3, dim=-1), 8),
                             fullgraph=True)
    try:
        assert relative_error(compiled(qkv).float(), expected) < 2e-3
    finally:
        torch._dynamo.reset()


INTERPRETER_SCRIPT = """
import torch
from media.latentsync import frame_attention as fa
torch.manual_seed(0)
for heads, c, s in [(8, 320, 16), (2, 64, 12)]:
    qkv = torch.randn(5, s, 3 * c)
    q, k, v = qkv.chunk(3, -1)
    out = torch.empty(5, s, c)
    d = c // heads
    fa._frame_attention_kernel[(5 * heads,)](
        q, k, v, out, s, d, c, q.stride(0), q.stride(1), HEADS=heads, S=fa._pow2(s),
        D=fa._pow2(d), SCALE=d**-0.5, IEEE=True)
    err = (out - fa.frame_attention_reference(q, k, v, heads)).abs().max().item()
    assert err < 1e-5, (heads, c, s, err)
print("ok")
"""


@pytest.mark.skipif(not fa.KERNEL_DEFINED, reason="needs Triton (its interpreter runs on CPU)")
def test_kernel_in_triton_interpreter() -> None:
    """Where Triton is installed without a GPU, its interpreter runs the kernel itself on
    CPU tensors: strided (packed) inputs, a sequence that is not a power of two."""
    from tests.tritonutil import run_interpreted

    assert run_interpreted(INTERPRETER_SCRIPT) == "ok"
