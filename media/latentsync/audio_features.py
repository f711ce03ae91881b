"""LatentSync's audio conditioning: 16 kHz audio -> Whisper-tiny states -> per-frame windows.

Pipeline (the reference's, step for step):
1. Log-mel front end (Whisper's): Hann STFT (n_fft 400, hop 160, centred,
   reflect-padded), power spectrum without the last frame, 80 Slaney mel
   filters, log10 clamped at 1e-10, floor at (max - 8), then (x + 4) / 4.
2. The encoder runs on 30 s windows (3000 mel frames -> 1500 steps at 50 Hz);
   each window is the turn's audio from sample `k * 480000`, zero-padded to
   30 s *before* the front end (so the padding is log-mel silence and the
   window's max sets the floor). A turn of N samples has `N // 320` steps;
   windows are anchored at the turn's start and do not overlap, as in
   LatentSync's offline `audio2feat` (which cuts long audio into 30 s segments).
3. Video frame i at `fps` takes the 10 steps `c - 4 ... c + 5` with
   `c = i * 50 // fps` (80 ms before to 120 ms after the frame start at 25 fps),
   clamped to the turn's steps, each with its 5 states: `(50, 384)`.

Streaming. A chunk of frames `[f0, f1)` needs steps up to `c(f1 - 1) + 5`,
whose conv receptive field ends `required_samples(f1, fps)` into the turn
(chunk end + 92.5 ms at 25 fps, inside the renderer's 120 ms look-ahead).
`chunk_features` computes the chunk from the turn's audio so far: the windows
that hold the chunk's steps, each padded with silence past the audio that has
arrived. The conv stem is then exact, but self-attention sees the whole 30 s
window, so the states still move a little as later audio of the same window
arrives (the offline result is what a window holds once all its audio is in).
Once the turn has ended, or the window is full, the chunk equals the offline
result exactly. The streaming difference is measured in the tests and the
report; the look-ahead is the knob that trades latency for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from media.latentsync.graphs import StaticGraph
from media.latentsync.whisper import WhisperEncoder, load_whisper_encoder
from media.types import Audio

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160  # samples per mel frame (10 ms)
N_MELS = 80
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # one encoder window: 480000 samples, 3000 mel frames
STEP_SAMPLES = 2 * HOP  # samples per encoder step (20 ms, 50 Hz): conv2 has stride 2
N_CTX = WINDOW_SAMPLES // STEP_SAMPLES  # 1500 encoder steps per window
STEP_RATE = SAMPLE_RATE // STEP_SAMPLES  # 50 steps per second
STEPS_BEFORE = 4  # a frame's window starts 4 steps before its centre step
STEPS_AFTER = 6  # ... and ends (exclusive) 6 steps after it: 10 steps
LOOKAHEAD_MS = 120  # audio needed past a chunk's end (covers required_samples for fps <= 80)


def slaney_mel_filters(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS
) -> npt.NDArray[np.float32]:
    """(n_mels, n_fft // 2 + 1) Slaney-scale, Slaney-normalised triangular filters.

    The same numbers as `librosa.filters.mel(sr, n_fft, n_mels)` (htk=False,
    norm="slaney"), which is what Whisper ships in `mel_filters.npz`; the
    float64 -> float32 roundings follow librosa's.
    """
    freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)  # (n_fft // 2 + 1,)
    edges_mel = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2)
    edges = _mel_to_hz(edges_mel)  # (n_mels + 2,) Hz
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, freqs)  # (n_mels + 2, n_freqs)
    weights = np.zeros((n_mels, freqs.size), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, np.newaxis]  # equal area
    return weights


# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return hz / _F_SP
    return _MIN_LOG_MEL + math.log(hz / _MIN_LOG_HZ) / _LOGSTEP


def _mel_to_hz(mels: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    hz = _F_SP * mels
    log_part = mels >= _MIN_LOG_MEL
    hz[log_part] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels[log_part] - _MIN_LOG_MEL))
    return hz


def log_mel_spectrogram(audio: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Whisper's front end: (B, N) float32 audio -> (B, 80, N // 160) float32 log-mel.

    The floor (max - 8) is taken per row of the batch, i.e. per 30 s window.
    """
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP, window=window, return_complex=True)  # (B, F, N//160+1)
    power = stft[..., :-1].abs() ** 2  # (B, n_freqs, N // 160): Whisper drops the last frame
    mel = filters @ power  # (B, 80, N // 160)
    log_mel = torch.clamp(mel, min=1e-10).log10()
    floor = log_mel.amax(dim=(1, 2), keepdim=True) - 8.0  # (B, 1, 1)
    return (torch.maximum(log_mel, floor) + 4.0) / 4.0


