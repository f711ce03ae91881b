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
import json
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

from media.latentsync.aot import AOT_INDUCTOR_CONFIGS, export_forward  # noqa: E402
from media.latentsync.config import UNetConfig  # noqa: E402
from media.latentsync.unet import UNet3DConditionModel  # noqa: E402

# The child: load with one recipe, bind the weights when the package has none, run once.
CHILD = """
import faulthandler, glob, os, sys, tempfile, zipfile, torch
faulthandler.enable()
path, weightless, inputs_path, state_path, device, recipe = sys.argv[1:7]
weightless = weightless == "1"
if recipe != "package":  # CUDA (or the CPU) initialised before any loader runs
    torch.zeros(1, device=device)
    print("device ready", flush=True)
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
# "ldd" (the CUDA, torch and C++ libraries the package's wrapper library links).
RECIPES = ("package", "init", "metadata", "runner", "gdb", "ldd")


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


def compile_case(program: torch.export.ExportedProgram, configs: dict[str, Any],
                 path: Path) -> float:
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                             inductor_configs=configs)
    return time.perf_counter() - t0


def run_case(name: str, module: nn.Module, program: torch.export.ExportedProgram,
             inputs: tuple[torch.Tensor, ...], configs: dict[str, Any], folder: Path,
             timeout: float, device: str, recipes: list[str]) -> list[dict[str, Any]]:
    """Compile one package, then load it with each recipe: one row per recipe."""
    path = folder / f"{name}.pt2"
    try:
        compile_s = round(compile_case(program, configs, path), 1)
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
        row["result"] = load_in_child(path, weightless, inputs_path, state_path, device,
                                      recipe, timeout)
        rows.append(row)
    return rows


def load_in_child(path: Path, weightless: bool, inputs_path: Path, state_path: Path,
                  device: str, recipe: str, timeout: float) -> str:
    """Run CHILD with one recipe; "ok: ..." or "FAILED (...)" with its last lines."""
    args = [sys.executable, "-c", CHILD, str(path), "1" if weightless else "0",
            str(inputs_path), str(state_path), device, "init" if recipe == "gdb" else recipe]
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
                               check=False)
    except subprocess.TimeoutExpired:
        return f"load timed out after {timeout:.0f} s"
    lines = [ln for ln in (child.stdout + child.stderr).splitlines() if ln.strip()]
    if recipe == "gdb":  # gdb exits 0 either way: the backtrace frames tell
        frames = [ln for ln in lines if ln.startswith("#")]
        if not frames:
            return "ok under gdb: " + " / ".join(ln for ln in lines if ln.startswith("ran"))
        return "FAILED (signal under gdb); backtrace: " + " | ".join(frames[:25])
    if child.returncode == 0:
        return "ok: " + " / ".join(ln for ln in lines if ln.startswith(("loaded", "ran")))
    how = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
    return f"FAILED ({how}); last lines: " + " | ".join(lines[-8:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the tiny UNet config JSON")
    p.add_argument("--cases", default="small-so,small-weightless,small-buffer-weightless,"
                   "small-cpu,unet-static-so,unet-dynamic-weightless",
                   help="small-*: nn.Linear(64, 64) (-cpu: compiled for the CPU); unet-*:"
                   " the tiny UNet")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"how the child loads each package: {', '.join(RECIPES)}")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--out", default="out/aoti_doctor.json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script
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
