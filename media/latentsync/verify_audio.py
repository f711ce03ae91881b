"""Check our audio features against the golden Whisper-tiny fixture.

`verify_audio` loads a Whisper checkpoint in OpenAI's `tiny.pt` format and an
IO file holding `pcm_16k` (16 kHz float32), `features` (T, 5, 384) and
`frame_features` (F, 50, 384) at 25 fps, recomputes both, and returns the
larger relative error (L2 norm of the difference over L2 norm of the
expected). Faithful is below 1e-3.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from agent.errors import ConfigError
from media.latentsync.audio_features import AudioFeatureExtractor

FIXTURE_FPS = 25  # the fixture's frame_features are for 25 fps video
IO_KEYS = ("pcm_16k", "features", "frame_features")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 on the CPU."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((a - e).norm() / e.norm())


def load_audio_io(io_path: Path) -> dict[str, torch.Tensor]:
    """The fixture's tensors; raises `ConfigError` naming the file when it is unusable."""
    if not io_path.is_file():
        raise ConfigError(f"{io_path}: no such file; expected a safetensors file with {IO_KEYS}")
    tensors = load_file(io_path)
    missing = [k for k in IO_KEYS if k not in tensors]
    if missing:
        raise ConfigError(f"{io_path}: missing {missing}; expected {IO_KEYS}")
    return tensors


def verify_audio(
    checkpoint_path: Path,
    io_path: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Max relative error of our 50 Hz states and per-frame features against the fixture."""
    io = load_audio_io(io_path)
    extractor = AudioFeatureExtractor.from_checkpoint(checkpoint_path, device=device, dtype=dtype)
    pcm = io["pcm_16k"].numpy()  # (N,) float32
    states = extractor.encoder_states(pcm)  # (T, 5, 384)
    frames = extractor.frame_features(pcm, FIXTURE_FPS, n_frames=io["frame_features"].shape[0])
    return max(
        relative_error(states, io["features"]),
        relative_error(frames, io["frame_features"]),
    )
