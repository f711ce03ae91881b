"""Audio building blocks: PCM s16le <-> float32, streaming resampling, frame bounds.

Wire audio is PCM s16le mono (PROTOCOL.md); renderers take 16 kHz float32
(`media.types.RENDER_SAMPLE_RATE`). Media time is an integer sample count.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from media.types import Audio

_S16_SCALE = 32768.0


def pcm16_to_float(b: bytes | bytearray | memoryview) -> Audio:
    """s16le mono PCM -> float32 in [-1, 1); an odd byte count is a ValueError."""
    if len(b) % 2:
        raise ValueError(f"s16 PCM needs an even number of bytes, got {len(b)}")
    pcm = np.frombuffer(b, dtype="<i2")
    out: Audio = pcm.astype(np.float32) / np.float32(_S16_SCALE)
    return out


def float_to_pcm16(a: Audio) -> bytes:
    """float32 mono -> s16le PCM; values outside [-1, 1] are clipped (not wrapped)."""
    if a.ndim != 1:
        raise ValueError(f"expected mono (N,) samples, got shape {a.shape}")
    scaled = np.clip(np.rint(a * _S16_SCALE), -32768, 32767)
    pcm: bytes = scaled.astype("<i2").tobytes()
    return pcm


class StreamResampler:
    """Streaming mono float32 resampler with carried filter state (libswresample).

    Chunk boundaries leave no trace: the output of any chunking equals the
    one-shot output, and after `flush()` the total is round(n_in * out / in).
    Output lags input by the filter's half-length (about 16 input samples)
    until `flush()`. One instance per stream; not thread-safe.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._identity = in_rate == out_rate
        self._resampler = (
            None
            if self._identity
            else av.AudioResampler(format="flt", layout="mono", rate=out_rate)
        )
        self._pts = 0  # input samples pushed so far
        self._flushed = False

    def push(self, samples: Audio) -> Audio:
        """Resample the next chunk; returns what the filter can emit so far."""
        if self._flushed:
            raise RuntimeError("push after flush")
        if samples.ndim != 1 or samples.dtype != np.float32:
            raise ValueError(f"expected (N,) float32 samples, got {samples.shape} {samples.dtype}")
        if self._resampler is None:
            return samples.copy()
        if samples.size == 0:
            return np.zeros(0, np.float32)
        # (1, N): one plane of packed float32 mono
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.in_rate
        frame.time_base = Fraction(1, self.in_rate)
        frame.pts = self._pts
        self._pts += samples.size
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> Audio:
        """The filter's tail; the stream is finished afterwards."""
        if self._flushed:
            raise RuntimeError("flush called twice")
        self._flushed = True
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._collect(self._resampler.resample(None))

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> Audio:
        if not frames:
            return np.zeros(0, np.float32)
        # each frame: (1, n) packed float32
        out: Audio = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
        return out.astype(np.float32, copy=False)


def frame_sample_bounds(frame_index: int, rate: int, fps: int) -> tuple[int, int]:
    """[start, end) samples of video frame `frame_index` at `rate` Hz and `fps`.

    floor(n * rate / fps) for n = index and index + 1: consecutive frames
    partition the samples exactly for any rate and fps (44100 Hz at 25 fps is
    1764 each; 44100 at 24 fps alternates 1837 and 1838).
    """
    if frame_index < 0:
        raise ValueError(f"frame_index must be >= 0, got {frame_index}")
    if rate <= 0 or fps <= 0:
        raise ValueError(f"rate and fps must be positive, got {rate} Hz, {fps} fps")
    return frame_index * rate // fps, (frame_index + 1) * rate // fps
