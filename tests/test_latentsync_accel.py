"""Fast UNet predictors at tiny size: DeepCache exactness, schedulers, AOT keys, CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from media.latentsync.accel import (
    CompiledPredictor,
    GraphPredictor,
    NoisePredictor,
    SchedulerKind,
    UNetPredictor,
    denoise,
    make_scheduler,
)
from media.latentsync.config import UNetConfig
from media.latentsync.unet import DeepCacheState, UNet3DConditionModel
from media.latentsync.verify import relative_error
from tests.latentsyncutil import small_unet_for_compilers, tiny_unet_for_runners

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_one_thread")]

B, F, H, W = 1, 4, 8, 8  # one chunk (CFG batch 2) of 4 frames, 8x8 latents
STEPS = 9


@pytest.fixture(scope="module")
def unet() -> UNet3DConditionModel:
    return tiny_unet_for_runners()


@pytest.fixture(scope="module")
def small_unet() -> UNet3DConditionModel:
    """For the compiling tests: Dynamo's tracing time grows with the UNet's graph."""
    return small_unet_for_compilers()


def chunk_inputs(
    seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise (B,4,F,H,W), conditions (2B,9,F,H,W), audio (2B*F,50,384), unconditional half 0)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, 4, F, H, W, generator=gen)
    conditions = torch.randn(B, 9, F, H, W, generator=gen).repeat(2, 1, 1, 1, 1)
    audio = torch.cat([torch.zeros(B * F, 50, 384), torch.randn(B * F, 50, 384, generator=gen)])
    return tuple(t.to(device, dtype) for t in (noise, conditions, audio))  # type: ignore[return-value]


def run(
    predictor: NoisePredictor, seed: int, steps: int = STEPS, kind: SchedulerKind = "ddim"
) -> torch.Tensor:
    noise, conditions, audio = chunk_inputs(seed)
    with torch.inference_mode():
        return denoise(predictor, make_scheduler(kind), noise, conditions, audio, steps=steps)


class PlainUNet:
    """The UNet called exactly as the pipeline would without any predictor."""

    def __init__(self, unet: UNet3DConditionModel) -> None:
        self.unet = unet

    def reset(self) -> None:
        pass

    def __call__(
        self, latent_model_input: torch.Tensor, t: torch.Tensor | int, audio: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.unet(latent_model_input, t, audio)
        return out


def test_refresh_step_is_the_exact_unet(unet: UNet3DConditionModel) -> None:
    noise, conditions, audio = chunk_inputs(1)
    x = torch.cat([noise.repeat(2, 1, 1, 1, 1), conditions], dim=1)  # (2B, 13, F, H, W)
    cache = DeepCacheState(refresh=True)
    with torch.inference_mode():
        exact = unet(x, 501, audio)
        refreshed = unet(x, 501, audio, cache=cache)
        assert torch.equal(refreshed, exact)
        assert cache.deep is not None and cache.deep.shape[0] == 2 * B
        # A shallow step on the very inputs of the refresh sees the same deep features,
        # so the shallow path (conv_in -> last layer -> conv_out) must give the same output.
        cache.refresh = False
        assert torch.equal(unet(x, 501, audio, cache=cache), exact)


def test_shallow_step_needs_a_refresh_first(unet: UNet3DConditionModel) -> None:
    noise, conditions, audio = chunk_inputs(2)
    x = torch.cat([noise.repeat(2, 1, 1, 1, 1), conditions], dim=1)
    with torch.inference_mode(), pytest.raises(ValueError, match="earlier refresh"):
        unet(x, 501, audio, cache=DeepCacheState(refresh=False))


def test_deepcache_interval_1_equals_exact(unet: UNet3DConditionModel) -> None:
    assert torch.equal(run(UNetPredictor(unet, cache_interval=1), 3), run(PlainUNet(unet), 3))


def test_deepcache_interval_3_is_close_to_exact(unet: UNet3DConditionModel) -> None:
    exact = run(PlainUNet(unet), 4)
    predictor = UNetPredictor(unet, cache_interval=3)
    cached = run(predictor, 4)
    error = relative_error(cached, exact)
    # Measured 1.3e-3 for this input (1.2e-3 to 1.3e-3 over three seeds): the shallow
    # steps really ran (not 0) and stay close to the exact loop.
    assert 1e-4 < error < 1e-2
    # reset() starts the next loop with a refresh: the same inputs give the same result.
    assert torch.equal(run(predictor, 4), cached)


# diffusers' DPM-Solver calls np.array on a torch tensor; torch's __array__ warns about numpy
# 2's `copy` keyword (third-party code, harmless here).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_dpm_solver_runs_the_requested_steps(unet: UNet3DConditionModel) -> None:
    scheduler = make_scheduler("dpm++")
    scheduler.set_timesteps(8)
    assert len(scheduler.timesteps) == 8
    exact = run(PlainUNet(unet), 5, steps=20)
    fast = run(PlainUNet(unet), 5, steps=8, kind="dpm++")
    assert fast.shape == exact.shape == (B, 4, F, H, W)
    assert torch.isfinite(fast).all()
    assert torch.equal(run(PlainUNet(unet), 5, steps=8, kind="dpm++"), fast)


@pytest.mark.parametrize("interval", [1, 3])
def test_guided_predictor_runs_the_loop_of_the_plain_unet(
    unet: UNet3DConditionModel, interval: int
) -> None:
    """The guided forward (the pair's shared part once, the silent half's cross-attention
    as its bias) inside the denoising loop, exact and under DeepCache: the plain loop's
    latents up to float reordering."""
    plain = run(UNetPredictor(unet, interval), 7)
    guided = run(UNetPredictor(unet, interval, guided=True), 7)
    assert relative_error(guided, plain) < 1e-5


def test_compiled_predictor_compiles_each_forward_kind_once(
    small_unet: UNet3DConditionModel,
) -> None:
    """A server warms up batch sizes 1..max_batch of the exact and DeepCache forwards:
    with the batch marked dynamic that is one compile per kind, not one per size (about
    1.5 min each on an H100). Counted with Dynamo's eager backend; the graphs are the
    ones Inductor would compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    predictor = CompiledPredictor(small_unet, backend="eager")  # dynamic=None: the server's
    timestep = torch.full((1,), 500)
    with torch.inference_mode():
        for b in (1, 2, 3):
            # A real chunk's 16 frames: with 4, a batch of 4 videos would equal the frame
            # count, and Dynamo's symbolic sizes keep the two apart with one more compile.
            sample = torch.randn(2 * b, 13, 16, H, W)
            audio = torch.randn(2 * b * 16, 50, 384)
            exact = predictor._forward(sample, timestep, audio, None, refresh=True)
            cache = DeepCacheState()
            predictor._forward(sample, timestep, audio, cache, refresh=True)
            shallow = predictor._forward(sample, timestep, audio, cache, refresh=False)
            assert torch.equal(exact, small_unet(sample, timestep, audio))
            assert torch.equal(shallow, small_unet(sample, timestep, audio, cache=cache))
    assert counters["stats"]["unique_graphs"] == 3  # exact, refresh, shallow
    torch._dynamo.reset()


