"""Ahead-of-time compiled UNet: torch.export + AOTInductor artifacts cached on disk.

A server that compiles with `torch.compile` spends minutes per forward kind on
its first start and still re-traces on every later one. Here each forward kind
the pipeline uses (the exact UNet; DeepCache's refresh and shallow passes) is
exported once with a symbolic batch (1..`max_rows` rows, so one artifact serves
every batch size), compiled by AOTInductor to a package on disk, and later
starts only load it (a shared library: seconds).

The artifacts hold no weights (`aot_inductor.package_constants_in_so=False`, and
no tensor inlined into the code): at load the live UNet's parameters are bound to
the compiled model in place, so the GPU keeps one copy, the package is a few MB
instead of the UNet's 2.4 GB, and one artifact serves every checkpoint of the
same architecture.

The library is built by a compiler that links the C++ runtime dynamically
(`toolchain.aoti_compiler`): on the H100 machines, whose g++ wrapper links libstdc++
statically, torch 2.11's CUDA loader segfaulted on every package, whatever it held.

The cache key names everything an artifact depends on: the UNet config, dtype,
forward kind, per-row input shapes, batch range, GPU model and torch version.
Every load is checked against the eager UNet before use.

`AotPredictor` is a `GraphPredictor` whose forwards are these artifacts: on CUDA
each batch size is still captured into CUDA graphs at warm-up. With guidance the
artifacts are the UNet's guided forward given one copy of the pair (the pair's shared
part once, as the compiled and CUDA-graph runners do).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend

from media.latentsync.accel import GraphPredictor, apply_kernels
from media.latentsync.layers import second_half
from media.latentsync.toolchain import ToolchainError, aoti_compiler
from media.latentsync.unet import DeepCacheState, UNet3DConditionModel
from media.latentsync.verify import relative_error

# Names the export/compile recipe below; change it when the recipe changes.
AOT_RECIPE = "export-dynamic-batch+aoti-weightless-v5-shared-cxx-runtime-guided"
# No weights in the package, and none inlined into the generated code (Inductor
# would otherwise bake small tensors, such as a 4-channel bias, in as literals).
AOT_INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "always_keep_tensor_constants": True,
}
# Relative L2 between an artifact's and the eager UNet's outputs that a load accepts:
# fused fp16 kernels round differently (about 1e-3); a wrong weight is far above 1e-2.
AOT_TOLERANCE = 1e-2

AotKind = Literal["exact", "refresh", "shallow"]
Backend = Literal["aoti", "export"]


class AotError(RuntimeError):
    """An artifact cannot be used; the message says which file and what to do."""


class AotMismatchError(AotError):
    """An artifact does not fit the UNet it is loaded for, or computes something else."""


class AotLoadError(AotError):
    """torch's package loader fails on an artifact (in a throwaway process)."""


# Loads one package in a child process with the server's loader (`load_package`): a
# loader that crashes (torch 2.11's CUDA loader segfaults on libraries built with a
# static C++ runtime) takes the child down, not the server.
_PROBE = (
    "import sys; from pathlib import Path; from media.latentsync.aot import load_package;"
    " load_package(Path(sys.argv[1]), device_index=int(sys.argv[2]))"
)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the child imports this package
PROBE_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class AotKey:
    """What an artifact depends on; its digest names the file."""

    config_sha256: str  # the UNet architecture (UNetConfig as JSON)
    dtype: str
    kind: str  # AotKind
    row_shape: tuple[int, ...]  # one row of the sample: (13, F, h, w)
    audio_row_shape: tuple[int, ...]  # one row of the audio features: (50, 384)
    max_rows: int  # the batch dimension is symbolic in 1..max_rows
    gpu: str  # torch.cuda.get_device_name, or "cpu"
    torch_version: str
    kernels: str = "{}"  # the UNet's set_kernels choices (JSON)
    guided: bool = False  # the guided forward, given one copy of the pair (see AotForward)
    recipe: str = AOT_RECIPE

    @classmethod
    def of(
        cls,
        unet: UNet3DConditionModel,
        kind: AotKind,
        row_shape: Sequence[int],
        audio_row_shape: Sequence[int],
        max_rows: int,
        guided: bool = False,
    ) -> AotKey:
        param = next(unet.parameters())
        config = json.dumps(asdict(unet.config), sort_keys=True, default=list)
        device = param.device
        return cls(
            config_sha256=hashlib.sha256(config.encode()).hexdigest(),
            dtype=str(param.dtype).removeprefix("torch."),
            kind=kind,
            row_shape=tuple(row_shape),
            audio_row_shape=tuple(audio_row_shape),
            max_rows=max_rows,
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch_version=torch.__version__,
            kernels=json.dumps(unet.kernels(), sort_keys=True),
            guided=guided,
        )

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        shape = "x".join(str(n) for n in self.row_shape)
        kind = f"guided_{self.kind}" if self.guided else self.kind
        return f"latentsync_unet_{kind}_{self.dtype}_{shape}_{digest[:16]}.pt2"


