"""The LatentSync renderer: `media.types.Renderer` over the lip-sync diffusion model.

`render(batch)` runs, for up to `max_batch` chunks at once:
validate -> audio conditioning -> face latents (cached per avatar) -> DDIM with
guidance (one UNet call of 2B per step) -> VAE decode -> paste-back, under
`torch.inference_mode()`. A chunk of fewer than 16 frames is padded with its
last frame and the padding dropped after the UNet. Blends mix the masked and
reference latents (and the affines) of both source frames and the paste-back
background in pixel space. Non-speech frames are conditioned on silence.
`render_streaming` hands a turn's first chunk over in pieces: its first frame is decoded
and pasted alone, ahead of the rest of the batch, so a turn's first frame leaves the
renderer right after the UNet, not after the whole batch's decode and paste-back.

Weights come from `config.checkpoint_dir` (never downloaded):
`latentsync_unet.pt` (v1.5 for 256 px, v1.6 for 512 px; the architecture is the
packaged `configs/stage2*.json`), `whisper/tiny.pt` and `sd-vae-ft-mse/`.
Calls are serialised (one GPU stream); stage times are those of the batch (on CUDA
the device's time for each stage's queued work, from events: nothing waits to time it).

The sampler and the UNet runner come from config (`sampler`, `deepcache_interval`,
`cuda_graphs`; the defaults are LatentSync's exact 20-step DDIM): see
`noise_predictor_for` and `scheduler_for`. With CUDA graphs, `warmup` captures one
graph per batch size up to `max_batch`, so no capture stalls a live chunk; with
`compile` also on, it first compiles the UNet for those shapes and the VAE decoder
(Inductor; minutes cold, seconds from `compile_cache_dir`) and captures the decodes of a
turn's lead pieces; with `aot` instead, it loads the
ahead-of-time artifacts from `aot_cache_dir` (compiling and storing them on the
first start: `media.latentsync.aot`) and captures those.

Face inputs (tracks and VAE latents of every source frame, `AvatarFaces`) are
cached per avatar; `prepare_avatar` computes them ahead of the avatar's first
chunk (the server calls it at start-up and when a session opens), else the
first chunks that meet a frame encode it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from agent.config import LatentSyncConfig
from agent.errors import ConfigError, GpuOutOfMemory, NotFound, RenderError
from media.avatar import Avatar
from media.cpu_renderer import source_picture
from media.latentsync import accel, frame_attention
from media.latentsync.accel import CompiledPredictor, GraphPredictor, UNetPredictor
from media.latentsync.aot import AotPredictor
from media.latentsync.audio_features import AudioFeatureExtractor, required_samples
from media.latentsync.checkpoint import load_unet
from media.latentsync.config import UNetConfig
from media.latentsync.face import (
    AvatarFaces,
    CropMasks,
    FaceInputs,
    PastePlan,
    blend_faces,
    blend_inputs,
    crop_masks,
    plan_paste,
    write_windows,
)
from media.latentsync.pipeline import (
    CHUNK_FRAMES,
    AudioRequest,
    ChunkDenoiser,
    LatentSyncModels,
    NoisePredictor,
    Scheduler,
    audio_conditioning,
    chunk_audio,
)
from media.latentsync.vae import SD_VAE_SHAPE, LatentCodec, VaeShape, find_vae, load_vae
from media.latentsync.whisper import load_whisper_encoder
from media.types import (
    AvatarPrep,
    FrameSink,
    FrameSpec,
    RenderChunk,
    RendererCapabilities,
    RenderResult,
    stream_pieces,
)

UNET_FILE = "latentsync_unet.pt"
WHISPER_FILE = Path("whisper") / "tiny.pt"
CONFIG_DIR = Path(__file__).with_name("configs")
ARCHITECTURES = {256: "stage2.json", 512: "stage2_512.json"}  # LatentSync v1.5, v1.6
RELEASES = {256: "ByteDance/LatentSync-1.5", 512: "ByteDance/LatentSync-1.6"}
LOOKAHEAD_MS = 120  # covers the audio window's 92.5 ms past a chunk's end at 25 fps
WARMUP_FPS = 25
# Streaming: the first pieces of a turn's first chunk (`stream_pieces`: frame 0, then 1-3)
# are decoded alone, each ahead of the rest of the batch (frame 0 is out 7-8 ms after the
# UNet on an H100, 3 ms with the compiled path's decoder; its paste-back is planned during
# the UNet); its other pieces share the batch's last decode.
LEAD_PIECES = 2
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_scope(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make `device` the current CUDA device in this (worker) thread: CUDA-graph capture
    and replay, and any tensor made without an explicit device, follow the current
    device, which is cuda:0 in a new thread whatever GPU this renderer owns."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def cuda_device_count() -> int:
    """Visible CUDA devices (CUDA_VISIBLE_DEVICES applies)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def architecture_config(resolution: int) -> Path:
    if resolution not in ARCHITECTURES:
        raise ConfigError(f"no LatentSync release for {resolution} px crops; "
                          f"expected one of {sorted(ARCHITECTURES)}")
    return CONFIG_DIR / ARCHITECTURES[resolution]


