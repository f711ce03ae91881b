"""Which AOTInductor packages torch's loader takes on this machine, case by case.

torch 2.11's CUDA package loader has killed processes (SIGSEGV) on the UNet's
artifacts. This compiles small packages that differ in one thing each (a plain
linear model; weights in the shared library or bound at load; a buffer; the tiny
LatentSync UNet with a static or symbolic batch) and loads each in child processes,
one per loader recipe (see RECIPES: the package loader as the server uses it, after
CUDA is initialised, its metadata step alone, the bare model container runner, under
gdb for the native backtrace, and `ldd` of the package's library), with faulthandler on,
so a crash names its case, the recipe and the frame it died in.

    python3 bench/aoti_doctor.py --config tests-or-shared/tiny_unet_config.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media.latentsync.aot import AOT_INDUCTOR_CONFIGS, compile_package, export_forward  # noqa: E402
from media.latentsync.config import UNetConfig  # noqa: E402
from media.latentsync.toolchain import needed_libraries  # noqa: E402
from media.latentsync.unet import UNet3DConditionModel  # noqa: E402

# The child: load with one recipe, bind the weights when the package has none, run once.
CHILD = """
import faulthandler, glob, os, sys, tempfile, zipfile, torch
if not os.environ.get("DOCTOR_NATIVE_TRACE"):  # else the preloaded handler reports
    faulthandler.enable()
path, weightless, inputs_path, state_path, device, recipe = sys.argv[1:7]
weightless = weightless == "1"
if recipe != "package":  # CUDA (or the CPU) initialised before any loader runs
    torch.zeros(1, device=device)
    print("device ready", flush=True)
if recipe == "sample":  # time the load alone; SIGUSR1 every second: native samples
    import signal, threading, time
    main, done = threading.main_thread().ident, threading.Event()
    def sampler():
        while not done.wait(1.0):
            signal.pthread_kill(main, signal.SIGUSR1)
    t0 = time.perf_counter()
    faulthandler.dump_traceback_later(1.0, repeat=True)  # the Python stacks too
    threading.Thread(target=sampler, daemon=True).start()
    runner = torch._inductor.aoti_load_package(path, device_index=0 if device == "cuda" else -1)
    done.set()
    faulthandler.cancel_dump_traceback_later()
    print(f"loaded in {time.perf_counter() - t0:.2f} s", flush=True)
    sys.exit(0)
if recipe == "loadtime":  # the server's loader (aot.load_package), timed
    import time
    from pathlib import Path
    from media.latentsync.aot import load_package
    t0 = time.perf_counter()
    runner = load_package(Path(path), device_index=0 if device == "cuda" else -1)
    print(f"loaded in {time.perf_counter() - t0:.2f} s (the server's loader)", flush=True)
    sys.exit(0)
if recipe == "metadata":  # the loader's first step alone
    meta = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, "model")
    print("loaded; metadata", sorted(meta)[:6], flush=True)
    sys.exit(0)
if recipe == "runner":  # no package loader: the model container of the extracted library
    folder = tempfile.mkdtemp()
    zipfile.ZipFile(path).extractall(folder)
    libs = glob.glob(os.path.join(folder, "**", "*.so"), recursive=True)
    print("libraries", [os.path.relpath(lib, folder) for lib in libs], flush=True)
    if device == "cuda":
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(
            libs[0], 1, "cuda:0", os.path.dirname(libs[0]))
    else:
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(libs[0], 1)
    names = runner.get_constant_names_to_original_fqns()  # internal name -> module's name
    print("loaded; constants", len(names), flush=True)
    if weightless:
        state = torch.load(state_path, weights_only=True)
        runner.update_constant_buffer({k: state[fqn].to(device) for k, fqn in names.items()},
                                      False, True, False)
        print("constants bound", flush=True)
    inputs = [t.to(device) for t in torch.load(inputs_path, weights_only=True)]
    out = runner.run(inputs)
