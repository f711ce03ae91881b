"""LatentSync's per-chunk pipeline: audio conditioning -> DDIM denoising -> VAE decode.

The released pipeline (`LipsyncPipeline.__call__`, facts in
../shared/manifests/README.md), batched over B chunks of F = 16 frames:
- UNet input `(B, 13, F, h, w)` = `[noisy latent 4, mask 1, masked-face latent 4,
  reference latent 4]`; the mask channel is LatentSync's mask nearest-resized
  to the latent size (1 keeps, 0 regenerates);
- initial noise: one `(4, h, w)` picture from the seed, repeated over every
  frame (the reference draws one picture for the whole video, so every chunk of
  every turn starts from the same noise: frames stay consistent across chunk
  boundaries, and a chunk renders the same whatever batch it is in);
- DDIM (1000 train steps, scaled_linear 0.00085 -> 0.012, steps_offset 1, no
  clipping, final alpha not forced to one, epsilon, eta 0);
- classifier-free guidance in one batched call of 2B: the unconditional half
  first with all-zero audio, `uncond + g * (cond - uncond)`;
- decode `latents / 0.18215`.

The denoise step is a `NoisePredictor`, so faster runners (CUDA graphs,
DeepCache; `media.latentsync.accel`) replace the eager UNet without touching
this file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from media.latentsync.audio_features import (
    N_CTX,
    STEP_RATE,
    STEP_SAMPLES,
    STEPS_AFTER,
    STEPS_BEFORE,
    WINDOW_SAMPLES,
    AudioFeatureExtractor,
    ChunkAudio,
)
from media.latentsync.unet import UNet3DConditionModel
from media.latentsync.vae import LatentCodec

CHUNK_FRAMES = 16  # frames per UNet call, as trained
DECODE_BATCH = 32  # frames per VAE decode call (bounds activation memory)


class NoisePredictor(Protocol):
    """One UNet evaluation, and a hook at the start of each denoising loop.

    sample: (2B, 13, F, h, w) with guidance (B without), unconditional half first;
    timestep: 0-dim int64 tensor on the CPU; audio: (2B*F, S, C) batch-major
    (row b*F + f), the first B*F rows zeros. Returns the noise (2B, 4, F, h, w).
    """

    def reset(self) -> None:
        """A new denoising loop (one batch of chunks) starts: drop per-loop state."""

    # Positional-only: runners name their parameters as they like (accel's do).
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor, /
    ) -> torch.Tensor: ...


class EagerNoisePredictor:
    """The default NoisePredictor: the UNet's forward, as it is (`guided`: its guided
    forward, for calls that are all guidance pairs)."""

    def __init__(self, unet: UNet3DConditionModel, guided: bool = False) -> None:
        self.unet = unet
        self.guided = guided

    def reset(self) -> None:
        """Stateless."""

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.unet(sample, timestep, audio, guided=self.guided)
        return out


Scheduler = DDIMScheduler | DPMSolverMultistepScheduler


def make_scheduler() -> DDIMScheduler:
    """DDIM exactly as LatentSync's `configs/scheduler_config.json`."""
    scheduler: DDIMScheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return scheduler


class LatentSyncModels:
    """The UNet, VAE and audio encoder, loaded once and only read (shareable by renderers)."""

    def __init__(self, unet: UNet3DConditionModel, codec: LatentCodec,
                 audio: AudioFeatureExtractor) -> None:
        if audio.width != unet.config.cross_attention_dim:
            raise ValueError(f"audio features are {audio.width} wide, the UNet attends to "
                             f"{unet.config.cross_attention_dim}")
        if unet.config.in_channels != 1 + 3 * codec.latent_channels:
            raise ValueError(f"UNet takes {unet.config.in_channels} channels, the VAE gives "
                             f"{codec.latent_channels}-channel latents")
        param = next(unet.parameters())
        self.unet, self.codec, self.audio = unet, codec, audio
        self.device, self.dtype = param.device, param.dtype
        self._silence: torch.Tensor | None = None
        self._lock = threading.Lock()

    def silence_states(self) -> torch.Tensor:
        """(1500, S, C) encoder states of an all-zero 30 s window, computed once.

        Every window of silent audio is this window, so frame f of silence reads
        its steps modulo 1500.
        """
        with self._lock:
            if self._silence is None:
                zeros = torch.zeros(1, WINDOW_SAMPLES)
                self._silence = self.audio.encode_windows(zeros)[0]  # (1500, S, C)
            return self._silence


@dataclass(frozen=True, slots=True)
class AudioRequest:
    """One chunk's conditioning: its frames' audio and which frames are speech."""

    audio: ChunkAudio  # frames [first_frame, first_frame + n) of the turn
    speech: npt.NDArray[np.bool_]  # (n,) False: condition on silence


def audio_conditioning(models: LatentSyncModels, requests: Sequence[AudioRequest],
                       frames: int = CHUNK_FRAMES) -> torch.Tensor:
    """(B * frames, S, C) UNet audio for a batch, batch-major, each chunk padded to `frames`
    by repeating its last frame.

    Speech frames get the Whisper features of the turn's audio (one encoder call
    for the batch); other frames those of silence, so that a closed mouth is
    what the model is asked for (the all-zero unconditional input is not silence).
    """
    speaking = [r for r in requests if r.speech.any()]
    spoken = models.audio.chunk_features([r.audio for r in speaking]) if speaking else None
    out, row = [], 0
    for r in requests:
        n = r.audio.n_frames
        if n > frames or r.speech.shape != (n,):
            raise ValueError(f"chunk of {n} frames (speech flags {r.speech.shape}) does not fit"
                             f" {frames} frames")
        rows: torch.Tensor | None = None  # (n, S, C)
        if not r.speech.all():
            rows = _silence_rows(models.silence_states(), r.audio.first_frame, n, r.audio.fps)
        if r.speech.any():
            assert spoken is not None
            mine = spoken[row : row + n]
            row += n
            if rows is None:
                rows = mine
            else:
                keep = torch.from_numpy(r.speech).to(rows.device)[:, None, None]
                rows = torch.where(keep, mine.to(rows.dtype), rows)
        assert rows is not None
        out.append(torch.cat([rows, rows[-1:].expand(frames - n, -1, -1)]))
    return torch.cat(out).to(models.dtype)