def check_checkpoint_dir(checkpoint_dir: Path, resolution: int) -> None:
    """ConfigError listing every missing file and what it should be."""
    missing = []
    unet = checkpoint_dir / UNET_FILE
    if not unet.is_file():
        missing.append(f"{unet} (the LatentSync UNet, {UNET_FILE} from "
                       f"{RELEASES.get(resolution, 'a LatentSync release')})")
    whisper = checkpoint_dir / WHISPER_FILE
    if not whisper.is_file():
        missing.append(f"{whisper} (OpenAI Whisper tiny, shipped with LatentSync)")
    try:
        find_vae(checkpoint_dir)
    except ConfigError as exc:
        missing.append(str(exc))
    if missing:
        raise ConfigError(
            "LatentSync checkpoints missing (put them under renderer.latentsync.checkpoint_dir,"
            " or use --renderer cpu):\n  " + "\n  ".join(missing))


def load_models(
    checkpoint_dir: Path,
    resolution: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    unet_config: UNetConfig | None = None,
    vae_shape: VaeShape | None = SD_VAE_SHAPE,
) -> LatentSyncModels:
    """Load and check every weight file; any problem is a ConfigError naming the file.

    `unet_config` and `vae_shape` default to the released architectures (tests
    pass tiny ones).
    """
    check_checkpoint_dir(checkpoint_dir, resolution)
    config = unet_config or UNetConfig.from_json(architecture_config(resolution))
    whisper_path = checkpoint_dir / WHISPER_FILE
    encoder = load_whisper_encoder(whisper_path)
    if encoder.config.width != config.cross_attention_dim:
        raise ConfigError(f"{whisper_path}: Whisper states are {encoder.config.width} wide, the"
                          f" UNet attends to {config.cross_attention_dim} (expected Whisper tiny)")
    audio = AudioFeatureExtractor(encoder, device=device, dtype=dtype)
    vae = load_vae(find_vae(checkpoint_dir), expect=vae_shape, device=device, dtype=dtype)
    unet = load_unet(config, checkpoint_dir / UNET_FILE, device=device, dtype=dtype)
    try:
        return LatentSyncModels(unet, LatentCodec(vae), audio)
    except ValueError as exc:
        raise ConfigError(f"{checkpoint_dir}: the weight files do not fit together: {exc}"
                          ) from None


def noise_predictor_for(config: LatentSyncConfig, models: LatentSyncModels,
                        interval: int | None = None) -> NoisePredictor:
    """The UNet runner that `config` asks for: CUDA-graph replay on a CUDA device when
    `cuda_graphs` (the CPU has no graphs: eager there), compiled under the graphs when
    `compile`, DeepCache when `deepcache_interval` (or `interval`) > 1; `aot`: ahead-of-time
    artifacts (under the graphs on CUDA, run directly elsewhere). With guidance, every
    runner computes the UNet's guided forward (the pair's shared part once)."""
    interval = config.deepcache_interval if interval is None else interval
    kernels = compiled_kernels(config, models)
    guided = config.guidance_scale > 1.0  # every call a pair: its shared part runs once
    if config.aot:
        return AotPredictor(models.unet, interval, cache_dir=config.aot_cache_dir,
                            max_rows=2 * config.max_batch, graphs=config.cuda_graphs,
                            kernels=kernels, guided=guided)
    if config.cuda_graphs and models.device.type == "cuda":
        if config.compile:  # the guided forward gets one copy of the pair (halved inputs)
            use_compile_cache(config.compile_cache_dir)
            return CompiledPredictor(models.unet, interval, kernels=kernels, guided=guided)
        return GraphPredictor(models.unet, interval, guided=guided)
    return UNetPredictor(models.unet, interval, guided=guided)