else:
    index = 0 if device == "cuda" else -1
    runner = torch._inductor.aoti_load_package(path, device_index=index)
    print("loaded; constants", len(runner.get_constant_fqns()), flush=True)
    if weightless:
        state = torch.load(state_path, weights_only=True)
        runner.load_constants({k: state[k].to(device) for k in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=False)
        print("constants bound", flush=True)
    inputs = [t.to(device) for t in torch.load(inputs_path, weights_only=True)]
    out = runner(*inputs)
if device == "cuda":
    torch.cuda.synchronize()
print("ran", [tuple(o.shape) for o in (out if isinstance(out, (list, tuple)) else [out])],
      flush=True)
"""

# Loader recipes: "package" (aoti_load_package in a fresh process, as the server's probe
# does), "init" (the same after CUDA is initialised), "metadata" (only reading the
# package's metadata), "runner" (the extracted library through the bare model container
# runner, no package loader), "gdb" (the "init" recipe under gdb: the native backtrace),
# "ldd" (the CUDA, torch and C++ libraries the package's wrapper library links), "trace"
# (the "init" recipe with TRACER preloaded: the native frames of a crash, without gdb),
# "toolchain" (no loading: the compiler, its flags, the C++ runtime the library carries),
# "sample" (the load alone, timed, with native stack samples every second), "loadtime"
# (the server's loader, `aot.load_package`, timed: without torch's CPU ISA probe).
RECIPES = ("package", "init", "metadata", "runner", "gdb", "ldd", "trace", "toolchain",
           "sample", "loadtime")

# A crash handler for LD_PRELOAD: the faulting instruction and the native frames, each as
# library, nearest exported symbol and offset (demangle with c++filt).
TRACER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>
static void say(const char *what, int i, void *pc) {
    char line[768];
    Dl_info d;
    int n;
    if (dladdr(pc, &d) && d.dli_fname) {
        char *base = d.dli_saddr ? (char *)d.dli_saddr : (char *)d.dli_fbase;
        n = snprintf(line, sizeof line, "native %s %d: %s %s+0x%lx (file+0x%lx)\n", what, i,
                     d.dli_fname, d.dli_sname ? d.dli_sname : "?",
                     (unsigned long)((char *)pc - base),
                     (unsigned long)((char *)pc - (char *)d.dli_fbase));
    }
    else
        n = snprintf(line, sizeof line, "native %s %d: %p\n", what, i, pc);
    write(2, line, n);
}
static void handler(int sig, siginfo_t *info, void *context) {
    char line[128];
    int n = snprintf(line, sizeof line, "native signal %d at address %p\n", sig, info->si_addr);
    write(2, line, n);
    say("pc", 0, (void *)((ucontext_t *)context)->uc_mcontext.gregs[REG_RIP]);
    void *frames[48];
    int count = backtrace(frames, 48);
    for (int i = 0; i < count; i++) say("frame", i, frames[i]);
    signal(sig, SIG_DFL);
    raise(sig);
}
static void sample(int sig) {  /* SIGUSR1: where the thread is, then carry on */
    void *frames[48];
    int count = backtrace(frames, 48);
    write(2, "native sample\n", 14);
    for (int i = 2; i < count; i++) say("at", i, frames[i]);
    (void)sig;
}
__attribute__((constructor)) static void install(void) {
    signal(SIGUSR1, sample);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = handler;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, 0);
    sigaction(SIGBUS, &action, 0);
    sigaction(SIGABRT, &action, 0);
}
"""


class Small(nn.Module):
    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        if buffer:
            self.register_buffer("offset", torch.arange(64.0))
        self.buffer = buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.offset if self.buffer else y


# The compiler commands of the last compile_case (argv lists), for the "toolchain" recipe.
BUILDS: list[list[str]] = []


def compile_case(program: torch.export.ExportedProgram, configs: dict[str, Any],
                 path: Path, inductor_cxx: bool = False) -> float:
    """Compile and package as the server does (`aot.compile_package`: a compiler on the
    shared C++ runtime), or with Inductor's own compiler choice (the "-inductorcxx"
    cases); record the compiler commands."""
    BUILDS.clear()
    run, check_output = subprocess.run, subprocess.check_output

    def argv(cmd: Any) -> Any:
        words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        if any(str(w).endswith((".so", ".o", ".cpp")) for w in words):
            BUILDS.append([str(w) for w in words])  # a build, not a version probe
        return cmd

    def logged_run(cmd: Any, *a: Any, **k: Any) -> Any:
        return run(argv(cmd), *a, **k)

    def logged_check_output(cmd: Any, *a: Any, **k: Any) -> Any:
        return check_output(argv(cmd), *a, **k)

    subprocess.run, subprocess.check_output = logged_run, logged_check_output  # type: ignore[assignment]
    t0 = time.perf_counter()
    try:
        if inductor_cxx:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                     inductor_configs=configs)
        else:
            compile_package(program, path, configs)
    finally:
        subprocess.run, subprocess.check_output = run, check_output  # type: ignore[assignment]
    return time.perf_counter() - t0


