"""LatentSync speed settings from config: sampler, DeepCache and CUDA graphs reach the renderer.

CPU tests use the tiny fixture models; the GPU test builds tiny random models (no
fixtures needed, so it runs on a machine without ../shared).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from agent.config import AgentConfig, DefaultAvatarConfig, LatentSyncConfig
from agent.errors import ConfigError
from media.avatar import Avatar
from media.default_avatar import ensure_default_avatar
from media.latentsync import accel
from media.latentsync import renderer as renderer_module
from media.latentsync.accel import CompiledPredictor, GraphPredictor, UNetPredictor
from media.latentsync.aot import AotLoadError, AotPredictor, compile_package, probe_load
from media.latentsync.audio_features import AudioFeatureExtractor
from media.latentsync.config import UNetConfig
from media.latentsync.pipeline import LatentSyncModels
from media.latentsync.renderer import (
    LatentSyncRenderer,
    compiled_kernels,
    noise_predictor_for,
    scheduler_for,
)
from media.latentsync.unet import UNet3DConditionModel
from media.latentsync.vae import LatentCodec
from media.latentsync.whisper import WhisperEncoder
from media.types import ChunkKey, FrameSpec, RenderChunk, SourceRef
from tests.latentsyncutil import (
    CROP,
    all_devices,
    small_unet_for_compilers,
    tiny_models,
    tiny_vae,
)
from tests.serverutil import speech_like

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_one_thread")]

FPS = 25
FAST = {"sampler": "dpm++", "inference_steps": 4, "deepcache_interval": 3}
# diffusers' DPM-Solver++ set_timesteps calls np.array on a tensor (numpy 2 deprecation).
DPM_WARNING = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=128, clip_seconds=(2.0, 3.0), seed=11)
    return ensure_default_avatar(tmp_path_factory.mktemp("avatars"), config, FPS)


def chunk(avatar: Avatar, n: int = 16, index: int = 0) -> RenderChunk:
    frames = tuple(FrameSpec(SourceRef(1, f), speech=True) for f in range(n))
    return RenderChunk(ChunkKey("s", "t", index), avatar.id, frames, 0,
                       speech_like(1.2, 16_000, seed=3), FPS)


def renderer(avatar: Avatar, models: LatentSyncModels, **settings: Any) -> LatentSyncRenderer:
    """A renderer from config `settings`; `noise_predictor` and `scheduler` override them."""
    explicit = {k: settings.pop(k) for k in ("noise_predictor", "scheduler") if k in settings}
    config = LatentSyncConfig(**{"inference_steps": 2, **settings})
    return LatentSyncRenderer.from_models({avatar.id: avatar}.__getitem__, models, config,
                                          resolution=CROP, **explicit)


def frames_of(made: LatentSyncRenderer, chunks: Sequence[RenderChunk]) -> list[npt.NDArray[Any]]:
    try:
        return [r.frames for r in made.render(chunks)]
    finally:
        made.close()


def test_defaults_are_latentsyncs_exact_settings() -> None:
    config = LatentSyncConfig()
    assert (config.sampler, config.inference_steps, config.guidance_scale,
            config.deepcache_interval, config.cuda_graphs) == ("ddim", 20, 1.5, 1, True)
    for key, bad in (("sampler", "euler"), ("deepcache_interval", 0)):
        with pytest.raises(ConfigError, match=f"renderer.latentsync.{key}"):
            AgentConfig().with_overrides({f"renderer.latentsync.{key}": bad})


@DPM_WARNING
def test_cpu_gets_the_eager_runner_with_the_configured_cache_interval() -> None:
    models = tiny_models()
    assert models.device.type == "cpu"
    predictor = noise_predictor_for(LatentSyncConfig(deepcache_interval=3), models)
    assert isinstance(predictor, UNetPredictor) and not isinstance(predictor, GraphPredictor)
    assert isinstance(scheduler_for("dpm++")(), type(accel.make_scheduler("dpm++")))
    assert isinstance(scheduler_for("ddim")(), type(accel.make_scheduler("ddim")))


@DPM_WARNING
def test_fast_settings_render_what_their_parts_render(avatar: Avatar) -> None:
    models = tiny_models()
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    from_config = frames_of(renderer(avatar, models, **FAST), batch)
    by_hand = frames_of(renderer(
        avatar, models, inference_steps=4,
        noise_predictor=UNetPredictor(models.unet, cache_interval=3, guided=True),
        scheduler=functools.partial(accel.make_scheduler, "dpm++")), batch)
    exact = frames_of(renderer(avatar, models, inference_steps=4), batch)
    for mine, reference, slow in zip(from_config, by_hand, exact, strict=True):
        assert np.array_equal(mine, reference)
        assert not np.array_equal(mine, slow)  # the settings took effect


class _NoReset(UNetPredictor):
    """A DeepCache runner that keeps its step clock and cache across denoising loops."""

    def reset(self) -> None:
        pass


@DPM_WARNING
def test_each_chunk_batch_starts_a_fresh_deepcache_loop(avatar: Avatar) -> None:
    models = tiny_models()
    one = [chunk(avatar)]
    made = renderer(avatar, models, **FAST)
    first, again = made.render(one)[0].frames, made.render(one)[0].frames
    made.close()
    assert np.array_equal(first, again)
    # Without the reset the second loop starts mid-interval on the first loop's cache.
    no_reset = _NoReset(models.unet, 3, guided=True)
    stale = renderer(avatar, models, **{**FAST, "noise_predictor": no_reset})
    assert np.array_equal(stale.render(one)[0].frames, first)
    assert not np.array_equal(stale.render(one)[0].frames, first)
    stale.close()


@DPM_WARNING
def test_the_paste_back_planned_during_the_unet_gives_the_same_frames(avatar: Avatar) -> None:
    # `overlap` (the default) plans every piece's paste-back before the first decode and
    # hands pieces over after all are queued; False plans each after its decode, as before.
    made = renderer(avatar, models := tiny_models(), **FAST)
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    try:
        handed: list[tuple[int, int]] = []
        ahead = made.render_streaming(batch, lambda i, f: handed.append((i, len(f))))
        made.overlap = False
        serial: list[tuple[int, int]] = []
        after = made.render_streaming(batch, lambda i, f: serial.append((i, len(f))))
    finally:
        made.close()
    # Both chunks start a turn: frame 0 of each, then frames 1-3 of each, then the rest.
    assert handed == serial == [(0, 1), (1, 1), (0, 4), (1, 4), (0, 8), (0, 12)]
    assert models.audio.captured == []  # no graphs on the CPU
    for mine, theirs in zip(ahead, after, strict=True):
        np.testing.assert_array_equal(mine.frames, theirs.frames)
        assert set(mine.stages) == set(theirs.stages) == {
            "audio_features", "face", "inference", "decode", "paste"}
        assert mine.stages["paste"] > 0 and mine.stages["decode"] > 0


class _Recording(UNetPredictor):
    """Logs each UNet call in `events` (beside the backgrounds the test logs there)."""

    def __init__(self, unet: UNet3DConditionModel, events: list[str]) -> None:
        super().__init__(unet, guided=True)
        self.events = events

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.events.append("step")
        return super().__call__(*args, **kwargs)


def test_paste_back_planned_between_the_steps_gives_the_same_frames(
        avatar: Avatar, monkeypatch: pytest.MonkeyPatch) -> None:
    # `plan_between_steps`: a frame's background (or a piece's paste plan) after each
    # step is queued, the rest after the loop; the frames are those of the other orders.
    events: list[str] = []
    real_picture = renderer_module.source_picture

    def picture(*args: Any) -> None:
        events.append("background")
        real_picture(*args)

    monkeypatch.setattr(renderer_module, "source_picture", picture)
    made = renderer(avatar, models := tiny_models(), inference_steps=4,
                    noise_predictor=_Recording(models.unet, events))
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    try:
        made.plan_between_steps = True
        handed: list[tuple[int, int]] = []
        stepwise = made.render_streaming(batch, lambda i, f: handed.append((i, len(f))))
        order = list(events)
        made.plan_between_steps = False
        events.clear()
        after = made.render_streaming(batch, lambda i, f: None)
        assert events == ["step"] * 4 + ["background"] * 23  # CPU: each after its decode
    finally:
        made.close()
    # After each of the 4 steps one unit of planning, in hand-over order: chunk 0's frame
    # 0 (its background, then its paste plan), then chunk 1's; the other 21 backgrounds
    # come after the loop.
    assert order == ["step", "background", "step", "step", "background", "step"] + [
        "background"] * 21
    assert handed == [(0, 1), (1, 1), (0, 4), (1, 4), (0, 8), (0, 12)]
    for mine, theirs in zip(stepwise, after, strict=True):
        np.testing.assert_array_equal(mine.frames, theirs.frames)


# --- CUDA ----------------------------------------------------------------------------


class _CountingGraphs(GraphPredictor):
    """Records each input shape it captures graphs for."""

    def __init__(self, unet: UNet3DConditionModel, cache_interval: int) -> None:
        super().__init__(unet, cache_interval)
        self.captured: list[tuple[int, ...]] = []

    def _capture(self, sample_shape: tuple[int, ...], *args: Any) -> Any:
        self.captured.append(sample_shape)
        return super()._capture(sample_shape, *args)


def random_tiny_models(device: str) -> LatentSyncModels:
    """The tiny fixture architecture with seeded random weights, and Whisper tiny, float32."""
    config = UNetConfig(block_out_channels=(32, 64, 64, 64))
    with torch.random.fork_rng(all_devices()), torch.device(device):
        torch.manual_seed(0)
        unet = UNet3DConditionModel(config).eval().requires_grad_(False)
        encoder = WhisperEncoder().eval().requires_grad_(False)
        vae = tiny_vae()
    audio = AudioFeatureExtractor(encoder, device=device)
    return LatentSyncModels(unet, LatentCodec(vae), audio)


@DPM_WARNING
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_are_captured_at_warmup_and_render_what_eager_renders(
    avatar: Avatar,
) -> None:
    models = random_tiny_models("cuda")
    assert isinstance(noise_predictor_for(LatentSyncConfig(), models), GraphPredictor)
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    graphs = _CountingGraphs(models.unet, 3)
    made = renderer(avatar, models, **FAST, max_batch=3, noise_predictor=graphs)
    made.warmup()
    # Guided: 2B rows for B = 1..max_batch, captured before any chunk.
    assert [s[0] for s in graphs.captured] == [2, 4, 6]
    replayed = frames_of(made, batch)
    assert len(graphs.captured) == 3
    eager = frames_of(renderer(avatar, models, **FAST, cuda_graphs=False), batch)
    for mine, reference in zip(replayed, eager, strict=True):
        assert np.abs(mine.astype(int) - reference).max() <= 2


@DPM_WARNING
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_turns_first_frames_stream_on_cuda_as_eager_renders_them(avatar: Avatar) -> None:
    models = random_tiny_models("cuda")
    made = renderer(avatar, models, **FAST, max_batch=1)
    made.warmup()
    assert models.audio.captured == [1]  # the audio encoder's graph, beside the UNet's
    handed: list[npt.NDArray[Any]] = []
    serial: list[npt.NDArray[Any]] = []
    try:
        (streamed,) = made.render_streaming([chunk(avatar)], lambda i, f: handed.append(f.copy()))
        made.overlap = False  # the order before: a wait at each stage, paste planned after
        (waited,) = made.render_streaming([chunk(avatar)], lambda i, f: serial.append(f.copy()))
    finally:
        made.close()
    assert [len(f) for f in handed] == [len(f) for f in serial] == [1, 4, 8, 12]
    for frames in handed:
        np.testing.assert_array_equal(frames, streamed.frames[: len(frames)])
    np.testing.assert_array_equal(waited.frames, streamed.frames)
    for result in (streamed, waited):  # every stage timed, from events or waits
        assert all(result.stages[s] > 0 for s in ("audio_features", "inference", "decode",
                                                  "paste")), result.stages
    (eager,) = frames_of(renderer(avatar, models, **FAST, cuda_graphs=False), [chunk(avatar)])
    assert np.abs(streamed.frames.astype(int) - eager).max() <= 2


def test_compile_is_off_by_default_and_only_compiles_under_cuda_graphs() -> None:
    assert LatentSyncConfig().compile is False
    models = tiny_models()  # CPU: no graphs there, so no compiling either (minutes per shape)
    predictor = noise_predictor_for(LatentSyncConfig(compile=True), models)
    assert type(predictor) is UNetPredictor


@DPM_WARNING
@pytest.mark.gpu
@pytest.mark.timeout(560)  # compiles cold: the UNet and the VAE decoder (about 5 minutes)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_unet_renders_what_eager_renders(
    avatar: Avatar, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    models = random_tiny_models("cuda")
    config = LatentSyncConfig(compile=True, compile_cache_dir=tmp_path / "inductor")
    predictor = noise_predictor_for(config, models)
    # The guided forward (guidance 1.5), one copy of the pair in under a symbolic batch.
    assert isinstance(predictor, CompiledPredictor) and predictor.halved
    # The choices measured for compiling, the Triton kernel where Triton is installed.
    assert models.unet.kernels() == compiled_kernels(config, models)
    assert models.unet.kernels()["channels_last"] is True
    assert (tmp_path / "inductor").is_dir()
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    made = renderer(avatar, models, **FAST, max_batch=2, compile=True,
                    compile_cache_dir=tmp_path / "inductor")
    made.warmup()
    # The VAE decode compiled too, a turn's lead pieces (frame 0, frames 1-3) graphed.
    assert models.codec.compiled
    assert [shape[0] for shape in models.codec.captured] == [1, 3]
    handed: list[int] = []
    (streamed,) = made.render_streaming([chunk(avatar)], lambda i, f: handed.append(len(f)))
    assert handed == [1, 4, 8, 12]
    compiled = frames_of(made, batch)  # (closes the renderer)
    models.codec.use_compiled = False
    eager = frames_of(renderer(avatar, models, **FAST, cuda_graphs=False), batch)
    for mine, reference in zip(compiled, eager, strict=True):
        assert np.abs(mine.astype(int) - reference).max() <= 3
    assert np.abs(streamed.frames.astype(int) - eager[0]).max() <= 3


@DPM_WARNING
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_renderer_on_the_second_gpu_warms_up_and_renders_in_a_worker_thread(
    avatar: Avatar,
) -> None:
    """What a second engine lane does: its thread's current device is cuda:0."""
    import concurrent.futures

    # Built here, one after the other: seeding is global, so building in the threads races.
    models = [random_tiny_models(f"cuda:{index}") for index in (0, 1)]
    results = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for index in (0, 1):
            def lane(index: int = index) -> list[npt.NDArray[Any]]:
                made = renderer(avatar, models[index], **FAST, max_batch=2)
                made.warmup()
                return frames_of(made, [chunk(avatar), chunk(avatar, 7, index=1)])
            results[index] = pool.submit(lane)
        first, second = results[0].result(timeout=300), results[1].result(timeout=300)
    for a, b in zip(first, second, strict=True):  # same seeds on both GPUs
        assert np.abs(a.astype(int) - b).max() <= 2