def compiled_kernels(config: LatentSyncConfig, models: LatentSyncModels
                     ) -> dict[str, Any] | None:
    """The UNet's execution choices for compiled forwards: `accel.COMPILED_KERNELS` with
    `frame_attention`'s kernel on CUDA ("auto": the Triton kernel where Triton is
    installed) and, when compiling (not for `aot`: its artifacts take the weights as
    inputs, and the table is not a weight), the timestep table; None (the defaults)
    elsewhere."""
    if models.device.type != "cuda":
        return None
    if config.frame_attention == "auto":
        temporal = "triton" if frame_attention.AVAILABLE else "math"
    else:
        temporal = "triton" if config.frame_attention == "triton" else "math"
    if temporal == "triton" and not frame_attention.AVAILABLE:
        raise ConfigError("renderer.latentsync.frame_attention: 'triton' needs Triton (CUDA"
                          " builds of torch ship it); use 'matmul'")
    return {**accel.COMPILED_KERNELS, "temporal_attention": temporal,
            "timestep_table": config.compile and not config.aot}


def use_compile_cache(path: Path) -> None:
    """Point Inductor's on-disk caches (compiled kernels, FX graphs) at `path`, unless the
    environment already names a folder (TORCHINDUCTOR_CACHE_DIR wins)."""
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def scheduler_for(sampler: Literal["ddim", "dpm++"]) -> Callable[[], Scheduler]:
    """A factory of fresh schedulers of one kind (multistep ones hold per-loop state)."""

    def make() -> Scheduler:
        scheduler = accel.make_scheduler(sampler)
        assert isinstance(scheduler, Scheduler)  # accel's are the diffusers classes
        return scheduler

    return make


@dataclass(frozen=True, slots=True)
class _ChunkPlan:
    """A validated chunk: its avatar's faces, 16 frame specs (padded) and audio."""

    chunk: RenderChunk
    avatar: Avatar
    faces: AvatarFaces
    specs: tuple[FrameSpec, ...]  # CHUNK_FRAMES specs: the chunk's, then its last repeated
    audio: AudioRequest


class _Loaded:
    """What a live renderer holds; dropped by `close()`. `turn_start` denoises the calls
    that hold a turn's first chunk when config asks for a faster setting there."""

    def __init__(self, models: LatentSyncModels, denoiser: ChunkDenoiser, masks: CropMasks,
                 turn_start: ChunkDenoiser | None = None) -> None:
        self.models = models
        self.denoiser = denoiser
        self.turn_start = turn_start
        self.masks = masks
        self.faces: dict[str, AvatarFaces] = {}

    def denoisers(self) -> list[ChunkDenoiser]:
        return [self.denoiser] + ([self.turn_start] if self.turn_start is not None else [])


