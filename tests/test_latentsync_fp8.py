"""FP8 linear layers (media/latentsync/fp8.py): what they swap and how far they move the UNet.

torch's CPU build runs `torch._scaled_mm` too, so the numerics are checked here; the
speed is a GPU matter (`bench/latentsync_bench.py --sections tune`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from media.latentsync.fp8 import FP8, Fp8Linear, fp8_linears, fp8_supported
from media.latentsync.verify import relative_error
from tests.latentsyncutil import fixtures_dir, tiny_models


def test_fp8_linear_matches_the_linear_within_fp8_rounding() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 20, 64)
    x[0, 0] *= 50  # an outlier token: row-wise scales keep it from flattening the rest
    q = Fp8Linear(linear)
    assert q.weight_fp8.dtype == FP8 and q.weight_scale.shape == (1, 48)
    with torch.inference_mode():
        expected, actual = linear(x), q(x)
    assert actual.shape == expected.shape == (3, 20, 48) and actual.dtype == x.dtype
    # e4m3 rounds each factor by up to 2**-4 relative: products by ~6 %, sums average out.
    assert relative_error(actual, expected) < 0.05
    rest = relative_error(actual[1:], expected[1:])
    assert rest < 0.05  # the outlier's row did not take the other rows' precision
    assert relative_error(actual, expected) > 1e-4  # it really ran in FP8, not fp32


def test_fp8_linear_refuses_sizes_scaled_mm_cannot_take() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        Fp8Linear(nn.Linear(24, 32))


def test_swap_keeps_time_embeddings_and_moves_the_unet_a_little() -> None:
    unet = tiny_models().unet
    io = load_file(fixtures_dir() / "tiny_unet_io.safetensors")
    quantized = copy.deepcopy(unet)
    linears = [n for n, m in unet.named_modules() if type(m) is nn.Linear]
    swapped = fp8_linears(quantized)
    kept = [n for n, m in quantized.named_modules() if type(m) is nn.Linear]
    assert swapped == len(linears) - len(kept) > 0
    assert kept and all("time_emb" in n for n in kept)  # one row per video: not worth FP8
    assert sum(isinstance(m, Fp8Linear) for m in quantized.modules()) == swapped
    with torch.inference_mode():
        args = (io["sample"], io["timestep"], io["audio"])
        exact, approx = unet(*args), quantized(*args)
    error = relative_error(approx, exact)
    assert 1e-4 < error < 0.03, error  # about 0.75 % on the tiny fixture model


def test_fp8_needs_ada_or_newer() -> None:
    assert not fp8_supported(torch.device("cpu"))