class AotForward(nn.Module):
    """One forward kind of the UNet as a module to export; its weights are `unet.*`.

    exact: (sample, t, audio) -> noise; refresh: -> (noise, deep features);
    shallow: (sample, t, audio, deep) -> noise (see `DeepCacheState`).
    guided: the UNet's guided forward given one copy of a guidance pair (`halved`):
    `sample` and `audio` are the N chunks and their audio, the noise (and the deep
    features) come out for the whole pair, 2N rows, the unconditional half first.
    """

    def __init__(self, unet: UNet3DConditionModel, kind: AotKind, guided: bool = False
                 ) -> None:
        super().__init__()
        self.unet = unet
        self.kind = kind
        self.guided = guided

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        audio: torch.Tensor,
        deep: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pair = {"guided": self.guided, "halved": self.guided}
        if self.kind == "exact":
            out: torch.Tensor = self.unet(sample, timestep, audio, **pair)
            return out
        if self.kind == "refresh":
            cache = DeepCacheState(refresh=True)
            out = self.unet(sample, timestep, audio, cache=cache, **pair)
            assert cache.deep is not None
            return out, cache.deep
        shallow: torch.Tensor = self.unet(
            sample, timestep, audio, cache=DeepCacheState(refresh=False, deep=deep), **pair
        )
        return shallow


@dataclass(frozen=True, slots=True)
class AotLoad:
    """How one artifact got ready: compiled now (and stored) or loaded from disk."""

    kind: AotKind
    path: Path
    compiled_now: bool
    seconds: float  # export + compile + load, or load alone (the check excluded)
    error: float  # relative L2 against the eager UNet at load
    # Seconds of each step: "compile" (export, compile, store), "probe" (the load in a
    # test process), "load", "bind" (the weights), "check" (against the eager UNet).
    stages: dict[str, float] = field(default_factory=dict)