def later_chunk(avatar: Avatar, first_frame: int = 16) -> RenderChunk:
    frames = tuple(FrameSpec(SourceRef(1, first_frame + f), speech=True) for f in range(16))
    return RenderChunk(ChunkKey("s", "t", 1), avatar.id, frames, first_frame,
                       speech_like(1.5, 16_000, seed=3), FPS)


def test_turn_start_setting_applies_to_calls_holding_a_turns_first_chunk(avatar: Avatar) -> None:
    models = tiny_models()
    start, later = chunk(avatar), later_chunk(avatar)
    made = renderer(avatar, models, inference_steps=4, turn_start_deepcache_interval=3)
    try:
        first_out = made.render([start])[0].frames
        later_out = made.render([later])[0].frames
        mixed = [r.frames for r in made.render([later, start])]  # one call: the faster setting
    finally:
        made.close()

    def cached(batch: list[RenderChunk]) -> list[npt.NDArray[Any]]:
        return frames_of(renderer(avatar, models, inference_steps=4, deepcache_interval=3),
                         batch)

    def exact(batch: list[RenderChunk]) -> list[npt.NDArray[Any]]:
        return frames_of(renderer(avatar, models, inference_steps=4), batch)

    assert np.array_equal(first_out, cached([start])[0])
    assert not np.array_equal(first_out, exact([start])[0])  # the setting changed something
    assert np.array_equal(later_out, exact([later])[0])
    for mine, reference in zip(mixed, cached([later, start]), strict=True):
        assert np.array_equal(mine, reference)


