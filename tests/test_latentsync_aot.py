"""Ahead-of-time UNet at tiny size: keys, export of each forward kind with a symbolic
batch, the predictor's dispatch, and (slow) a real AOTInductor artifact on disk.

The UNet is the fixture's architecture at two levels (`small_unet_for_compilers`):
exporting and compiling cost grows with the graph, and every block kind is in it."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import pytest
import torch

from media.latentsync import aot as aot_module
from media.latentsync.accel import COMPILED_KERNELS, UNetPredictor, denoise, make_scheduler
from media.latentsync.aot import (
    AotError,
    AotForward,
    AotKey,
    AotLoadError,
    AotMismatchError,
    AotPredictor,
    example_inputs,
    export_forward,
    load_or_compile,
    probe_load,
)
from media.latentsync.config import UNetConfig
from media.latentsync.unet import DeepCacheState, UNet3DConditionModel
from media.latentsync.verify import relative_error
from tests.latentsyncutil import small_unet_for_compilers

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_one_thread")]

F, H, W = 16, 8, 8
LOOP_TOLERANCE = 1e-3  # compiled vs eager over a whole denoising loop (fp32, reordered sums)
ROW, AUDIO_ROW = (13, F, H, W), (50, 384)
# Export traces through diffusers and torch internals that warn about their own APIs.
EXPORT_WARNINGS = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def unet() -> UNet3DConditionModel:
    return small_unet_for_compilers()


def loop(predictor: UNetPredictor | AotPredictor, chunks: int, seed: int) -> torch.Tensor:
    """The exact-settings loop (8 DDIM steps here) over `chunks` chunks with guidance."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(chunks, 4, F, H, W, generator=gen)
    conditions = torch.randn(chunks, 9, F, H, W, generator=gen).repeat(2, 1, 1, 1, 1)
    speech = torch.randn(chunks * F, *AUDIO_ROW, generator=gen)
    audio = torch.cat([torch.zeros_like(speech), speech])
    with torch.inference_mode():
        return denoise(predictor, make_scheduler("ddim"), noise, conditions, audio, steps=8)


def test_aot_key_names_every_dependency(unet: UNet3DConditionModel) -> None:
    key = AotKey.of(unet, "exact", ROW, AUDIO_ROW, 8)
    assert key.gpu == "cpu" and key.dtype == "float32" and key.torch_version == torch.__version__
    assert AotKey.of(unet, "exact", ROW, AUDIO_ROW, 8).filename() == key.filename()
    others = [
        AotKey.of(unet, "refresh", ROW, AUDIO_ROW, 8),
        AotKey.of(unet, "exact", (13, F, 2 * H, 2 * W), AUDIO_ROW, 8),
        AotKey.of(unet, "exact", ROW, AUDIO_ROW, 16),
    ]
    unet.set_kernels(temporal_attention="math")
    others.append(AotKey.of(unet, "exact", ROW, AUDIO_ROW, 8))
    unet.set_kernels(temporal_attention="sdpa")
    assert len({k.filename() for k in others} | {key.filename()}) == 5
    bigger = UNet3DConditionModel(UNetConfig(block_out_channels=(32, 64, 64, 128)))
    assert AotKey.of(bigger, "exact", ROW, AUDIO_ROW, 8).config_sha256 != key.config_sha256


@EXPORT_WARNINGS
@pytest.mark.parametrize("kind", ["exact", "refresh", "shallow"])
def test_each_forward_kind_exports_with_a_symbolic_batch(
    unet: UNet3DConditionModel, kind: str
) -> None:
    """One export serves 1..max_rows rows, and computes what the eager forward does."""
    program = export_forward(unet, kind, ROW, AUDIO_ROW, max_rows=6)  # type: ignore[arg-type]
    module = program.module()
    eager = AotForward(unet, kind)  # type: ignore[arg-type]
    for rows in (1, 3, 6):
        inputs = example_inputs(unet, kind, ROW, AUDIO_ROW, rows)  # type: ignore[arg-type]
        with torch.inference_mode():
            expected, got = eager(*inputs), module(*inputs)
        pairs = zip(expected, got, strict=True) if kind == "refresh" else [(expected, got)]
        for want, have in pairs:
            assert have.shape[0] == rows
            assert relative_error(have, want) < 1e-5
    too_many = example_inputs(unet, kind, ROW, AUDIO_ROW, 7)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="<= 6"), torch.inference_mode():
        module(*too_many)