def example_inputs(
    unet: UNet3DConditionModel,
    kind: AotKind,
    row_shape: Sequence[int],
    audio_row_shape: Sequence[int],
    rows: int,
    guided: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of `rows` rows for `kind` (shallow: deep features included;
    guided: `rows` chunks of one copy of the pair, and the pair's deep features)."""
    param = next(unet.parameters())
    gen = torch.Generator(param.device).manual_seed(rows)
    frames = row_shape[1]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=param.device, dtype=param.dtype)

    sample = rand(rows, *row_shape)
    audio = rand(rows * frames, *audio_row_shape)
    timestep = torch.full((1,), 500, device=param.device, dtype=torch.long)
    if kind != "shallow":
        return sample, timestep, audio
    cache = DeepCacheState(refresh=True)
    with torch.inference_mode():
        unet(sample, timestep, audio, cache=cache, guided=guided, halved=guided)
    assert cache.deep is not None
    return sample, timestep, audio, cache.deep.clone()


def export_forward(
    unet: UNet3DConditionModel,
    kind: AotKind,
    row_shape: Sequence[int],
    audio_row_shape: Sequence[int],
    max_rows: int,
    guided: bool = False,
) -> torch.export.ExportedProgram:
    """torch.export of one forward kind with the batch symbolic in 1..max_rows (guided:
    1..`guided_rows(max_rows)` chunks in, twice as many rows out)."""
    limit = guided_rows(max_rows) if guided else max_rows
    if limit < 2:
        raise ValueError(f"max_rows must be >= 2 (the export's example has 2), got {limit}")
    frames = row_shape[1]
    rows = torch.export.Dim("rows", min=1, max=limit)
    example = example_inputs(unet, kind, row_shape, audio_row_shape, 2, guided)
    dynamic: list[Any] = [{0: rows}, None, {0: rows * frames}]
    if kind == "shallow":
        dynamic.append({0: 2 * rows if guided else rows})
    with torch.no_grad():
        return torch.export.export(
            AotForward(unet, kind, guided).eval(), example, dynamic_shapes=tuple(dynamic)
        )


def guided_rows(max_rows: int) -> int:
    """Chunks a guided artifact takes for pairs of up to `max_rows` rows (at least 2: the
    export's example has 2, and a size-1 example would fix the size)."""
    return max(2, max_rows // 2)


def load_or_compile(
    unet: UNet3DConditionModel,
    kind: AotKind,
    row_shape: Sequence[int],
    audio_row_shape: Sequence[int],
    max_rows: int,
    cache_dir: Path,
    *,
    single_threaded: bool = False,
    backend: Backend = "aoti",
    guided: bool = False,
) -> tuple[Any, AotLoad]:
    """The runner of one forward kind (guided: `AotForward`'s), with this UNet's weights
    bound, and how it got ready.

    backend "aoti": the artifact from `cache_dir`, compiled and stored first if absent.
    "export": the exported program run by PyTorch (no compiling, nothing stored; tests
    and debugging). `single_threaded`: AOTInductor's mode for running under CUDA graphs.
    """
    start = time.perf_counter()
    stages: dict[str, float] = {}
    mark = start

    def stage(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    key = AotKey.of(unet, kind, row_shape, audio_row_shape, max_rows, guided)
    path = Path(cache_dir).expanduser() / key.filename()
    runner: Any
    with torch.inference_mode(False):
        if backend == "export":
            runner = export_forward(unet, kind, row_shape, audio_row_shape, max_rows,
                                    guided).module()
            compiled_now = True
            stage("compile")
        else:
            compiled_now = not path.is_file()
            if compiled_now:
                _check_writable(path)  # before minutes of exporting and compiling
                program = export_forward(unet, kind, row_shape, audio_row_shape, max_rows, guided)
                _store_package(program, path)
                stage("compile")
            device = next(unet.parameters()).device
            index = device.index if device.index is not None else -1  # -1: the current one
            probe_load(path, index)
            stage("probe")
            runner = load_package(path, single_threaded=single_threaded, device_index=index)
            stage("load")
            _bind_weights(runner, AotForward(unet, kind, guided), path)
            stage("bind")
    seconds = time.perf_counter() - start
    error = _check(runner, unet, kind, row_shape, audio_row_shape, path, guided)
    stage("check")
    return runner, AotLoad(kind, path, compiled_now, seconds, error, stages)


def load_package(path: Path, *, single_threaded: bool = False, device_index: int = -1) -> Any:
    """torch's package loader without its CPU ISA probe. `aoti_load_package` first
    compares the package's CPU ISA with this machine's, and finding this machine's builds
    a test library per ISA and loads each in a new Python process: on the H100 machines
    38 of the 42 s that a fresh process took to load the UNet artifact (native and
    Python stack samples, `bench/aoti_doctor.py --package P --recipes sample`). Only a
    mismatch warning depends on that answer, and the artifact's key already names the
    GPU and the torch build. So during the load the ISAs the CPU reports are taken as
    they are: `cpp.vec_isa_ok`, and no test builds (the AVX-512, VNNI and AMX checks
    build theirs whatever that setting says: 26 of the 27 s left, cProfile). torch's
    cached answers are dropped afterwards, so a later CPU compile in this process probes
    as it always does."""
    from torch._inductor import cpu_vec_isa

    probe = cpu_vec_isa.VecISA.check_build
    cpu_vec_isa.VecISA.check_build = _reported  # type: ignore[method-assign,assignment]
    try:
        with torch._inductor.config.patch({"cpp.vec_isa_ok": True}):
            return torch._inductor.aoti_load_package(
                str(path), run_single_threaded=single_threaded, device_index=device_index
            )
    finally:
        cpu_vec_isa.VecISA.check_build = probe  # type: ignore[method-assign]
        forget_isa_answers()


def _reported(isa: Any, code: str) -> bool:
    return True  # the CPU's own flags already admitted this ISA


def forget_isa_answers() -> None:
    """Drop torch's per-process cache of which CPU ISAs build and load."""
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    for cls in vars(cpu_vec_isa).values():
        if isinstance(cls, type) and issubclass(cls, cpu_vec_isa.VecISA):
            for name in ("__bool__", "_VecISA__bool__impl"):
                clear = getattr(cls.__dict__.get(name), "cache_clear", None)
                if clear is not None:
                    clear()


def probe_load(path: Path, device_index: int = -1) -> None:
    """Load the package once in a child process before this process does, and remember
    that it loaded (a `.loads` file beside it, newer than the package)."""
    marker = path.with_name(path.name + ".loads")
    if marker.is_file() and marker.stat().st_mtime >= path.stat().st_mtime:
        return
    try:
        path_list = [str(_PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        child = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), str(device_index)],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(path_list)},
        )
    except subprocess.TimeoutExpired:
        raise AotLoadError(
            f"{path}: loading it took over {PROBE_TIMEOUT_S:.0f} s in a test process;"
            " turn renderer.latentsync.aot off, or delete the artifact to recompile"
        ) from None
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines()
        why = (f"killed by signal {-child.returncode}" if child.returncode < 0
               else lines[-1] if lines else f"exit status {child.returncode}")
        raise AotLoadError(
            f"{path}: torch's AOTInductor loader fails on it in a test process ({why});"
            " turn renderer.latentsync.aot off, or delete the artifact to recompile"
        )
    with contextlib.suppress(OSError):  # a read-only cache: probe at every start instead
        marker.touch()


def compile_package(program: torch.export.ExportedProgram, path: Path,
                    configs: dict[str, Any] | None = None) -> None:
    """AOTInductor's package of `program` at `path`, its library built by
    `toolchain.aoti_compiler()` (one on the process's C++ runtime: with a static copy,
    torch 2.11's CUDA loader segfaults). `configs`: Inductor's (default: none)."""
    settings = {**(configs or {}), "cpp.cxx": (None, aoti_compiler())}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                             inductor_configs=settings)