# --- ahead-of-time artifacts ---------------------------------------------------------


def test_aot_setting_gives_the_ahead_of_time_runner(tmp_path: Any) -> None:
    assert LatentSyncConfig().aot is False
    with pytest.raises(ConfigError, match="compile and aot"):
        AgentConfig().with_overrides({"renderer.latentsync.compile": True,
                                      "renderer.latentsync.aot": True})
    config = LatentSyncConfig(aot=True, aot_cache_dir=tmp_path, max_batch=3,
                              deepcache_interval=3)
    predictor = noise_predictor_for(config, tiny_models())
    assert isinstance(predictor, AotPredictor)
    assert (predictor.max_rows, predictor.cache_dir, predictor.guided) == (6, tmp_path, True)
    assert predictor.kinds() == ("refresh", "shallow")
    assert noise_predictor_for(config, tiny_models(), 1).kinds() == ("exact",)  # type: ignore[attr-defined]


@DPM_WARNING
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_aot_runner_is_prepared_at_warmup_and_renders_what_eager_renders(
    avatar: Avatar, tmp_path: Any
) -> None:
    """The renderer's warm-up readies every forward kind before the first chunk. The
    exported programs stand in for the compiled artifacts here (the same graphs, run by
    PyTorch; the slow test in test_latentsync_aot compiles one). The UNet is the small
    one of the export tests (exporting time grows with its graph)."""
    base = tiny_models()
    models = LatentSyncModels(small_unet_for_compilers(), base.codec, base.audio)
    aot = AotPredictor(models.unet, 3, cache_dir=tmp_path, max_rows=4, backend="export",
                       guided=True)  # as the renderer builds it with guidance
    made = renderer(avatar, models, **FAST, max_batch=2, noise_predictor=aot)
    made.warmup()
    assert sorted(load.kind for load in aot.loads) == ["refresh", "shallow"]
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    ahead = frames_of(made, batch)
    assert len(aot.loads) == 2  # nothing compiled or loaded while rendering
    eager = frames_of(renderer(avatar, models, **FAST), batch)
    for mine, reference in zip(ahead, eager, strict=True):
        assert mine.shape == reference.shape
        assert np.abs(mine.astype(int) - reference).max() <= 2