@EXPORT_WARNINGS
def test_predictor_runs_deepcache_and_exact_loops_as_eager_does(
    unet: UNet3DConditionModel, tmp_path: Path
) -> None:
    """The predictor's dispatch (exact; refresh then shallow steps) over exported
    forwards gives the eager loops' results, at two batch sizes."""
    for interval in (1, 3):
        aot = AotPredictor(unet, interval, cache_dir=tmp_path, max_rows=4, backend="export")
        aot.warmup((4, *ROW), (4 * F, *AUDIO_ROW))
        assert sorted(load.kind for load in aot.loads) == sorted(aot.kinds())
        assert all(load.error < 1e-5 for load in aot.loads)
        for chunks in (1, 2):
            expected = loop(UNetPredictor(unet, interval), chunks, seed=chunks)
            assert relative_error(loop(aot, chunks, seed=chunks), expected) < 1e-5
        with pytest.raises(ValueError, match="6 rows exceeds the compiled 4"):
            loop(aot, 3, seed=0)
    assert not list(tmp_path.iterdir())  # the export backend stores nothing


@EXPORT_WARNINGS
@pytest.mark.parametrize("kind", ["exact", "refresh", "shallow"])
def test_each_guided_kind_takes_one_copy_of_the_pair_for_any_batch(
    unet: UNet3DConditionModel, kind: str
) -> None:
    """The guided export takes N chunks (1..max_rows / 2) and returns the whole pair's
    2N rows: what the eager guided forward gives, and, up to float reordering, the plain
    forward of the pair."""
    program = export_forward(unet, kind, ROW, AUDIO_ROW, max_rows=6,  # type: ignore[arg-type]
                             guided=True)
    module = program.module()
    eager = AotForward(unet, kind, guided=True)  # type: ignore[arg-type]
    for rows in (1, 3):
        inputs = example_inputs(unet, kind, ROW, AUDIO_ROW, rows, guided=True)  # type: ignore[arg-type]
        sample, t, audio, *deep = inputs
        pair = torch.cat([sample, sample]), torch.cat([torch.zeros_like(audio), audio])
        cache = None if kind == "exact" else DeepCacheState(refresh=kind == "refresh",
                                                            deep=deep[0] if deep else None)
        with torch.inference_mode():
            got, want = module(*inputs), eager(*inputs)
            plain = unet(pair[0], t, pair[1], cache=cache)
        got, want = (got[0], want[0]) if kind == "refresh" else (got, want)
        assert got.shape[0] == 2 * rows and relative_error(got, want) < 1e-5
        assert relative_error(got, plain) < 1e-4
    assert AotKey.of(unet, "exact", ROW, AUDIO_ROW, 6, guided=True).filename().startswith(
        "latentsync_unet_guided_exact_")


@EXPORT_WARNINGS
def test_guided_predictor_runs_deepcache_and_exact_loops_as_eager_does(
    unet: UNet3DConditionModel, tmp_path: Path
) -> None:
    for interval in (1, 3):
        aot = AotPredictor(unet, interval, cache_dir=tmp_path, max_rows=4, backend="export",
                           guided=True)
        aot.warmup((4, *ROW), (4 * F, *AUDIO_ROW))
        assert all(load.error < 1e-5 for load in aot.loads)
        for chunks in (1, 2):
            expected = loop(UNetPredictor(unet, interval), chunks, seed=chunks)
            assert relative_error(loop(aot, chunks, seed=chunks), expected) < 1e-5