class LatentSyncRenderer:
    """media.types.Renderer running LatentSync; `avatars` maps an avatar id to an Avatar.

    Loads the checkpoints of `config.checkpoint_dir` on `device` (default: the
    first CUDA device; there is no CPU default, a real chunk would take minutes)
    in `dtype` (default: `config.dtype` on CUDA, float32 on the CPU).
    `noise_predictor` and `scheduler` (a factory of the sampler of each denoising
    loop) replace the ones config asks for (`noise_predictor_for`, `scheduler_for`).
    `models` skips loading (shared, already-built modules; see `from_models`), and
    `resolution` then overrides the crop size.
    """

    # Host work beside the device's: the paste-back's host part (backgrounds, where the
    # faces go) runs while the device denoises, every stage is queued without a wait
    # (stage times from CUDA events) and pasted windows come back through pinned memory.
    # False: the order before (a wait at every stage's end, the paste planned after its
    # decode); benchmarks set it to measure the difference.
    overlap = True
    # With `overlap`: the paste-back's host planning done a piece at a time between the
    # UNet's steps, instead of after the loop is queued. In the server on an H100 the
    # thread waits inside the exact loop's graph launches for most of the UNet, so
    # planned after the loop it runs after the UNet (bench/results/gpu_serve_h100.md,
    # session 13). Off until measured on a GPU: benchmarks set it.
    plan_between_steps = False

    def __init__(
        self,
        avatars: Callable[[str], Avatar],
        config: LatentSyncConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        noise_predictor: NoisePredictor | None = None,
        scheduler: Callable[[], Scheduler] | None = None,
        models: LatentSyncModels | None = None,
        resolution: int | None = None,
    ) -> None:
        self._avatars = avatars
        self.resolution = resolution or config.resolution
        if models is None:
            check_checkpoint_dir(Path(config.checkpoint_dir), self.resolution)
            dev = _pick_device(device)
            models = load_models(
                Path(config.checkpoint_dir), self.resolution, device=dev,
                dtype=dtype or (_DTYPES[config.dtype] if dev.type == "cuda" else torch.float32),
            )
        if self.resolution % models.codec.downsample:
            raise ConfigError(f"crop size {self.resolution} is not a multiple of the VAE's "
                              f"{models.codec.downsample}x downsampling")
        denoiser = ChunkDenoiser(
            models, inference_steps=config.inference_steps,
            guidance_scale=config.guidance_scale, seed=config.seed,
            predictor=noise_predictor or noise_predictor_for(config, models),
            scheduler=scheduler or scheduler_for(config.sampler))
        turn_start = None
        if config.turn_start_deepcache_interval not in (1, config.deepcache_interval):
            turn_start = ChunkDenoiser(
                models, inference_steps=config.inference_steps,
                guidance_scale=config.guidance_scale, seed=config.seed,
                predictor=noise_predictor_for(config, models,
                                              config.turn_start_deepcache_interval),
                scheduler=scheduler or scheduler_for(config.sampler))
        if (config.compile and config.cuda_graphs and not config.aot
                and models.device.type == "cuda"):
            models.codec.compile_decoder()  # shared models: every renderer over them
        masks = crop_masks(self.resolution, models.codec.downsample, models.device)
        self._loaded: _Loaded | None = _Loaded(models, denoiser, masks, turn_start)
        self._seed = config.seed
        self._graphs = config.cuda_graphs and models.device.type == "cuda"
        self._lock = threading.Lock()
        self._caps = RendererCapabilities(
            name="latentsync",
            chunk_frames=CHUNK_FRAMES,
            max_batch=config.max_batch,
            audio_lookahead_ms=LOOKAHEAD_MS,
            device=str(models.device),
        )

    @classmethod
    def from_models(
        cls,
        avatars: Callable[[str], Avatar],
        models: LatentSyncModels,
        config: LatentSyncConfig | None = None,
        *,
        resolution: int | None = None,
        noise_predictor: NoisePredictor | None = None,
        scheduler: Callable[[], Scheduler] | None = None,
    ) -> LatentSyncRenderer:
        """A renderer over already-built modules (shared: `close` only drops this renderer's
        references); `resolution` may be any multiple of the VAE's downsampling (tiny models
        use small crops)."""
        return cls(avatars, config or LatentSyncConfig(), models=models, resolution=resolution,
                   noise_predictor=noise_predictor, scheduler=scheduler)

    @property
    def capabilities(self) -> RendererCapabilities:
        return self._caps

    def warmup(self) -> None:
        """Run one synthetic chunk through every stage (encode, audio, UNet, decode, paste)
        so the first real chunk pays no first-call costs. Its frames are silent: the audio
        encoder runs once for the features of silence, which every turn's tail needs.
        With CUDA graphs, the audio encoder (1 to max_batch windows) and the UNet
        predictor (every batch size) are captured first."""
        with self._lock, torch.inference_mode():
            core = self._core()
            with device_scope(core.models.device):
                models, r = core.models, self.resolution
                side = r // models.codec.downsample
                grey = torch.zeros(1, 3, r, r, device=models.device)
                noise = torch.zeros(1, models.codec.latent_channels, side, side)
                latent = models.codec.encode(grey, noise)[:, :, None]  # (1, C, 1, h, w)
                latents = latent.expand(-1, -1, CHUNK_FRAMES, -1, -1)
                speech = np.zeros(CHUNK_FRAMES, bool)
                silent = np.zeros(required_samples(CHUNK_FRAMES, WARMUP_FPS), np.float32)
                audio = audio_conditioning(models, [AudioRequest(
                    chunk_audio(silent, 0, CHUNK_FRAMES, WARMUP_FPS, False), speech)])
                if self._graphs:  # the audio encoder of 1 to max_batch windows (30 s each)
                    models.audio.capture(range(1, self._caps.max_batch + 1))
                for denoiser in core.denoisers():
                    self._capture_graphs(denoiser, latents.shape, audio.shape)
                    out = denoiser.denoise(core.masks.latent, latents, latents, audio)
                pictures = core.denoiser.decode(out[0].permute(1, 0, 2, 3))  # (F, 3, r, r)
                if self._graphs:  # a turn's lead pieces (frame 0, then 1-3): graphed decodes
                    sizes = [e - a for a, e in stream_pieces(CHUNK_FRAMES)[:LEAD_PIECES]]
                    channels = models.codec.latent_channels
                    models.codec.capture_decode([(n, channels, side, side) for n in sizes])
                frame = np.full((1, 2 * r, 2 * r, 3), 127, np.uint8)
                centred = np.array([[[1.0, 0.0, -r / 2], [0.0, 1.0, -r / 2]]])
                # The paste-back as `_render` runs it: pinned copies both ways, an event.
                plan = plan_paste(frame, centred, np.ones(1, bool), r, models.device)
                assert plan is not None
                windows, copied = _to_host(blend_faces(plan, pictures[:1], core.masks.paste_alpha))
                if copied is not None:
                    copied.synchronize()
                write_windows(frame, plan, windows.numpy())

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]:
        return self._render_batch(batch, None)

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]:
        """`render`, handing over the first frames of each turn's first chunk early
        (`media.types.StreamsFrames`): its frame 0, then frames 1-3, are decoded and
        pasted alone, before the rest of the batch; the rest 4 frames at a time
        (`media.types.stream_pieces`, `LEAD_PIECES`)."""
        return self._render_batch(batch, on_frames)

    def _render_batch(self, batch: Sequence[RenderChunk],
                      on_frames: FrameSink | None) -> list[RenderResult]:
        if not batch:
            return []
        if len(batch) > self._caps.max_batch:
            raise RenderError(f"batch of {len(batch)} chunks exceeds max_batch "
                              f"{self._caps.max_batch}", retryable=False)
        with self._running(f"rendering {len(batch)} chunks") as core:
            return self._render(core, batch, on_frames)

    def prepare_avatar(self, avatar: str, max_frames: int | None = None) -> AvatarPrep:
        """Compute the avatar's face inputs ahead of its first chunk (`PreparesAvatars`):
        every clip's track and the latents of at most `max_frames` more source frames
        (None: all). The cache is the one renders use, so a prepared frame is never
        encoded again, and its latents are the ones a render would have encoded."""
        with self._running(f"preparing avatar {avatar!r}") as core:
            faces = self._faces(core, self._avatar(avatar))
            try:
                return faces.prepare(max_frames)
            except ValueError as exc:  # malformed avatar extras
                raise RenderError(str(exc), retryable=False) from None

    def close(self) -> None:
        """Drop the face caches and this renderer's references to the models (freeing them
        when it loaded them itself), then return cached GPU memory."""
        with self._lock:
            loaded, self._loaded = self._loaded, None
            if loaded is None:
                return
            device = loaded.models.device
            loaded.faces.clear()
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def _capture_graphs(self, denoiser: ChunkDenoiser, latents: torch.Size, audio: torch.Size
                        ) -> None:
        """latents (1, C, F, h, w) and audio (F, S, W) of one chunk: capture the UNet input
        shapes of every batch size (guided: 2B rows)."""
        predictor = denoiser.predictor
        if not isinstance(predictor, GraphPredictor):
            return
        _, c, f, h, w = latents
        halves = 2 if denoiser.guided else 1
        for b in range(1, self._caps.max_batch + 1):
            rows = halves * b
            predictor.warmup((rows, 1 + 3 * c, f, h, w), (rows * audio[0], *audio[1:]))

    # --- one batch ----------------------------------------------------------------

    def _core(self) -> _Loaded:
        if self._loaded is None:
            raise RenderError("the LatentSync renderer is closed", retryable=False)
        return self._loaded

    @contextlib.contextmanager
    def _running(self, what: str) -> Iterator[_Loaded]:
        """Serialised device work: the lock, inference mode, this renderer's device as the
        current one; out of memory becomes GpuOutOfMemory."""
        with self._lock, torch.inference_mode():
            core = self._core()
            try:
                with device_scope(core.models.device):
                    yield core
            except torch.cuda.OutOfMemoryError as exc:
                if core.models.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise GpuOutOfMemory(f"out of GPU memory {what}: {exc}") from None

    def _avatar(self, avatar_id: str) -> Avatar:
        try:
            return self._avatars(avatar_id)
        except (KeyError, NotFound) as exc:  # a mapping's or agent.avatars' "no such avatar"
            raise RenderError(f"unknown avatar {avatar_id!r}: {exc}", retryable=False) from None

    def _faces(self, core: _Loaded, avatar: Avatar) -> AvatarFaces:
        faces = core.faces.get(avatar.id)
        if faces is None or faces.avatar is not avatar:  # first use, or the avatar was reloaded
            faces = AvatarFaces(avatar, self.resolution, core.models.codec, core.masks, self._seed)
            core.faces[avatar.id] = faces
        return faces

    def _render(self, core: _Loaded, batch: Sequence[RenderChunk],
                on_frames: FrameSink | None = None) -> list[RenderResult]:
        device = core.models.device
        clock = _StageClock(device, sync=not self.overlap)
        plans = [self._plan(core, chunk) for chunk in batch]
        clock.mark(None)
        audio = audio_conditioning(core.models, [p.audio for p in plans])  # (B*16, S, C)
        clock.mark("audio_features")
        inputs = [self._face_inputs(p) for p in plans]
        masked = torch.stack([i.masked for i in inputs]).transpose(1, 2)  # (B, C, 16, h, w)
        reference = torch.stack([i.reference for i in inputs]).transpose(1, 2)
        clock.mark("face")
        denoiser = core.denoiser
        if core.turn_start is not None and any(p.chunk.first_frame == 0 for p in plans):
            denoiser = core.turn_start
        counts = [len(p.chunk.frames) for p in plans]
        # Decode stages: per chunk, its (start, end) frame ranges, each pasted (and for a
        # streaming chunk handed over) as a piece. A streaming chunk (a turn's first) has
        # a stage for each of its LEAD_PIECES and the rest of its pieces in the last stage;
        # every other chunk is one piece of the last stage.
        streams = [on_frames is not None and p.chunk.first_frame == 0 for p in plans]
        outputs = [np.empty((n, p.avatar.height, p.avatar.width, 3), np.uint8)
                   for p, n in zip(plans, counts, strict=True)]
        stages: list[list[_Piece]] = [[] for _ in range(LEAD_PIECES + 1)]
        for b, n in sorted(enumerate(counts), key=lambda bn: not streams[bn[0]]):
            for i, (a, e) in enumerate(stream_pieces(n) if streams[b] else [(0, n)]):
                handed = on_frames is not None and streams[b] and e < n
                stages[min(i, LEAD_PIECES) if streams[b] else -1].append(_Piece(b, a, e, handed))
        r = self.resolution

        def planning(pieces: list[_Piece]) -> Iterator[None]:
            """The host's paste-back work before the faces (backgrounds, where faces go),
            a frame's background or a piece's paste plan at a time."""
            for piece in pieces:
                plan, face = plans[piece.chunk], inputs[piece.chunk]
                frames = outputs[piece.chunk][piece.start : piece.end]
                for out, spec in zip(frames, plan.chunk.frames[piece.start : piece.end],
                                     strict=True):
                    source_picture(plan.avatar, spec, out)
                    yield
                piece.plan = plan_paste(frames, face.crop_affines[piece.start : piece.end],
                                        face.has_face[piece.start : piece.end], r, device)
                yield

        def plan_all(work: Iterator[None]) -> None:
            """The rest of a `planning`, timed."""
            start = time.perf_counter()
            for _ in work:
                pass
            clock.add_host("paste", time.perf_counter() - start)

        def hand_over(piece: _Piece) -> None:
            """Wait for the piece's pasted windows, write them into its frames, hand over."""
            start = time.perf_counter()
            if piece.plan is not None and piece.windows is not None:
                if piece.copied is not None:
                    piece.copied.synchronize()
                write_windows(outputs[piece.chunk][piece.start : piece.end], piece.plan,
                              piece.windows.numpy())
            clock.add_host("paste", time.perf_counter() - start, always=True)
            if on_frames is not None and piece.handed:
                on_frames(piece.chunk, outputs[piece.chunk][: piece.end])

        # With a device to overlap, the host plans every piece while the device denoises
        # (the host is ahead of it: nothing above waited for the UNet): once the loop is
        # queued, or with `plan_between_steps` (on any device) a frame or a piece after
        # each step is queued, and the rest after the loop.
        between = self.overlap and self.plan_between_steps
        ahead = self.overlap and (device.type == "cuda" or between)
        work = planning([piece for stage in stages for piece in stage])

        def plan_a_little() -> None:
            start = time.perf_counter()
            next(work, None)
            clock.add_host("paste", time.perf_counter() - start)

        latents = denoiser.denoise(core.masks.latent, masked, reference, audio,
                                   between_steps=plan_a_little if between else None)
        clock.mark("inference")
        if ahead:
            plan_all(work)
            clock.mark("paste")
        queued: list[_Piece] = []
        for stage in stages:
            if not stage:
                continue
            # One decode call (DECODE_BATCH frames a pass) per stage.
            real = torch.cat([latents[p.chunk, :, p.start : p.end].transpose(0, 1)
                              for p in stage])
            pictures = core.denoiser.decode(real)  # (frames, 3, r, r) in [-1, 1]
            clock.mark("decode")
            if not ahead:
                plan_all(planning(stage))
            first = 0
            for piece in stage:
                size = piece.end - piece.start
                if piece.plan is not None:
                    windows = blend_faces(piece.plan, pictures[first : first + size],
                                          core.masks.paste_alpha)
                    piece.windows, piece.copied = _to_host(windows)
                first += size
            clock.mark("paste")
            queued.extend(stage)
            # A stage of a turn's lead frames is handed over as soon as it is done, before
            # the next stage is queued; the rest wait until every stage is queued.
            if not self.overlap or any(piece.handed for piece in stage):
                for piece in queued:
                    hand_over(piece)
                queued.clear()
        for piece in queued:
            hand_over(piece)
        seconds = clock.seconds()
        return [RenderResult(key=p.chunk.key, frames=f, stages=dict(seconds))
                for p, f in zip(plans, outputs, strict=True)]

    def _plan(self, core: _Loaded, chunk: RenderChunk) -> _ChunkPlan:
        avatar = self._avatar(chunk.avatar)
        n = len(chunk.frames)
        problem = None
        if chunk.fps != avatar.fps:
            problem = f"chunk at {chunk.fps} fps for avatar {avatar.id!r} at {avatar.fps} fps"
        elif n > CHUNK_FRAMES:
            problem = f"chunk of {n} frames exceeds {CHUNK_FRAMES}"
        if problem is not None:
            raise RenderError(problem, retryable=False)
        try:
            for spec in chunk.frames:
                avatar.check_ref(spec.source)
                if spec.blend_to is not None:
                    avatar.check_ref(spec.blend_to)
            audio = chunk_audio(chunk.audio, chunk.first_frame, n, chunk.fps, chunk.end_of_turn)
        except ValueError as exc:
            raise RenderError(f"chunk {chunk.key}: {exc}", retryable=False) from None
        faces = self._faces(core, avatar)
        specs = chunk.frames + (chunk.frames[-1],) * (CHUNK_FRAMES - n)
        speech = np.array([s.speech for s in chunk.frames], bool)
        return _ChunkPlan(chunk, avatar, faces, specs, AudioRequest(audio, speech))

    @staticmethod
    def _face_inputs(plan: _ChunkPlan) -> FaceInputs:
        try:
            first = plan.faces.inputs([s.source for s in plan.specs])
            if all(s.blend_to is None for s in plan.specs):
                return first
            second = plan.faces.inputs([s.blend_to or s.source for s in plan.specs])
        except ValueError as exc:  # malformed avatar extras
            raise RenderError(str(exc), retryable=False) from None
        weights = np.array([s.blend_weight if s.blend_to is not None else 0.0
                            for s in plan.specs])
        return blend_inputs(first, second, weights)


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not cuda_available():
        raise ConfigError("the LatentSync renderer needs a CUDA device and none is available;"
                          " use --renderer cpu (or pass device='cpu' to run slowly anyway)")
    return torch.device("cuda", 0)