def toolchain(path: Path) -> str:
    """The compiler, the flags of the commands that built the package's library, and what
    that library links and defines of the C++ runtime (static copies of libstdc++ in it
    would be a second C++ runtime beside the process's)."""
    from torch._inductor import cpp_builder

    default = cpp_builder.get_cpp_compiler()
    linked = [cmd[0] for cmd in BUILDS if "-shared" in cmd]
    compiler = linked[0] if linked else default
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    flags = sorted({w for cmd in BUILDS for w in cmd
                    if w.startswith(("-static", "-l", "-Wl", "-shared", "-nostd", "-fvis"))})
    found = [f"Inductor's compiler {default}; built with {compiler} ({' '.join(version)})",
             f"{len(BUILDS)} builds",
             f"linked by {sorted(set(linked))}", f"flags {flags}"]
    with tempfile.TemporaryDirectory() as folder:
        zipfile.ZipFile(path).extractall(folder)
        libs = sorted(Path(folder).rglob("*wrapper.so")) or sorted(Path(folder).rglob("*.so"))
        if libs and shutil.which("nm"):
            needed = needed_libraries(libs[0])
            symbols = subprocess.run(["nm", "-D", "--defined-only", str(libs[0])],
                                     capture_output=True, text=True, check=False).stdout
            # Strong (T) definitions of the runtime's own classes: a static libstdc++.
            runtime = [ln.split()[-1] for ln in symbols.splitlines()
                       if " T " in ln and ("St6locale" in ln or "codecvt" in ln)]
            found += [f"needs {needed}", f"defines {len(runtime)} locale/codecvt functions"
                      f" {runtime[:3]}"]
    return "; ".join(found)


def run_case(name: str, module: nn.Module, program: torch.export.ExportedProgram,
             inputs: tuple[torch.Tensor, ...], configs: dict[str, Any], folder: Path,
             timeout: float, device: str, recipes: list[str]) -> list[dict[str, Any]]:
    """Compile one package, then load it with each recipe: one row per recipe."""
    path = folder / f"{name}.pt2"
    try:
        compile_s = round(compile_case(program, configs, path, "inductorcxx" in name), 1)
    except Exception as exc:  # noqa: BLE001 - a diagnostic reports every failure
        return [{"case": name, "configs": configs,
                 "result": f"compile failed: {type(exc).__name__}: {str(exc)[:300]}"}]
    inputs_path, state_path = folder / f"{name}.inputs.pt", folder / f"{name}.state.pt"
    torch.save([t.cpu() for t in inputs], inputs_path)
    torch.save({k: v.cpu() for k, v in module.state_dict().items()}, state_path)
    weightless = configs.get("aot_inductor.package_constants_in_so") is False
    rows = []
    for recipe in recipes:
        row: dict[str, Any] = {"case": name, "recipe": recipe, "configs": configs,
                               "compile_s": compile_s,
                               "size_mib": round(path.stat().st_size / 2**20, 2)}
        row["result"] = (toolchain(path) if recipe == "toolchain" else
                         load_in_child(path, weightless, inputs_path, state_path, device,
                                       recipe, timeout))
        rows.append(row)
    return rows