@EXPORT_WARNINGS
def test_export_traces_the_compiled_kernel_choices(tmp_path: Path) -> None:
    """The exported forward with channels-last activations and the frames' attention as
    matmuls computes what the default eager UNet does, at two batch sizes."""
    unet = small_unet_for_compilers()
    expected = {chunks: loop(UNetPredictor(unet), chunks, seed=chunks) for chunks in (1, 2)}
    aot = AotPredictor(unet, cache_dir=tmp_path, max_rows=4, backend="export",
                       kernels=COMPILED_KERNELS)
    assert unet.kernels() == COMPILED_KERNELS
    aot.warmup((4, *ROW), (4 * F, *AUDIO_ROW))
    for chunks in (1, 2):
        assert relative_error(loop(aot, chunks, seed=chunks), expected[chunks]) < 1e-5


def test_an_artifact_the_loader_rejects_or_crashes_on_is_a_clear_error(
    unet: UNet3DConditionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load of each package happens in a child process: a broken file, or a
    loader that dies (torch 2.11's CUDA loader segfaulted on libraries with a static C++
    runtime), is an error naming the file and what to do, and this process lives on."""
    path = tmp_path / AotKey.of(unet, "exact", ROW, AUDIO_ROW, 4).filename()
    path.write_bytes(b"not a zip archive")
    with pytest.raises(AotLoadError, match=r"loader fails on it.*delete the artifact"):
        AotPredictor(unet, cache_dir=tmp_path, max_rows=4).prepare(
            (2, *ROW), (2 * F, *AUDIO_ROW)
        )
    assert not (tmp_path / (path.name + ".loads")).exists()
    monkeypatch.setattr(aot_module, "_PROBE", "import os, signal; os.kill(os.getpid(), 11)")
    with pytest.raises(AotLoadError, match="killed by signal 11"):
        probe_load(path)


@pytest.mark.slow
@EXPORT_WARNINGS
def test_loading_a_package_skips_torchs_cpu_isa_build_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's loader would compile and load a test library per CPU ISA (most of a fresh
    process's load time on the H100 machines); `load_package` takes the CPU's word."""
    from torch._inductor import cpu_vec_isa

    layer = torch.nn.Linear(8, 8).eval()
    program = torch.export.export(layer, (torch.randn(2, 8),))
    path = tmp_path / "linear.pt2"
    aot_module.compile_package(program, path)
    builds: list[str] = []
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build",
                        lambda isa, code: builds.append(str(isa)) or True)
    # A CPU with every x86 ISA, AMX too (the H100 hosts' Xeons), wherever this runs.
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker",
                        lambda: ["avx2", "avx512", "avx512_vnni", "amx_tile"])
    for check in ("_init_amx", "_is_vnni_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: True)

    forget = aot_module.forget_isa_answers  # torch caches the ISA answers per process
    forget()
    try:
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("torch probes x86 ISAs only")
        torch._inductor.aoti_load_package(str(path))
        # torch's own loader builds test libraries: AVX-512 BF16, VNNI and AMX ones too
        assert {"avx512", "avx512 avx512_vnni", "avx512 avx512_vnni amx_tile"} <= set(builds)
        builds.clear()
        forget()
        runner = aot_module.load_package(path)
        assert builds == []
        x = torch.randn(2, 8)
        assert torch.allclose(runner(x), layer(x), atol=1e-5)
        # Afterwards torch's answers are its own again: a later CPU compile probes as usual.
        assert any(type(i).__name__ == "VecAMX" for i in cpu_vec_isa.valid_vec_isa_list())
        assert any("amx" in b for b in builds)
    finally:
        forget()


@pytest.mark.slow
@EXPORT_WARNINGS
def test_aot_artifact_compiles_once_then_loads_and_runs_any_checkpoint(
    unet: UNet3DConditionModel, tmp_path: Path
) -> None:
    """A real AOTInductor artifact (the CPU build here; about 50 s of compiling):
    stored under its key without the weights, loaded by the next start, the batch
    symbolic, and bound to whichever UNet of this architecture loads it."""
    # The execution choices the server compiles with on CUDA (channels-last weights bound
    # to the weightless artifact, the frames' attention as matmuls).
    first = AotPredictor(unet, cache_dir=tmp_path, max_rows=4, kernels=COMPILED_KERNELS)
    first.prepare((2, *ROW), (2 * F, *AUDIO_ROW))
    [made] = first.loads
    assert made.compiled_now and made.error < 1e-4 and made.path.is_file()
    assert made.path.with_name(made.path.name + ".loads").is_file()  # probed once
    assert made.path.name == AotKey.of(unet, "exact", ROW, AUDIO_ROW, 4).filename()
    assert '"channels_last": true' in AotKey.of(unet, "exact", ROW, AUDIO_ROW, 4).kernels
    weights = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
    assert made.path.stat().st_size < weights / 2  # the code only, not the weights
    for chunks in (1, 2):
        expected = loop(UNetPredictor(unet), chunks, seed=chunks)
        assert relative_error(loop(first, chunks, seed=chunks), expected) < LOOP_TOLERANCE

    # The next start, with another checkpoint of the same config: loaded, not compiled.
    # (The weights shuffled within each tensor: as well-conditioned as they are. A
    # default-initialised UNet is not, and its fp32 results move by 1e-3 under reordering.)
    other = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in other.parameters():
            shuffled = param.flatten()[torch.randperm(param.numel(), generator=gen)]
            param.copy_(shuffled.view(param.shape))
    second = AotPredictor(other, cache_dir=tmp_path, max_rows=4, kernels=COMPILED_KERNELS)
    second.prepare((2, *ROW), (2 * F, *AUDIO_ROW))
    [loaded] = second.loads
    assert not loaded.compiled_now and loaded.path == made.path and loaded.error < 1e-4
    assert loaded.seconds < made.seconds / 10
    expected = loop(UNetPredictor(other), 2, seed=5)
    # An 8-step loop of an untrained UNet amplifies fp32 reordering (1.5e-4 seen in CI);
    # a tensor bound wrong moves it by 0.1 and more.
    assert relative_error(loop(second, 2, seed=5), expected) < LOOP_TOLERANCE
    assert relative_error(loop(second, 2, seed=5), loop(first, 2, seed=5)) > 0.01

    # A UNet missing a tensor the artifact reads: a clear error naming it.
    broken = UNet3DConditionModel(unet.config).eval()
    del broken.conv_in.bias
    broken.conv_in.register_parameter("bias", None)
    with pytest.raises(AotMismatchError, match=r"conv_in\.bias.*delete it to recompile"):
        AotPredictor(broken, cache_dir=tmp_path, max_rows=4, kernels=COMPILED_KERNELS).prepare(
            (2, *ROW), (2 * F, *AUDIO_ROW)
        )
    unet.set_kernels(channels_last=False, temporal_attention="sdpa")  # the module fixture


def test_a_missing_artifact_in_a_cache_it_cannot_write_fails_at_once_naming_the_way_out(
        unet: UNet3DConditionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache under a plain file cannot be made (as one on a read-only volume cannot be
    # written): the error comes before any export, and says how to build the artifact.
    blocker = tmp_path / "weights-volume"
    blocker.write_text("not a folder")
    exported: list[str] = []
    monkeypatch.setattr(aot_module, "export_forward",
                        lambda *args, **kwargs: exported.append("export"))
    with pytest.raises(AotError, match=r"python -m agent warm-up.*aot off") as caught:
        load_or_compile(unet, "exact", ROW, AUDIO_ROW, 8, blocker / "aot")
    assert str(blocker / "aot") in str(caught.value) and exported == []
    # A writable cache passes the check (and leaves no probe file behind).
    aot_module._check_writable(tmp_path / "aot" / "artifact.pt2")
    assert list((tmp_path / "aot").iterdir()) == []