def frame_center_step(frame: int, fps: int) -> int:
    """The encoder step at which video frame `frame` starts (LatentSync's `int(i * 50 / fps)`)."""
    return frame * STEP_RATE // fps


def required_samples(end_frame: int, fps: int) -> int:
    """Turn samples that must have arrived before frames `[..., end_frame)` can be conditioned.

    The last frame's last step `s` is computed from mel frames `2s-2 ... 2s+2`,
    and mel frame m from samples `[160m - 200, 160m + 200)`, so the chunk is
    exact in the conv stem once `320 s + 520` samples are in.
    """
    if end_frame < 1:
        raise ValueError(f"end_frame must be >= 1, got {end_frame}")
    last_step = frame_center_step(end_frame - 1, fps) + STEPS_AFTER - 1
    return STEP_SAMPLES * last_step + 2 * STEP_SAMPLES + N_FFT // 2 - HOP


@dataclass(frozen=True, slots=True)
class ChunkAudio:
    """Frames `[first_frame, first_frame + n_frames)` of a turn and the turn's audio so far.

    `audio` runs from the turn's first sample to as far as it has arrived.
    Before the turn ends it must reach `required_samples(first_frame + n_frames,
    fps)`; once `end_of_turn`, steps past its end clamp to its last step, as
    LatentSync does at the end of a clip.
    """

    audio: Audio  # (N,) float32, 16 kHz mono
    first_frame: int
    n_frames: int
    fps: int
    end_of_turn: bool = False

    def __post_init__(self) -> None:
        if self.first_frame < 0 or self.n_frames < 1 or self.fps < 1:
            raise ValueError(
                f"need first_frame >= 0, n_frames >= 1, fps >= 1; got "
                f"{self.first_frame}, {self.n_frames}, {self.fps}"
            )
        if self.audio.ndim != 1 or self.audio.dtype != np.float32:
            raise ValueError(
                f"audio must be (N,) float32, got {self.audio.shape} {self.audio.dtype}"
            )
        if self.audio.size < STEP_SAMPLES:
            raise ValueError(f"audio has {self.audio.size} samples; one step needs {STEP_SAMPLES}")
        end = self.first_frame + self.n_frames
        needed = required_samples(end, self.fps)
        if not self.end_of_turn and self.audio.size < needed:
            raise ValueError(
                f"frames [{self.first_frame}, {end}) at {self.fps} fps "
                f"need {needed} samples before the turn ends, got {self.audio.size}"
            )

    def step_indices(self) -> npt.NDArray[np.int64]:
        """(n_frames, 10) turn step of each frame's window, clamped to the audio's steps."""
        frames = np.arange(self.first_frame, self.first_frame + self.n_frames)
        centers = frames * STEP_RATE // self.fps  # (F,)
        offsets = np.arange(-STEPS_BEFORE, STEPS_AFTER)  # (10,)
        steps = centers[:, None] + offsets[None, :]  # (F, 10)
        clamped: npt.NDArray[np.int64] = np.clip(steps, 0, self.audio.size // STEP_SAMPLES - 1)
        return clamped


class AudioFeatureExtractor:
    """16 kHz audio -> Whisper-tiny hidden states -> LatentSync's per-frame conditioning.

    Weights are loaded once and only read. The front end runs in float32 on
    `device`; the encoder in `dtype` (float16 on CUDA is fine). Outputs are in
    `dtype` on `device`.
    """

    def __init__(
        self,
        encoder: WhisperEncoder,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder = encoder.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        n_mels = encoder.config.n_mels
        if encoder.config.n_ctx != N_CTX:
            raise ValueError(f"encoder n_ctx {encoder.config.n_ctx} is not a 30 s window")
        self.filters = torch.from_numpy(slaney_mel_filters(n_mels=n_mels)).to(self.device)
        self.n_states = encoder.config.n_states
        self.width = encoder.config.width
        # CUDA graphs of `encode_windows` by window count (`capture`); `use_graphs` False
        # runs the modules as they are (benchmarks compare the two).
        self._graphs: dict[int, StaticGraph] = {}
        self.use_graphs = True

    @classmethod
    def from_checkpoint(
        cls, path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> AudioFeatureExtractor:
        """Load the encoder from an OpenAI `tiny.pt` (see `load_whisper_encoder`)."""
        return cls(load_whisper_encoder(path, device="cpu"), device=device, dtype=dtype)

    @torch.inference_mode()
    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, 480000) float32 audio windows -> (B, 1500, n_states, width) hidden states.
        A window count with a captured graph (`capture`) replays it."""
        graph = self._graphs.get(windows.shape[0]) if self.use_graphs else None
        if graph is None:
            return self._encode(windows.to(self.device, torch.float32))
        return graph(windows)

    @torch.inference_mode()
    def capture(self, counts: Sequence[int]) -> None:
        """On CUDA, capture `encode_windows` for each count of windows as a CUDA graph (the
        front end and the encoder: about a hundred kernels, launched as one). No-op on
        other devices and for counts already captured."""
        if self.device.type != "cuda":
            return
        for count in counts:
            if count in self._graphs:
                continue
            example = torch.zeros(count, WINDOW_SAMPLES, device=self.device)
            self._graphs[count] = StaticGraph(self._encode, example)

    @property
    def captured(self) -> list[int]:
        """The window counts with a captured graph."""
        return sorted(self._graphs)

    def _encode(self, windows: torch.Tensor) -> torch.Tensor:
        mel = log_mel_spectrogram(windows, self.filters)
        states: torch.Tensor = self.encoder(mel.to(self.dtype))  # (B, 1500, S, C)
        return states

    def encoder_states(self, audio: Audio) -> torch.Tensor:
        """(N,) float32 audio -> (N // 320, n_states, width) states at 50 Hz, offline."""
        n_windows = math.ceil(audio.size / WINDOW_SAMPLES)
        states = self.encode_windows(self._windows(audio, range(n_windows)))  # (W, 1500, S, C)
        return states.flatten(0, 1)[: audio.size // STEP_SAMPLES]  # (T, S, C)

    def frame_features(self, audio: Audio, fps: int, n_frames: int | None = None) -> torch.Tensor:
        """Offline: (N,) float32 audio of a whole turn -> (F, 10 * n_states, width).

        `n_frames` defaults to the frames the audio covers, ceil(N * fps / 16000).
        """
        if n_frames is None:
            n_frames = math.ceil(audio.size * fps / SAMPLE_RATE)
        return self.chunk_features([ChunkAudio(audio, 0, n_frames, fps, end_of_turn=True)])

    def chunk_features(self, chunks: Sequence[ChunkAudio]) -> torch.Tensor:
        """(sum of n_frames, 10 * n_states, width) for a batch of chunks, chunk-major.

        Row `b * F + f` is frame f of chunk b when every chunk has F frames: the
        UNet's `encoder_hidden_states` layout. All windows of the batch run in
        one encoder call.
        """
        if not chunks:
            raise ValueError("chunk_features needs at least one chunk")
        # Per chunk: its turn steps (F, 10) and the batch row of its turn window 0,
        # so that turn step s sits at flattened row `base * N_CTX + s`.
        plans: list[tuple[npt.NDArray[np.int64], int]] = []
        windows: list[torch.Tensor] = []
        n_windows = 0
        for chunk in chunks:
            steps = chunk.step_indices()  # (F, 10)
            first, last = int(steps.min()) // N_CTX, int(steps.max()) // N_CTX
            plans.append((steps, n_windows - first))
            windows.append(self._windows(chunk.audio, range(first, last + 1)))
            n_windows += last + 1 - first
        states = self.encode_windows(torch.cat(windows)).flatten(0, 1)  # (W * 1500, S, C)
        out = []
        for steps, base in plans:
            rows = torch.from_numpy(steps + base * N_CTX).to(self.device)  # (F, 10)
            picked = states[rows]  # (F, 10, S, C)
            out.append(picked.flatten(1, 2))  # (F, 10 * S, C): step-major, states in order
        return torch.cat(out)  # (sum F, 10 * S, C)

    @staticmethod
    def _windows(audio: Audio, indices: range) -> torch.Tensor:
        """(len(indices), 480000) windows `k` of the audio, zero-padded past its end."""
        windows = torch.zeros(len(indices), WINDOW_SAMPLES, dtype=torch.float32)
        for row, k in enumerate(indices):
            piece = audio[k * WINDOW_SAMPLES : (k + 1) * WINDOW_SAMPLES]
            windows[row, : piece.size] = torch.as_tensor(np.array(piece, dtype=np.float32))
        return windows