@dataclass(eq=False, slots=True)
class _Piece:
    """Frames [start, end) of a batch's chunk, pasted (and maybe handed over) together."""

    chunk: int
    start: int
    end: int
    handed: bool  # goes to the sink before the call returns
    plan: PastePlan | None = None
    windows: torch.Tensor | None = None  # the pasted windows on the host (maybe still copying)
    copied: torch.cuda.Event | None = None  # set when `windows` has arrived


def _to_host(windows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A device tensor's copy on the host and, on CUDA, the event of its arrival: the copy
    goes into pinned memory behind the queued work, and nothing waits for it here."""
    if windows.device.type != "cuda":
        return windows.cpu(), None
    host = torch.empty(windows.shape, dtype=windows.dtype, pin_memory=True)
    host.copy_(windows, non_blocking=True)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record()
    return host, done


class _StageClock:
    """Seconds per stage of one batch (`RenderResult.stages`).

    `mark(stage)` ends a span of the stream's work at the current point and books it to
    `stage` (None: untimed). On CUDA the marks are events recorded in the stream, so
    timing waits for nothing (a span is the device's time for the work queued in it;
    `sync` waits at every mark instead, as the renderer used to); elsewhere they are host
    clock readings. `add_host` books host work done outside the spans (on CUDA, work done
    while the device runs; `always`: also elsewhere)."""

    STAGES = ("audio_features", "face", "inference", "decode", "paste")

    def __init__(self, device: torch.device, sync: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.sync = sync
        self._marks: list[tuple[str | None, torch.cuda.Event | float]] = []
        self._host = dict.fromkeys(self.STAGES, 0.0)

    def mark(self, stage: str | None) -> None:
        if not self.cuda:
            self._marks.append((stage, time.perf_counter()))
            return
        if self.sync:
            torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        self._marks.append((stage, event))

    def add_host(self, stage: str, seconds: float, always: bool = False) -> None:
        if self.cuda or always:
            self._host[stage] += seconds

    def seconds(self) -> dict[str, float]:
        """Every stage's seconds; on CUDA waits for the last mark's work."""
        out = dict(self._host)
        if self.cuda and self._marks:
            last = self._marks[-1][1]
            assert isinstance(last, torch.cuda.Event)
            last.synchronize()
        for (_, begin), (stage, end) in itertools.pairwise(self._marks):
            if stage is None:
                continue
            if isinstance(begin, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
                out[stage] += begin.elapsed_time(end) / 1000
            else:
                assert isinstance(begin, float) and isinstance(end, float)
                out[stage] += end - begin
        return out