def named(line: str) -> str:
    """A tracer line whose symbol is "?" with addr2line's function name (if it has one)."""
    parts = line.split()
    if len(parts) < 6 or not parts[4].startswith("?") or shutil.which("addr2line") is None:
        return line
    name = function_at(parts[3], parts[-1].removeprefix("(file+").removesuffix(")"))
    return line if name == "??" else f"{line} = {name}"


@functools.lru_cache(maxsize=4096)
def function_at(library: str, offset: str) -> str:
    found = subprocess.run(["addr2line", "-f", "-C", "-e", library, offset],
                           capture_output=True, text=True, check=False)
    return found.stdout.splitlines()[0] if found.stdout else "??"


def samples(lines: list[str], depth: int = 6) -> str:
    """SIGUSR1 samples (TRACER) as counted stacks: each sample's innermost `depth` frames,
    library and symbol, most frequent first."""
    stacks: dict[str, int] = {}
    current: list[str] = []
    for line in [*lines, "native sample"]:
        if line.startswith("native sample"):
            if current:
                key = " < ".join(current[:depth])
                stacks[key] = stacks.get(key, 0) + 1
            current = []
        elif line.startswith("native at"):
            resolved = named(line)
            parts = resolved.split()
            where = Path(parts[3]).name if len(parts) > 3 else "?"
            what = (resolved.split(" = ", 1)[1] if " = " in resolved
                    else parts[4] if len(parts) > 4 else "?")
            current.append(f"{where}:{what[:120]}")
    ranked = sorted(stacks.items(), key=lambda kv: -kv[1])
    native = " || ".join(f"{n}x {k}" for k, n in ranked[:8])
    # faulthandler's dumps: each thread's innermost Python frames (the sampler's left out)
    python: dict[str, int] = {}
    frames: list[str] = []
    for line in [*lines, "Thread"]:
        if line.startswith(("Thread", "Current thread", "Timeout")):
            if frames and not any("sampler" in f for f in frames):
                key = " < ".join(frames[:4])
                python[key] = python.get(key, 0) + 1
            frames = []
        elif line.strip().startswith("File "):
            where, _, func = line.strip().removeprefix("File ").partition(" in ")
            frames.append(f"{Path(where.split(',')[0].strip(chr(34))).name}:{func}")
    top = sorted(python.items(), key=lambda kv: -kv[1])[:6]
    return (f"{sum(stacks.values())} native samples: {native}; python stacks: "
            + " || ".join(f"{n}x {k}" for k, n in top))