def test_guided_compiled_predictor_is_static_and_computes_the_guided_forward(
    small_unet: UNet3DConditionModel,
) -> None:
    """The guided forward compiles with concrete shapes, one graph per size and kind,
    without graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    predictor = CompiledPredictor(small_unet, backend="eager", guided=True, dynamic=False)
    assert not predictor.halved
    timestep = torch.full((1,), 500)
    with torch.inference_mode():
        for b in (1, 2):
            sample = torch.randn(2 * b, 13, 16, H, W)
            audio = torch.randn(2 * b * 16, 50, 384)
            out = predictor._forward(sample, timestep, audio, None, refresh=True)
            assert torch.equal(out, small_unet(sample, timestep, audio, guided=True))
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("interval", [1, 3])
def test_guided_compile_with_a_symbolic_batch_is_one_graph_per_kind_for_every_size(
    small_unet: UNet3DConditionModel, interval: int
) -> None:
    """With a symbolic batch the guided predictor hands the UNet one copy of the pair
    (`halved`): no graph break, the plain UNet's loop, and per forward kind one graph
    for one chunk (Dynamo specializes a size of 1) and one for 2 and 3 chunks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    predictor = CompiledPredictor(small_unet, interval, backend="eager", guided=True)
    assert predictor.halved

    class Direct:  # the predictor's forwards without CUDA graphs (this is the CPU)
        def reset(self) -> None:
            predictor.reset()
            self.cache = DeepCacheState() if interval > 1 else None

        def __call__(self, x: torch.Tensor, t: torch.Tensor | int, audio: torch.Tensor
                     ) -> torch.Tensor:
            return predictor._forward(x, torch.as_tensor(t).reshape(1), audio, self.cache,
                                      refresh=predictor._clock.tick())
    with torch.inference_mode():
        for chunks in (1, 2, 3):
            gen = torch.Generator().manual_seed(chunks)
            noise = torch.randn(chunks, 4, F, H, W, generator=gen)
            conditions = torch.randn(chunks, 9, F, H, W, generator=gen).repeat(2, 1, 1, 1, 1)
            audio = torch.cat([torch.zeros(chunks * F, 50, 384),
                               torch.randn(chunks * F, 50, 384, generator=gen)])
            loops = [denoise(p, make_scheduler(), noise, conditions, audio, steps=4)
                     for p in (Direct(), UNetPredictor(small_unet, interval))]
            assert relative_error(loops[0], loops[1]) < 1e-5
    kinds = 1 if interval == 1 else 2  # exact; or DeepCache's refresh and shallow
    assert counters["stats"]["unique_graphs"] == 2 * kinds
    assert not counters["graph_break"]
    torch._dynamo.reset()
    sample = torch.randn(1, 13, F, H, W)
    with pytest.raises(ValueError, match="pass guided=True"):
        small_unet(sample, torch.tensor(500), torch.randn(F, 50, 384), halved=True)
    halved = small_unet(sample, torch.tensor(500), torch.randn(F, 50, 384), guided=True,
                        halved=True)
    assert halved.shape[0] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("interval", "guided"), [(1, False), (3, False), (1, True)])
