"""PCM conversion, the streaming resampler (real libswresample) and frame sample bounds."""

from __future__ import annotations

import numpy as np
import pytest

from media.audio import StreamResampler, float_to_pcm16, frame_sample_bounds, pcm16_to_float

pytestmark = pytest.mark.unit

RATE_PAIRS = [
    (16000, 24000),
    (22050, 16000),
    (24000, 16000),
    (44100, 16000),
    (48000, 16000),
    (16000, 44100),
    (16000, 48000),
]


def tone(n: int, rate: int, hz: float = 300.0, phase: float = 0.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / rate + phase)).astype(np.float32)


def resample_chunked(x: np.ndarray, in_rate: int, out_rate: int, sizes: list[int]) -> np.ndarray:
    r = StreamResampler(in_rate, out_rate)
    parts, pos = [], 0
    for size in sizes:
        out = r.push(x[pos : pos + size])
        assert out.dtype == np.float32 and out.ndim == 1
        parts.append(out)
        pos += size
    assert pos == len(x)
    parts.append(r.flush())
    return np.concatenate(parts)


def random_sizes(n: int, rng: np.random.Generator) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(int(rng.integers(0, 900)), n - sum(sizes)))  # 0-sized pushes too
    return sizes


def test_pcm16_round_trip_and_clipping() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 1000).astype(np.float32)
    pcm = float_to_pcm16(x)
    assert len(pcm) == 2 * len(x)
    y = pcm16_to_float(memoryview(pcm))
    assert y.dtype == np.float32
    assert np.max(np.abs(y - x)) <= 0.5 / 32768 + 1e-7
    loud = pcm16_to_float(float_to_pcm16(np.array([1.5, -2.0, 1.0, -1.0], np.float32)))
    assert loud.tolist() == [32767 / 32768, -1.0, 32767 / 32768, -1.0]  # clipped, not wrapped
    with pytest.raises(ValueError, match="even number"):
        pcm16_to_float(b"\x00\x01\x02")


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_resampler_length_and_accuracy(in_rate: int, out_rate: int) -> None:
    n = in_rate // 2 + 37  # half a second and an odd remainder
    x = tone(n, in_rate)
    y = resample_chunked(x, in_rate, out_rate, [n])
    assert abs(len(y) - round(n * out_rate / in_rate)) <= 2
    # Time-aligned with the same tone sampled at the output rate (no delay
    # left in the output); the edges hold the filter's start-up transient.
    ref = tone(len(y), out_rate)
    edge = out_rate // 100
    assert np.max(np.abs(y[edge:-edge] - ref[edge:-edge])) < 1e-3


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_resampler_chunking_is_invisible(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(in_rate + out_rate)
    n = in_rate // 3
    x = tone(n, in_rate, hz=440.0) + 0.1 * rng.standard_normal(n).astype(np.float32)
    one_shot = resample_chunked(x, in_rate, out_rate, [n])
    chunked = resample_chunked(x, in_rate, out_rate, random_sizes(n, rng))
    assert len(chunked) == len(one_shot)
    assert np.max(np.abs(chunked - one_shot)) < 1e-5  # no clicks at chunk boundaries


def test_resampler_identity_fast_path() -> None:
    r = StreamResampler(16000, 16000)
    x = tone(1234, 16000)
    out = r.push(x)
    assert np.array_equal(out, x) and out is not x
    assert r.flush().size == 0
    with pytest.raises(RuntimeError, match="flush"):
        r.push(x)


def test_resampler_refuses_wrong_input() -> None:
    r = StreamResampler(24000, 16000)
    with pytest.raises(ValueError, match="float32"):
        r.push(np.zeros(10, np.float64))
    with pytest.raises(ValueError, match="float32"):
        r.push(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("fps", [24, 25, 30, 29])
def test_frame_sample_bounds_partition(rate: int, fps: int) -> None:
    seconds = 3
    bounds = [frame_sample_bounds(i, rate, fps) for i in range(seconds * fps)]
    assert bounds[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # no gap, no overlap
    assert bounds[-1][1] == seconds * rate  # whole seconds land exactly
    lengths = {end - start for start, end in bounds}
    assert lengths <= {rate // fps, rate // fps + 1}


def test_frame_sample_bounds_even_split() -> None:
    assert {e - s for s, e in (frame_sample_bounds(i, 44100, 25) for i in range(100))} == {1764}
    with pytest.raises(ValueError):
        frame_sample_bounds(-1, 16000, 25)
