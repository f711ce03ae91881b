"""Fast noise predictors for the LatentSync UNet, and the schedulers that go with them.

A noise predictor is the pipeline's pluggable step:
`(latent_model_input (2B, 13, F, h, w), t, audio (2B*F, 50, 384)) -> (2B, 4, F, h, w)`,
plus `reset()`, called before each denoising loop (a chunk batch) so that
predictors with per-loop state (DeepCache) start fresh.

- `UNetPredictor`: eager; `cache_interval` N > 1 turns DeepCache on (full UNet on
  steps 0, N, 2N, ..., the shallow path on the others).
- `GraphPredictor`: the same, each input shape captured once into CUDA graphs
  (one for full steps, one for shallow steps) and replayed: no Python or launch
  overhead per step, no compiling.
- `CompiledPredictor`: the same over `torch.compile` (Inductor); `media.latentsync.aot`
  has the ahead-of-time variant (torch.export + AOTInductor artifacts on disk).
- `make_scheduler`: exact DDIM (LatentSync's) or DPM-Solver++ (fewer steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel

from media.latentsync.layers import second_half
from media.latentsync.unet import DeepCacheState, UNet3DConditionModel

# LatentSync's scheduler (Stable Diffusion 1.5's DDIM settings).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

SchedulerKind = Literal["ddim", "dpm++"]


class Scheduler(Protocol):
    """The part of a diffusers scheduler the denoising loop uses."""

    timesteps: torch.Tensor
    init_noise_sigma: float

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def step(
        self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
    ) -> Any: ...


def make_scheduler(kind: SchedulerKind = "ddim") -> Scheduler:
    """A fresh scheduler (they hold per-loop state: make one per denoising loop).

    "ddim": LatentSync's exact sampler (use with 20 steps). "dpm++": second-order
    multistep DPM-Solver++ on the same noise schedule, for 8-10 steps; its last
    steps drop to first order, which keeps few-step runs stable. Both space
    timesteps "leading" (DDIM's setting): the initial noise is taken as the same
    kind of sample the exact loop starts from.
    """
    if kind == "ddim":
        return cast(Scheduler, DDIMScheduler(**SCHEDULER_CONFIG))  # type: ignore[no-untyped-call]
    if kind == "dpm++":
        config = {
            k: v
            for k, v in SCHEDULER_CONFIG.items()
            if k not in ("clip_sample", "set_alpha_to_one")
        }
        dpm = DPMSolverMultistepScheduler(  # type: ignore[no-untyped-call]
            **config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            lower_order_final=True,
            timestep_spacing="leading",
        )
        return cast(Scheduler, dpm)
    raise ValueError(f"unknown scheduler kind {kind!r}; expected 'ddim' or 'dpm++'")


class NoisePredictor(Protocol):
    """The pipeline's UNet step (see the module docstring)."""

    def reset(self) -> None:
        """A new denoising loop starts (a new chunk batch)."""

    def __call__(
        self, latent_model_input: torch.Tensor, t: torch.Tensor | int, audio: torch.Tensor
    ) -> torch.Tensor:
        """(2B, 13, F, h, w), timestep, (2B*F, 50, 384) -> noise (2B, 4, F, h, w)."""
        ...


class _StepClock:
    """Which steps of a loop run the full UNet under DeepCache: 0, N, 2N, ..."""

    def __init__(self, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"cache_interval must be >= 1, got {interval}")
        self.interval = interval
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def tick(self) -> bool:
        """True when this step refreshes the cache (runs the whole UNet)."""
        refresh = self.step % self.interval == 0
        self.step += 1
        return refresh


class UNetPredictor:
    """Eager UNet calls; DeepCache when `cache_interval` > 1 (1 is the exact UNet).

    `guided`: every call is a classifier-free-guidance pair (the pipeline's: equal
    halves, all-zero audio first), run by the UNet's guided forward, which computes the
    shared part once (`UNet3DConditionModel.forward`). The same for every predictor.
    """

    def __init__(self, unet: UNet3DConditionModel, cache_interval: int = 1,
                 guided: bool = False) -> None:
        self.unet = unet
        self.guided = guided
        self._clock = _StepClock(cache_interval)
        self._cache = DeepCacheState() if cache_interval > 1 else None

    def reset(self) -> None:
        self._clock.reset()
        if self._cache is not None:
            self._cache.deep = None

    @torch.inference_mode()
    def __call__(
        self, latent_model_input: torch.Tensor, t: torch.Tensor | int, audio: torch.Tensor
    ) -> torch.Tensor:
        refresh = self._clock.tick()
        if self._cache is not None:
            self._cache.refresh = refresh
        out: torch.Tensor = self.unet(latent_model_input, t, audio, cache=self._cache,
                                      guided=self.guided)
        return out


@dataclass(slots=True)
class _Graphs:
    """Static inputs and the captured graphs of one input shape."""

    sample: torch.Tensor  # (2B, 13, F, h, w)
    timestep: torch.Tensor  # (1,) int64
    audio: torch.Tensor  # (2B*F, 50, 384)
    full: torch.cuda.CUDAGraph
    full_out: torch.Tensor  # (2B, 4, F, h, w), overwritten by every replay
    shallow: torch.cuda.CUDAGraph | None
    shallow_out: torch.Tensor | None


class GraphPredictor:
    """CUDA-graph replay of the UNet, captured once per input shape (lazily or by `warmup`).

    Each shape costs one graph memory pool (the activations of one forward) that
    lives as long as the predictor; the full and shallow graphs of a shape share
    it (safe: they never run at once, outputs are copied out at once and the
    cached deep features are allocated before the shallow graph is captured).
    `sdpa` pins the attention kernels the graphs are captured with.
    """

    WARMUP_CALLS = 2  # eager calls before capture: cuDNN/cuBLAS choose kernels, allocator settles

    def __init__(
        self,
        unet: UNet3DConditionModel,
        cache_interval: int = 1,
        sdpa: Sequence[SDPBackend] | None = None,
        guided: bool = False,
    ) -> None:
        self.unet = unet
        self.guided = guided
        self._run: Callable[..., torch.Tensor] = unet  # what the graphs capture
        self._clock = _StepClock(cache_interval)
        self._sdpa = list(sdpa) if sdpa is not None else None
        self._graphs: dict[tuple[Any, ...], _Graphs] = {}
        self._weights_version = unet.weights_version
        # guided: pass the UNet one copy of the pair (`forward(..., halved=True)`).
        self.halved = False

    def reset(self) -> None:
        self._clock.reset()

    def warmup(self, sample_shape: Sequence[int], audio_shape: Sequence[int]) -> None:
        """Capture the graphs for one input shape now instead of at its first call."""
        param = next(self.unet.parameters())
        self._get(tuple(sample_shape), tuple(audio_shape), param.dtype, param.device)

    @torch.inference_mode()
    def __call__(
        self, latent_model_input: torch.Tensor, t: torch.Tensor | int, audio: torch.Tensor
    ) -> torch.Tensor:
        g = self._get(
            tuple(latent_model_input.shape), tuple(audio.shape), audio.dtype, audio.device
        )
        timestep = torch.as_tensor(t)
        if timestep.numel() != 1:
            raise ValueError(f"GraphPredictor takes one timestep per call, got {timestep.shape}")
        g.sample.copy_(latent_model_input)
        g.audio.copy_(audio)
        # A fill, not a blocking copy from the host, so the host never waits for the
        # stream between steps. On an H100 the compiled 20-step loop took 494 ms either
        # way (bench/results/first_frame_h100.md, runs 1-3).
        g.timestep.fill_(int(timestep.item()))
        if self._clock.tick() or g.shallow is None:
            g.full.replay()
            return g.full_out.clone()
        g.shallow.replay()
        assert g.shallow_out is not None
        return g.shallow_out.clone()

    def _get(
        self,
        sample_shape: tuple[int, ...],
        audio_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> _Graphs:
        if self.unet.weights_version != self._weights_version:
            # set_kernels moved the weights (another predictor of this UNet, say): the
            # graphs captured before read the old, freed tensors. Capture again.
            self._graphs.clear()
            self._weights_version = self.unet.weights_version
        key = (sample_shape, audio_shape, dtype, device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(sample_shape, audio_shape, dtype, device)
        return self._graphs[key]

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        if self._sdpa is None:
            yield
        else:
            with sdpa_kernel(self._sdpa):
                yield

    @torch.inference_mode()
    def _capture(
        self,
        sample_shape: tuple[int, ...],
        audio_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> _Graphs:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        # Real-valued inputs (not zeros) for the warm-up: nothing may hit special paths.
        sample = torch.randn(sample_shape, device=device, dtype=dtype)
        timestep = torch.full((1,), 500, device=device, dtype=torch.long)
        audio = torch.randn(audio_shape, device=device, dtype=dtype)
        cache = DeepCacheState() if self._clock.interval > 1 else None

        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self._kernels():
            for _ in range(self.WARMUP_CALLS):
                self._forward(sample, timestep, audio, cache, refresh=True)
                if cache is not None:
                    self._forward(sample, timestep, audio, cache, refresh=False)
        torch.cuda.current_stream(device).wait_stream(side)

        pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph's default capture stream is created once per process on the
        # device current at the time (cuda:0): a graph of another GPU needs its own stream.
        # Thread-local errors: a renderer on another GPU may allocate while this captures.
        capture = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        full = torch.cuda.CUDAGraph()
        with self._kernels(), torch.cuda.graph(full, pool=pool, stream=capture,
                                               capture_error_mode="thread_local"):
            full_out = self._forward(sample, timestep, audio, cache, refresh=True)
        shallow = shallow_out = None
        if cache is not None:  # cache.deep is now the full graph's static output
            shallow = torch.cuda.CUDAGraph()
            with self._kernels(), torch.cuda.graph(shallow, pool=pool, stream=capture,
                                                   capture_error_mode="thread_local"):
                shallow_out = self._forward(sample, timestep, audio, cache, refresh=False)
        return _Graphs(sample, timestep, audio, full, full_out, shallow, shallow_out)

    def _forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        audio: torch.Tensor,
        cache: DeepCacheState | None,
        *,
        refresh: bool,
    ) -> torch.Tensor:
        if cache is not None:
            cache.refresh = refresh
        if self.guided and self.halved:  # views: no kernel runs, nothing is captured
            return self._call(second_half(sample), timestep, second_half(audio), cache,
                              guided=True, halved=True)
        return self._call(sample, timestep, audio, cache, guided=self.guided)

    def _call(self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor,
              cache: DeepCacheState | None, **flags: bool) -> torch.Tensor:
        return self._run(sample, timestep, audio, cache=cache, **flags)


# The UNet's execution choices (`UNet3DConditionModel.set_kernels`) for compiled forwards
# on CUDA, each measured on an H100 against the others in the same run (B = 8 chunks at
# 256 px, exact 20-step loop; bench/unet_parts.py, bench/results/unet_parts_h100.md):
# - channels-last activations, and the motion modules' 16-frame attention as two batched
#   matmuls instead of cuDNN's fused kernel, whose query tiles are mostly padding there:
#   197 ms a step against 208 (the renderer picks the Triton kernel where it can:
#   `renderer.compiled_kernels`);
# - packed q/k/v projections: 1.4 ms a step less;
# - the timestep table: a 1-chunk loop 5 ms shorter (491-496 against 496-501 ms; session
#   11, bench/results/first_frame_h100.md run 5); off here, the renderer turns it on when
#   compiling but not for AOT artifacts (`renderer.compiled_kernels`);
# - not: the 1x1 convolutions as GEMMs (Inductor turns the up blocks' concatenated
#   shortcuts into slow reductions: 21 ms more), zero-padded thin convolutions and the
#   fused GEGLU kernel (its Triton GEMM runs at 280-480 TFLOP/s where cuBLAS runs at
#   500-540: about 1 ms more).
COMPILED_KERNELS: dict[str, Any] = {
    "channels_last": True,
    "temporal_attention": "math",
    "pointwise_linear": False,
    "packed_qkv": True,
    "padded_convs": False,
    "fused_geglu": False,
    "timestep_table": False,
}


def apply_kernels(unet: UNet3DConditionModel, kernels: dict[str, Any] | None | str) -> None:
    """Set the UNet's kernels for a compiled predictor: "auto" = `COMPILED_KERNELS` on a
    CUDA device and the defaults elsewhere; None leaves them; a dict is applied."""
    if kernels == "auto":
        on_cuda = next(unet.parameters()).device.type == "cuda"
        kernels = COMPILED_KERNELS if on_cuda else None
    if isinstance(kernels, dict):
        unet.set_kernels(**kernels)


class CompiledPredictor(GraphPredictor):
    """`GraphPredictor` over an Inductor-compiled UNet (`torch.compile`).

    Inductor fuses the memory-bound glue between the library kernels (GroupNorm,
    GEGLU, residual adds, layout conversions), then each input shape's compiled
    forward is captured into CUDA graphs as before. Compiling happens in the
    warm-up calls of the first capture of a shape (minutes cold; Inductor's
    on-disk caches under TORCHINDUCTOR_CACHE_DIR make later starts fast).
    `dynamic=None` (the default): the batch dimension of every input is marked
    dynamic before the first call, so one compile of each forward kind (exact;
    DeepCache's refresh and shallow) serves every batch size; left to torch's
    automatic dynamic shapes, the first size would compile static and the second
    compile again. False: static shapes, one compile per size and kind (Dynamo
    gives up after `torch._dynamo.config.recompile_limit` of them, 8 by default).
    `options`: Inductor settings (torch.compile's `options`) instead of a `mode`.
    `backend`: torch.compile's (tests count graphs with "eager").
    `guided`: the UNet's guided forward; with a symbolic batch it gets one copy of the
    pair (`halved`), so the compiled graph only doubles the batch, never halves it.
    `kernels`: the UNet's execution choices to set first (see `apply_kernels`; the
    predictor changes the UNet it is given).
    """

    def __init__(
        self,
        unet: UNet3DConditionModel,
        cache_interval: int = 1,
        sdpa: Sequence[SDPBackend] | None = None,
        mode: str = "default",
        dynamic: bool | None = None,
        options: dict[str, Any] | None = None,
        backend: str = "inductor",
        kernels: dict[str, Any] | None | str = "auto",
        guided: bool = False,
    ) -> None:
        super().__init__(unet, cache_interval, sdpa, guided)
        # A symbolic batch is never halved inside the graph: with torch 2.11 on an H100
        # the guided forward's half of a symbolic batch guarded on being 1 (one chunk),
        # and traced size-obliviously its sizes became data-dependent, a graph break that
        # sent the whole forward back to eager. One copy of the pair goes in instead.
        self.halved = guided and dynamic is not False
        apply_kernels(unet, kernels)
        self.mode = mode
        self._mark_batch = dynamic is None
        # torch.compile takes a mode or Inductor options, not both.
        self._run = (
            torch.compile(unet, options=options, dynamic=dynamic, backend=backend)
            if options
            else torch.compile(unet, mode=mode, dynamic=dynamic, backend=backend)
        )

    def _call(self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor,
              cache: DeepCacheState | None, **flags: bool) -> torch.Tensor:
        if self._mark_batch:  # metadata only: the tensors are untouched
            batched = [sample, audio]
            if cache is not None and cache.deep is not None and not cache.refresh:
                batched.append(cache.deep)
            for tensor in batched:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return super()._call(sample, timestep, audio, cache, **flags)


def denoise(
    predictor: NoisePredictor,
    scheduler: Scheduler,
    noise: torch.Tensor,
    conditions: torch.Tensor,
    audio: torch.Tensor,
    *,
    steps: int,
    guidance: float = 1.5,
) -> torch.Tensor:
    """LatentSync's denoising loop with classifier-free guidance over an audio-free half.

    noise: (B, 4, F, h, w) initial latents; conditions: (2B, 9, F, h, w) mask 1 +
    masked-face latent 4 + reference latent 4, the same for both halves; audio:
    (2B*F, 50, 384), the first B*F rows the unconditional (zero) features.
    Returns the final latents (B, 4, F, h, w). The reference loop of the benchmark
    and tests; the renderer's pipeline runs the same steps.
    """
    if guidance <= 1.0:
        raise ValueError(f"guidance {guidance} <= 1 needs no unconditional half; not supported")
    # Timesteps stay on the CPU: the scheduler's table lookups then need no device sync.
    scheduler.set_timesteps(steps)
    predictor.reset()
    latents = noise * scheduler.init_noise_sigma  # (B, 4, F, h, w)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        model_input = torch.cat([model_input, conditions], dim=1)  # (2B, 13, F, h, w)
        uncond, cond = predictor(model_input, t, audio).chunk(2)  # (B, 4, F, h, w) each
        eps = uncond + guidance * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    out: torch.Tensor = latents
    return out