def _silence_rows(silence: torch.Tensor, first_frame: int, n: int, fps: int) -> torch.Tensor:
    """(n, 10 * states, C): `ChunkAudio.step_indices` of endless silence (no clamp at an end)."""
    frames = np.arange(first_frame, first_frame + n)
    steps = (frames * STEP_RATE // fps)[:, None] + np.arange(-STEPS_BEFORE, STEPS_AFTER)
    rows = torch.from_numpy(np.maximum(steps, 0) % N_CTX).to(silence.device)  # (n, 10)
    return silence[rows].flatten(1, 2)  # (n, 10 * states, C)


def chunk_audio(audio: npt.NDArray[np.float32], first_frame: int, n_frames: int, fps: int,
                end_of_turn: bool) -> ChunkAudio:
    """ChunkAudio for a render chunk; a turn's audio past its end is silence, so an ended
    turn shorter than one encoder step is padded with zeros. Never a read-only array."""
    if end_of_turn and audio.size < STEP_SAMPLES:
        audio = np.concatenate([audio, np.zeros(STEP_SAMPLES - audio.size, np.float32)])
    elif not audio.flags.writeable:
        # Sessions hand out read-only views of a turn's audio, and the extractor's
        # torch.from_numpy warns on those (undefined behaviour if written).
        audio = audio.copy()
    return ChunkAudio(audio, first_frame, n_frames, fps, end_of_turn)


class ChunkDenoiser:
    """DDIM with classifier-free guidance over a batch of chunks, then the VAE decode."""

    def __init__(
        self,
        models: LatentSyncModels,
        *,
        inference_steps: int,
        guidance_scale: float,
        seed: int,
        predictor: NoisePredictor | None = None,
        scheduler: Callable[[], Scheduler] = make_scheduler,
    ) -> None:
        if inference_steps < 1:
            raise ValueError(f"inference_steps must be >= 1, got {inference_steps}")
        self.models = models
        self.inference_steps = inference_steps
        self.guidance_scale = guidance_scale
        self.predictor: NoisePredictor = predictor or EagerNoisePredictor(
            models.unet, guided=self.guided)
        # A factory: multistep schedulers keep per-loop state, so each loop gets a fresh one.
        self.make_scheduler = scheduler
        self.seed = seed
        self._noise: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def initial_noise(self, h: int, w: int) -> torch.Tensor:
        """(1, C, 1, h, w) the seed's noise picture (repeated over frames by the caller)."""
        key = (h, w)
        if key not in self._noise:
            gen = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((1, self.models.codec.latent_channels, 1, h, w), generator=gen)
            noise = noise * self.make_scheduler().init_noise_sigma
            self._noise[key] = noise.to(self.models.device, self.models.dtype)
        return self._noise[key]

    def denoise(self, mask: torch.Tensor, masked: torch.Tensor, reference: torch.Tensor,
                audio: torch.Tensor, *,
                between_steps: Callable[[], object] | None = None) -> torch.Tensor:
        """Denoised latents (B, C, F, h, w).

        mask (h, w); masked, reference (B, C, F, h, w) scaled latents; audio
        (B*F, S, C) batch-major. `between_steps`: called after each step is queued (host
        work done while the device runs the steps before it). Call under
        `torch.inference_mode()`.
        """
        b, c, f, h, w = masked.shape
        dtype = self.models.dtype
        latents = self.initial_noise(h, w).expand(b, c, f, h, w)  # (B, C, F, h, w)
        mask5 = mask.to(dtype)[None, None, None].expand(b, 1, f, h, w)  # (B, 1, F, h, w)
        cond = torch.cat([mask5, masked.to(dtype), reference.to(dtype)], dim=1)  # (B, 9, F, ...)
        audio = audio.to(dtype)
        if self.guided:
            cond = torch.cat([cond, cond])  # (2B, 9, F, h, w)
            audio = torch.cat([torch.zeros_like(audio), audio])  # (2B*F, S, C)
        scheduler = self.make_scheduler()
        # Timesteps stay on the CPU: `step` indexes its CPU tables with them without a
        # device sync, and the UNet moves the scalar itself.
        scheduler.set_timesteps(self.inference_steps)
        self.predictor.reset()
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if self.guided else latents
            x = scheduler.scale_model_input(x, t)
            noise = self.predictor(torch.cat([x, cond], dim=1), t, audio)  # (2B | B, C, F, ...)
            if self.guided:
                uncond, speech = noise.chunk(2)
                noise = uncond + self.guidance_scale * (speech - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if between_steps is not None:
                between_steps()
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, 3, r, r) pictures in [-1, 1], DECODE_BATCH frames per call."""
        codec = self.models.codec
        parts = [codec.decode(latents[i : i + DECODE_BATCH])
                 for i in range(0, latents.shape[0], DECODE_BATCH)]
        return torch.cat(parts)