def test_graph_predictor_matches_eager(
    unet: UNet3DConditionModel, interval: int, guided: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float32 convolutions: the guided forward's half batches may get other cuDNN kernels,
    # whose TF32 rounding alone would differ by 1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = UNet3DConditionModel(unet.config).cuda().eval()
    model.load_state_dict(unet.state_dict())
    noise, conditions, audio = chunk_inputs(6, "cuda")
    with torch.inference_mode():
        eager = denoise(
            UNetPredictor(model, interval), make_scheduler(), noise, conditions, audio, steps=STEPS
        )
        graphs = GraphPredictor(model, interval, guided=guided)
        replayed = denoise(graphs, make_scheduler(), noise, conditions, audio, steps=STEPS)
        again = denoise(graphs, make_scheduler(), noise, conditions, audio, steps=STEPS)
    assert replayed.shape == eager.shape
    # float32 on the GPU: the graphs replay the same kernels (tf32 off by default).
    assert relative_error(replayed, eager) < 1e-4
    assert torch.equal(again, replayed)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graph_predictor_on_a_second_gpu_while_the_first_works(shared_dir: Path) -> None:
    """A renderer's worker thread owns cuda:1 while another thread keeps cuda:0 busy: its
    graphs must be captured and replayed on cuda:1 (the regression: torch's default capture
    stream lives on cuda:0, so capture failed on every chunk of the second GPU's lane)."""
    import threading

    # Random weights from the tiny config (only the config need travel to a GPU machine).
    config = UNetConfig.from_json(shared_dir / "fixtures" / "tiny_unet_config.json")
    torch.manual_seed(0)
    first = UNet3DConditionModel(config).to("cuda:0").eval()
    second = UNet3DConditionModel(config).to("cuda:1").eval()
    second.load_state_dict(first.state_dict())
    stop = threading.Event()

    def keep_busy() -> None:  # allocations and launches on cuda:0 during the capture
        noise, conditions, audio = chunk_inputs(1, "cuda:0")
        with torch.inference_mode(), torch.cuda.device(0):
            while not stop.is_set():
                denoise(UNetPredictor(first), make_scheduler(), noise, conditions, audio, steps=2)
                torch.cuda.synchronize(0)

    results: dict[str, torch.Tensor | BaseException] = {}

    def lane() -> None:
        try:
            noise, conditions, audio = chunk_inputs(6, "cuda:1")
            with torch.inference_mode(), torch.cuda.device(1):
                eager = denoise(UNetPredictor(second, 3), make_scheduler(), noise, conditions,
                                audio, steps=STEPS)
                graphs = GraphPredictor(second, 3)
                replayed = denoise(graphs, make_scheduler(), noise, conditions, audio,
                                   steps=STEPS)
            results["eager"], results["replayed"] = eager, replayed
        except BaseException as exc:  # reported below, not lost in the thread
            results["error"] = exc

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        worker = threading.Thread(target=lane)  # a new thread: current device cuda:0
        worker.start()
        worker.join(timeout=120)
    finally:
        stop.set()
        busy.join(timeout=60)
    assert "error" not in results, repr(results.get("error"))
    replayed, eager = results["replayed"], results["eager"]
    assert isinstance(replayed, torch.Tensor) and isinstance(eager, torch.Tensor)
    assert replayed.device == torch.device("cuda:1")
    assert relative_error(replayed, eager) < 1e-4


def test_moving_the_weights_makes_graph_predictors_capture_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A channels-last switch gives the conv weights new memory; graphs captured before it
    would replay on freed tensors, so the predictor drops them and captures anew.
    (The capture itself needs CUDA; here it is counted.)"""
    model = tiny_unet_for_runners()
    captures: list[tuple[int, ...]] = []

    def capture(self: GraphPredictor, sample_shape: tuple[int, ...], *rest: object) -> object:
        captures.append(sample_shape)
        return object()

    monkeypatch.setattr(GraphPredictor, "_capture", capture)
    pred = GraphPredictor(model)
    shape, audio = (2, 13, F, H, W), (2 * F, 50, 384)
    pred.warmup(shape, audio)
    pred.warmup(shape, audio)
    assert len(captures) == 1
    before = model.weights_version
    model.set_kernels(channels_last=False)  # already contiguous: nothing moves
    assert model.weights_version == before
    pred.warmup(shape, audio)
    assert len(captures) == 1
    model.set_kernels(channels_last=True)
    assert model.weights_version == before + 1
    pred.warmup(shape, audio)
    assert len(captures) == 2
    model.set_kernels(channels_last=False)