def load_in_child(path: Path, weightless: bool, inputs_path: Path, state_path: Path,
                  device: str, recipe: str, timeout: float) -> str:
    """Run CHILD with one recipe; "ok: ..." or "FAILED (...)" with its last lines."""
    args = [sys.executable, "-c", CHILD, str(path), "1" if weightless else "0",
            str(inputs_path), str(state_path), device,
            "init" if recipe in ("gdb", "trace") else recipe]
    env = None
    if recipe in ("trace", "sample"):
        folder = tempfile.mkdtemp()
        source, tracer = Path(folder, "tracer.c"), Path(folder, "tracer.so")
        source.write_text(TRACER)
        built = subprocess.run(["cc", "-shared", "-fPIC", "-O0", "-o", str(tracer), str(source),
                                "-ldl"], capture_output=True, text=True, check=False)
        if built.returncode != 0:
            return "skipped: the tracer did not build: " + built.stderr[-300:]
        env = {**os.environ, "LD_PRELOAD": str(tracer), "DOCTOR_NATIVE_TRACE": "1"}
    if recipe == "ldd":  # what the wrapper library links (a second CUDA runtime?)
        with tempfile.TemporaryDirectory() as folder:
            zipfile.ZipFile(path).extractall(folder)
            libs = sorted(Path(folder).rglob("*.so"))
            if not libs:
                return "no library in the package"
            ldd = subprocess.run(["ldd", str(libs[0])], capture_output=True, text=True,
                                 check=False)
        linked = [ln.strip() for ln in ldd.stdout.splitlines()
                  if any(x in ln for x in ("cuda", "torch", "c10", "not found", "stdc++"))]
        return "links: " + " | ".join(linked)
    if recipe == "gdb":
        gdb = shutil.which("gdb")
        if gdb is None:
            return "skipped: no gdb on this machine"
        args = [gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 25", "--args", *args]
    try:
        child = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                               check=False, env=env)
    except subprocess.TimeoutExpired:
        return f"load timed out after {timeout:.0f} s"
    lines = [ln for ln in (child.stdout + child.stderr).splitlines() if ln.strip()]
    if recipe == "gdb":  # gdb exits 0 either way: the backtrace frames tell
        frames = [ln for ln in lines if ln.startswith("#")]
        if not frames:
            return "ok under gdb: " + " / ".join(ln for ln in lines if ln.startswith("ran"))
        return "FAILED (signal under gdb); backtrace: " + " | ".join(frames[:25])
    if recipe == "sample":  # the innermost named frames of each sample, counted
        return f"exit {child.returncode}: " + " / ".join(
            ln for ln in lines if ln.startswith("loaded")) + "; " + samples(lines)
    if child.returncode == 0:
        return "ok: " + " / ".join(ln for ln in lines if ln.startswith(("loaded", "ran")))
    how = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
    if recipe == "trace":
        native = [named(ln) for ln in lines if ln.startswith("native")]
        return f"FAILED ({how}); " + " | ".join(native[:40] or lines[-8:])
    return f"FAILED ({how}); last lines: " + " | ".join(lines[-8:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the tiny UNet config JSON")
    p.add_argument("--cases", default="small-so,small-weightless,small-buffer-weightless,"
                   "small-cpu,unet-static-so,unet-dynamic-weightless",
                   help="small-*: nn.Linear(64, 64) (-cpu: compiled for the CPU;"
                   " -inductorcxx: with Inductor's compiler, not the server's choice);"
                   " unet-*: the tiny UNet")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"how the child loads each package: {', '.join(RECIPES)}")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--package", type=Path, help="instead of --cases: load this package (a"
                   " stored weightless artifact) with the recipes that need no inputs")
    p.add_argument("--out", default="out/aoti_doctor.json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script
    if args.package:
        rows = [{"package": str(args.package), "recipe": recipe,
                 "result": load_in_child(args.package, True, Path("-"), Path("-"), device,
                                         recipe, args.timeout)}
                for recipe in args.recipes.split(",")]
        print(json.dumps(rows, indent=1), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
        return
    dtype = torch.float16 if device == "cuda" else torch.float32
    weightless = dict(AOT_INDUCTOR_CONFIGS)
    raw = json.loads(Path(args.config).read_text())
    config = UNetConfig.from_dict(raw.get("config", raw))
    torch.manual_seed(0)
    unet = UNet3DConditionModel(config).to(device, dtype).eval().requires_grad_(False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.cases.split(","):
            module: nn.Module
            where = "cpu" if name.endswith("-cpu") else device
            if name.startswith("small"):
                module = Small(buffer="buffer" in name).to(where).eval()
                inputs: tuple[torch.Tensor, ...] = (torch.randn(4, 64, device=where),)
                program = torch.export.export(module, inputs)
            else:
                module = unet
                max_rows = 4 if "dynamic" in name else 2
                program = export_forward(unet, "exact", (13, 16, 8, 8), (50, 384), max_rows)
                inputs = tuple(program.example_inputs[0])
                if "static" in name:
                    program = torch.export.export(program.module(), inputs)
            configs = weightless if "weightless" in name else {}
            if "unet" in name:
                module = program.module()  # its state dict has the exported names
            for row in run_case(name, module, program, inputs, configs, folder,
                                args.timeout, where, args.recipes.split(",")):
                rows.append(row)
                print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