def _check_writable(path: Path) -> None:
    """Raise AotError, naming the way out, when the artifact `path` cannot be stored (a
    read-only cache, say one on the weights volume that an operator fills)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".writable"):
            pass
    except OSError as exc:
        raise AotError(
            f"{path} is not built yet and cannot be stored ({exc.strerror or exc}): build it"
            " once where renderer.latentsync.aot_cache_dir is writable (`python -m agent"
            " warm-up` with the same config, on the same GPU type), or turn"
            " renderer.latentsync.aot off"
        ) from None


def _store_package(program: torch.export.ExportedProgram, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")  # AOTI wants a .pt2 suffix
    try:
        try:
            compile_package(program, tmp, AOT_INDUCTOR_CONFIGS)
        except ToolchainError as exc:
            raise AotError(str(exc)) from None
        os.replace(tmp, path)  # atomic: a concurrent loader sees no half-written file
    finally:
        tmp.unlink(missing_ok=True)


def _bind_weights(runner: Any, module: nn.Module, path: Path) -> None:
    """Point the artifact's constants at the module's own tensors (no copy), all of them:
    parameters and buffers, also buffers outside the state dict (`padded_convs`' copies)."""
    state = {**dict(module.named_parameters(remove_duplicate=False)),
             **dict(module.named_buffers(remove_duplicate=False))}
    names = list(runner.get_constant_fqns())
    unknown = [name for name in names if name not in state]
    baked = [name for name in state if name not in set(names)]
    if unknown or baked:
        what = (f"reads tensors this UNet lacks ({', '.join(unknown[:3])})" if unknown
                else f"has weights compiled in ({', '.join(baked[:3])})")
        raise AotMismatchError(f"{path}: the artifact {what}; delete it to recompile")
    runner.load_constants({name: state[name] for name in names}, check_full_update=True,
                          user_managed=True)


def _check(
    runner: Any,
    unet: UNet3DConditionModel,
    kind: AotKind,
    row_shape: Sequence[int],
    audio_row_shape: Sequence[int],
    path: Path,
    guided: bool = False,
) -> float:
    """Relative L2 of one 2-row call against eager; a stale or mis-bound artifact fails."""
    inputs = example_inputs(unet, kind, row_shape, audio_row_shape, 2, guided)
    eager = AotForward(unet, kind, guided)
    with torch.inference_mode():
        expected, actual = eager(*inputs), runner(*inputs)
    error = relative_error(torch.cat([t.flatten() for t in _tensors(actual)]),
                           torch.cat([t.flatten() for t in _tensors(expected)]))
    if not error < AOT_TOLERANCE:
        raise AotMismatchError(
            f"{path}: the compiled {kind} forward differs from the eager UNet by {error:.3g}"
            f" (relative L2, limit {AOT_TOLERANCE}); delete the artifact to recompile"
        )
    return error


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


class AotPredictor(GraphPredictor):
    """`GraphPredictor` over AOTInductor artifacts of the UNet's forward kinds.

    The artifacts (see the module docstring) are loaded, or compiled and stored,
    the first time a kind runs: at `warmup`, which on CUDA then captures the batch
    size into CUDA graphs as `GraphPredictor` does. Without CUDA graphs (the CPU,
    or `graphs=False`) the artifacts run directly. `max_rows`: the largest UNet
    batch (2 x chunks with guidance). `loads` says how each artifact got ready.
    `guided`: every call is a guidance pair; the artifacts are the UNet's guided forward
    (the pair's shared part once), given one copy of the pair.
    `kernels`: the UNet's execution choices to set before exporting (see
    `media.latentsync.accel.apply_kernels`).
    """

    def __init__(
        self,
        unet: UNet3DConditionModel,
        cache_interval: int = 1,
        sdpa: Sequence[SDPBackend] | None = None,
        *,
        cache_dir: Path,
        max_rows: int,
        graphs: bool = True,
        backend: Backend = "aoti",
        kernels: dict[str, Any] | None | str = "auto",
        guided: bool = False,
    ) -> None:
        super().__init__(unet, cache_interval, sdpa, guided)
        apply_kernels(unet, kernels)
        self.cache_dir = Path(cache_dir)
        self.max_rows = max(2, max_rows)
        self.backend: Backend = backend
        self._graphs_on = graphs and next(unet.parameters()).device.type == "cuda"
        self._runners: dict[AotKind, Any] = {}
        self._cache = DeepCacheState() if cache_interval > 1 else None
        self.loads: list[AotLoad] = []

    def kinds(self) -> tuple[AotKind, ...]:
        """The forward kinds this predictor runs."""
        return ("refresh", "shallow") if self._clock.interval > 1 else ("exact",)

    def prepare(self, sample_shape: Sequence[int], audio_shape: Sequence[int]) -> None:
        """Load (or compile) the artifacts for inputs of these shapes (any batch) now."""
        for kind in self.kinds():
            self._runner(kind, tuple(sample_shape), tuple(audio_shape))

    def warmup(self, sample_shape: Sequence[int], audio_shape: Sequence[int]) -> None:
        self.prepare(sample_shape, audio_shape)
        if self._graphs_on:
            super().warmup(sample_shape, audio_shape)

    def reset(self) -> None:
        super().reset()
        if self._cache is not None:
            self._cache.deep = None

    @torch.inference_mode()
    def __call__(
        self, latent_model_input: torch.Tensor, t: torch.Tensor | int, audio: torch.Tensor
    ) -> torch.Tensor:
        if self._graphs_on:
            return super().__call__(latent_model_input, t, audio)
        refresh = self._clock.tick()
        timestep = torch.as_tensor(t, device=audio.device).reshape(1)
        return self._forward(latent_model_input, timestep, audio, self._cache, refresh=refresh)

    def _runner(
        self, kind: AotKind, sample_shape: tuple[int, ...], audio_shape: tuple[int, ...]
    ) -> Any:
        if kind not in self._runners:
            runner, load = load_or_compile(
                self.unet, kind, sample_shape[1:], audio_shape[1:], self.max_rows,
                self.cache_dir, single_threaded=self._graphs_on, backend=self.backend,
                guided=self.guided,
            )
            self._runners[kind] = runner
            self.loads.append(load)
        return self._runners[kind]

    def _forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        audio: torch.Tensor,
        cache: DeepCacheState | None,
        *,
        refresh: bool,
    ) -> torch.Tensor:
        if sample.shape[0] > self.max_rows:
            raise ValueError(
                f"a UNet batch of {sample.shape[0]} rows exceeds the compiled {self.max_rows}"
            )
        shapes = (tuple(sample.shape), tuple(audio.shape))
        rows = sample.shape[0]
        if self.guided:  # one copy of the pair in (views: nothing is copied or captured)
            sample, audio = second_half(sample), second_half(audio)
        out: torch.Tensor
        if cache is None:
            out = self._runner("exact", *shapes)(sample, timestep, audio)
        elif refresh:
            out, cache.deep = self._runner("refresh", *shapes)(sample, timestep, audio)
        else:
            deep = UNet3DConditionModel._cached_deep(cache, sample, rows)
            out = self._runner("shallow", *shapes)(sample, timestep, audio, deep)
        return out