def cuda_package_loader_error(folder: Path) -> str | None:
    """Why torch's loader fails on an AOTInductor package of a one-layer CUDA model built
    as the server builds them, or None."""
    layer = torch.nn.Linear(8, 8).cuda().eval()
    program = torch.export.export(layer, (torch.randn(2, 8, device="cuda"),))
    path = folder / "linear.pt2"
    folder.mkdir(parents=True, exist_ok=True)
    compile_package(program, path)
    try:
        probe_load(path, 0)
    except AotLoadError as exc:
        return str(exc)
    return None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore::UserWarning")
def test_aot_artifacts_under_cuda_graphs_render_what_eager_renders(
    avatar: Avatar, tmp_path: Any
) -> None:
    """AOTInductor on CUDA: the weightless artifact compiles, binds the GPU weights, is
    captured into CUDA graphs per batch size, and the next renderer loads it."""
    broken = cuda_package_loader_error(tmp_path / "probe")
    if broken:  # the renderer then refuses to start with this reason (see aot.probe_load)
        pytest.skip(f"torch's AOTInductor loader fails on any CUDA package here: {broken}")
    models = random_tiny_models("cuda")
    batch = [chunk(avatar), chunk(avatar, 7, index=1)]
    settings = {"max_batch": 2, "aot": True, "aot_cache_dir": tmp_path}
    first = renderer(avatar, models, **settings)
    first.warmup()
    ahead = frames_of(first, batch)
    eager = frames_of(renderer(avatar, models, cuda_graphs=False), batch)
    for mine, reference in zip(ahead, eager, strict=True):
        assert np.abs(mine.astype(int) - reference).max() <= 3
    again = noise_predictor_for(LatentSyncConfig(inference_steps=2, **settings), models)
    assert isinstance(again, AotPredictor)
    renderer(avatar, models, **settings, noise_predictor=again).warmup()
    assert [(load.kind, load.compiled_now) for load in again.loads] == [("exact", False)]
