"""Users per GPU: the real server with the LatentSync renderer under simulated users.

Runs `agent.server.AgentServer` in this process with a `LatentSyncRenderer` over
RANDOM full-size weights (UNet from the packaged stage2.json at 256 px, Whisper
tiny, SD's VAE from configs/sd_vae_ft_mse.json) on cuda:0, the default avatar
and h264 (or jpeg) video. For each sampler config (exact: 20-step DDIM, CFG 1.5;
fast: DPM-Solver++ 8 steps + DeepCache interval 3; both with CUDA graphs) it
measures warm start (server start -> /readyz 200, models already in memory),
then ramps N users, a third of them (at least one) speaking 2-5 s turns of
speech-like audio in real time, the rest idle. The users run in a child process
(`python -m bench.gpu_serve drive ...`), so their CPU never shares this event
loop. Per step: time to first speech frame (first audio sent -> that frame
received), inter-frame arrival gaps, frames held inside turns (the renderer fell
behind: the stream repeats the last picture, which no gap shows), render call
times and batch sizes, frames rendered per second and peak GPU memory.
A step holds when TTFF p95 < 2 s and gap p95 < 100 ms (gaps of speaking users);
a config's ramp stops at its first broken step.

    python -m bench.gpu_serve --out out/gpu_serve            # on a CUDA machine
    python -m bench.gpu_serve --tiny --out out/gpu_serve_dry  # CPU dry run, tiny models

Random weights: the frames are noise, the cost is the released models' cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from agent.avatars import AvatarRegistry
from agent.config import AgentConfig
from agent.logs import configure_logging
from agent.server import AgentServer, tune_process
from bench.gpu_serve_users import pct
from bench.latentsync_bench import build_unet
from bench.machine import describe
from media.latentsync.audio_features import AudioFeatureExtractor
from media.latentsync.config import UNetConfig
from media.latentsync.pipeline import LatentSyncModels
from media.latentsync.renderer import CONFIG_DIR, LatentSyncRenderer, architecture_config
from media.latentsync.vae import LatentCodec
from media.latentsync.whisper import WhisperEncoder
from media.types import FrameSink, RenderChunk, RenderResult

GIB = 1024**3
TTFF_SLO_S = 2.0
GAP_SLO_S = 0.100
HELD_LIMIT = 0.05  # the stricter capacity column: also under 5% of turn frames held
STAGES = ("audio_features", "face", "inference", "decode", "paste")
SAMPLERS: dict[str, dict[str, Any]] = {
    "exact": {"sampler": "ddim", "inference_steps": 20, "deepcache_interval": 1},
    "fast": {"sampler": "dpm++", "inference_steps": 8, "deepcache_interval": 3},
}


def add_runner_options(p: argparse.ArgumentParser) -> None:
    """The UNet runner's and the server log's options (read by `runner_settings`)."""
    p.add_argument("--no-graphs", action="store_true", help="eager UNet (CUDA graphs off)")
    p.add_argument("--log-level", default="warning", help="the server's log level (info: tier"
                   " changes with their reasons)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet under the graphs (renderer.latentsync.compile)")
    p.add_argument("--plan-between-steps", action="store_true",
                   help="LatentSyncRenderer.plan_between_steps: the paste-back's host planning"
                   " a piece at a time between the UNet's steps")
    p.add_argument("--aot", type=Path, metavar="DIR",
                   help="ahead-of-time artifacts in DIR (renderer.latentsync.aot): the first"
                   " run compiles and stores them, a second run shows the warm start")
    p.add_argument("--turn-start-deepcache", type=int, default=1,
                   help="renderer.latentsync.turn_start_deepcache_interval (1: off)")


def runner_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The UNet runner's config fields from the command line (same for every sampler)."""
    aot = {"aot": True, "aot_cache_dir": args.aot} if args.aot else {}
    return {"cuda_graphs": not args.no_graphs, "compile": args.compile,
            "turn_start_deepcache_interval": args.turn_start_deepcache, **aot}


def renderer_switches(args: argparse.Namespace) -> dict[str, Any]:
    """The renderer's switches that are not config fields (reported with the settings)."""
    return {"plan_between_steps": args.plan_between_steps}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- models ------------------------------------------------------------------------


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype) -> LatentSyncModels:
    """Random weights: the released architectures (or tiny ones for a CPU dry run)."""
    if tiny:
        config = UNetConfig(block_out_channels=(32, 64, 64, 64))
        vae_config: dict[str, Any] = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
                                      "norm_num_groups": 4, "sample_size": 64}
    else:
        config = UNetConfig.from_json(architecture_config(256))
        vae_config = {}
    unet = build_unet(config, str(device), dtype)  # output scaled to unit std (bench)
    raw = json.loads((CONFIG_DIR / "sd_vae_ft_mse.json").read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")} | vae_config
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL.from_config(raw)  # type: ignore[no-untyped-call]
        encoder = WhisperEncoder()
    vae = vae.to(dtype).eval().requires_grad_(False)
    encoder = encoder.eval().requires_grad_(False)
    audio = AudioFeatureExtractor(encoder, device=device, dtype=dtype)
    return LatentSyncModels(unet, LatentCodec(vae), audio)


@dataclass(frozen=True, slots=True)
class RenderCall:
    start: float  # perf_counter
    seconds: float  # the call, waits for the renderer's lock included
    chunks: int
    frames: int
    stages: dict[str, float]  # the batch's stages, inside the lock

    @property
    def busy(self) -> float:
        return sum(self.stages.values())


class TimedRenderer(LatentSyncRenderer):
    """Records every render call (worker thread appends, the bench reads between steps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[RenderCall] = []

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]:
        start = time.perf_counter()
        return self._record(batch, start, super().render(batch))

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]:
        start = time.perf_counter()
        return self._record(batch, start, super().render_streaming(batch, on_frames))

    def _record(self, batch: Sequence[RenderChunk], start: float, out: list[RenderResult]
                ) -> list[RenderResult]:
        self.calls.append(RenderCall(start, time.perf_counter() - start, len(batch),
                                     sum(len(c.frames) for c in batch),
                                     dict(out[0].stages) if out else {}))
        return out


# --- one config ------------------------------------------------------------------


@dataclass
class Step:
    users: int
    speaking: int
    client: dict[str, Any]  # the driver's report (bench.gpu_serve_users)
    render_calls: int = 0
    chunks_per_call: float = float("nan")
    render_ms_p50: float = float("nan")
    render_ms_p95: float = float("nan")
    unet_ms_p50: float = float("nan")
    fps_rendered: float = float("nan")
    gpu_busy: float = float("nan")  # share of the window inside render calls
    peak_alloc_gib: float = float("nan")
    chunk_outcomes: dict[str, float] = field(default_factory=dict)
    first_call: dict[str, float] = field(default_factory=dict)  # stages of the step's first
    stage_ms_p50: dict[str, float] = field(default_factory=dict)
    held: bool = False


@dataclass
class ConfigRun:
    name: str
    settings: dict[str, Any]
    warm_start_s: float = float("nan")  # AgentServer() + start() -> /readyz 200
    alloc_after_warmup_gib: float = float("nan")
    steps: list[Step] = field(default_factory=list)
    capacity: int | None = None
    capacity_no_stalls: int | None = None  # ... and held frames < HELD_LIMIT
    note: str = ""


def server_config(args: argparse.Namespace, cache: Path, settings: dict[str, Any]
                  ) -> AgentConfig:
    overrides: dict[str, Any] = {
        "server.host": "127.0.0.1", "server.port": 0, "server.max_sessions": 500,
        "avatars.cache_dir": str(cache), "video.codec": args.codec,
        "renderer.name": "latentsync", "logging.format": "console", "logging.level": "warning",
        "engine.render_timeout_s": args.render_timeout,
        "limits.connections_per_s": 1000.0,
        "renderer.latentsync.max_batch": args.max_batch,
        "renderer.latentsync.resolution": 256,
        "renderer.latentsync.guidance_scale": 1.5,
        # Admission relaxed: the ramp measures what holds, not what admission guesses.
        "admission.speaking_share": 0.01, "admission.max_utilization": 1.0,
        **{f"renderer.latentsync.{k}": v for k, v in settings.items()},
    }
    return AgentConfig().with_overrides(overrides)


async def wait_ready(port: int, limit_s: float) -> None:
    """Until GET /readyz answers 200 (polled every 20 ms)."""
    url = f"http://127.0.0.1:{port}/readyz"
    start = time.perf_counter()

    def ready() -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
        return False

    while not await asyncio.to_thread(ready):
        if time.perf_counter() - start > limit_s:
            raise TimeoutError(f"/readyz not 200 within {limit_s} s")
        await asyncio.sleep(0.02)


def chunk_counts(server: AgentServer) -> dict[str, float]:
    text = server.metrics.render().decode()
    return {o: float(v) for o, v in re.findall(r'avatar_chunks_total\{outcome="(\w+)"\} (\S+)',
                                               text)}


async def drive(url: str, args: argparse.Namespace, users: int, speaking: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.gpu_serve_users", "--url", url, "--users", str(users),
           "--speaking", str(speaking), "--duration", str(args.duration), "--settle",
           str(args.settle), "--codec", args.codec, "--height", str(args.height),
           "--seed", str(users)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"user driver exited {proc.returncode}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def run_config(args: argparse.Namespace, name: str, models_per_gpu: list[LatentSyncModels],
                     cache: Path, deadline: float) -> ConfigRun:
    settings = {**SAMPLERS[name], **runner_settings(args)}
    run = ConfigRun(name, {**settings, **renderer_switches(args)})
    config = server_config(args, cache, settings)
    cuda = models_per_gpu[0].device.type == "cuda"
    avatars = AvatarRegistry(config.avatars)
    # One renderer (engine lane) per GPU, as build_renderer makes them.
    renderers = [TimedRenderer(avatars.get, config.renderer.latentsync, models=m,
                               resolution=args.resolution) for m in models_per_gpu]
    for renderer in renderers:  # a renderer switch, not a config field (unmeasured yet)
        renderer.plan_between_steps = args.plan_between_steps
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    started = time.perf_counter()
    server = AgentServer(config, renderer=renderers if len(renderers) > 1 else renderers[0])
    await server.start()
    await wait_ready(server.port, args.ready_timeout)
    run.warm_start_s = time.perf_counter() - started
    if cuda:
        run.alloc_after_warmup_gib = torch.cuda.memory_allocated() / GIB
    log(f"{name}: ready in {run.warm_start_s:.2f} s")
    try:
        for users in args.users[name]:
            if time.monotonic() > deadline:
                run.note = f"ramp cut at {users} users: time budget spent"
                break
            speaking = max(1, round(users / 3))
            for r in renderers:
                r.calls.clear()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            before = chunk_counts(server)
            client = await drive(server.url, args, users, speaking)
            if client.get("refused"):  # the server's admission control: the ramp ends here
                run.note += (f"{name} {users} users: {client['refused']} of {users} sessions"
                             f" refused at open ({client['reason']})"
                             + (f"; others failed: {client['other_failures']}"
                                if client.get("other_failures") else "") + ". ")
                log(run.note)
                break
            calls = [c for r in renderers for c in r.calls]
            step = summarise(users, speaking, client, calls, before, chunk_counts(server))
            if len(renderers) > 1:
                per_gpu = [sum(c.chunks for c in r.calls) for r in renderers]
                run.note += f"{name} {users} users: chunks per GPU {per_gpu}. "
            if cuda:
                step.peak_alloc_gib = torch.cuda.max_memory_allocated() / GIB
            run.steps.append(step)
            log(f"{name} N={users}: ttff p95 {client['ttff_p95_s']:.2f} s, gap p95 "
                f"{client['gap_p95_s'] * 1e3:.0f} ms, held {client['held_share']:.1%}, "
                f"{step.fps_rendered:.0f} fps rendered -> {'held' if step.held else 'broke'}")
            for _ in range(100):  # sessions of the step gone before the next one
                if not server.sessions:
                    break
                await asyncio.sleep(0.05)
            if not step.held:
                break
    finally:
        await server.close()
    held = [s.users for s in run.steps if s.held]
    first_break = next((s.users for s in run.steps if not s.held), None)
    run.capacity = max((u for u in held if first_break is None or u < first_break),
                       default=None)
    for s in run.steps:  # the last step before the first one that stalls or breaks
        if not (s.held and s.client["held_share"] < HELD_LIMIT):
            break
        run.capacity_no_stalls = s.users
    return run


def summarise(users: int, speaking: int, client: dict[str, Any], calls: list[RenderCall],
              before: dict[str, float], after: dict[str, float]) -> Step:
    step = Step(users, speaking, client)
    step.chunk_outcomes = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    step.held = bool(client["ttff_p95_s"] < TTFF_SLO_S and client["gap_p95_s"] < GAP_SLO_S
                     and client["turns"] > 0)
    if not calls:
        return step
    step.render_calls = len(calls)
    step.chunks_per_call = float(np.mean([c.chunks for c in calls]))
    step.render_ms_p50 = pct([c.busy for c in calls], 50) * 1e3
    step.render_ms_p95 = pct([c.busy for c in calls], 95) * 1e3
    step.unet_ms_p50 = pct([c.stages.get("inference", float("nan")) for c in calls], 50) * 1e3
    step.first_call = {"chunks": calls[0].chunks, **calls[0].stages}
    step.stage_ms_p50 = {k: pct([c.stages.get(k, float("nan")) for c in calls], 50) * 1e3
                         for k in STAGES}
    # Every call of the step falls inside the driver's run (its turns end rendered).
    step.fps_rendered = sum(c.frames for c in calls) / client["run_s"]
    step.gpu_busy = sum(c.busy for c in calls) / client["run_s"]
    return step


# --- report ------------------------------------------------------------------------


def markdown(runs: list[ConfigRun], meta: dict[str, Any]) -> str:
    lines = [
        f"# Serving LatentSync: users per GPU at {meta['resolution']} px ({meta['card']}"
        f"{' x ' + str(meta['gpus']) if meta.get('gpus', 1) > 1 else ''})", "",
        f"Machine: {meta['machine']}; {meta['card']}; torch {meta['torch']}; {meta['dtype']}; "
        f"random weights ({meta['models']}); video {meta['codec']} {meta['height']} px, 25 fps; "
        f"max_batch {meta['max_batch']}; render timeout {meta['render_timeout']} s.",
        f"Model build (random init on the device, not a checkpoint load): "
        f"{meta['model_build_s']:.1f} s; weights {meta['weights_gib']:.2f} GiB.",
        f"Users: a third speaking (at least one) 2-5 s turns of speech-like audio in real "
        f"time with 0.5-1.5 s pauses, the rest idle; {meta['duration']:g} s measured after "
        f"{meta['settle']:g} s settling per step. Holds: TTFF p95 < {TTFF_SLO_S:g} s and gap "
        f"p95 (speaking users) < {GAP_SLO_S * 1e3:.0f} ms.", "",
        f"| config | warm start s | GPU mem after warm-up GiB | users on {meta.get('gpus', 1)}"
        " GPU(s) | ... and held "
        f"frames < {HELD_LIMIT:.0%} |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        cap = "none (first step broke)" if r.capacity is None else str(r.capacity)
        if r.steps and all(s.held for s in r.steps):
            cap = f">= {r.capacity} (every step held)"
        smooth = "none" if r.capacity_no_stalls is None else str(r.capacity_no_stalls)
        lines.append(f"| {r.name}: {describe_settings(r.settings)} | {r.warm_start_s:.2f} | "
                     f"{r.alloc_after_warmup_gib:.2f} | {cap} | {smooth} |")
    lines += ["", "| config | users | speaking | turns | TTFF p50 ms | TTFF p95 ms | gap p95 ms "
              "| gap max ms | held frames % | renders | chunks/call | render p50 ms | "
              "render p95 ms | UNet p50 ms | fps rendered | GPU busy % | peak GPU GiB | "
              "chunks not by the GPU | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for s in r.steps:
            c = s.client
            failed = sum(v for k, v in s.chunk_outcomes.items() if k != "ok")
            lines.append(
                f"| {r.name} | {s.users} | {s.speaking} | {c['turns']} | "
                f"{c['ttff_p50_s'] * 1e3:.0f} | {c['ttff_p95_s'] * 1e3:.0f} | "
                f"{c['gap_p95_s'] * 1e3:.0f} | {c['gap_max_s'] * 1e3:.0f} | "
                f"{c['held_share'] * 100:.1f} | {s.render_calls} | {s.chunks_per_call:.2f} | "
                f"{s.render_ms_p50:.0f} | {s.render_ms_p95:.0f} | {s.unet_ms_p50:.0f} | "
                f"{s.fps_rendered:.1f} | {s.gpu_busy * 100:.0f} | {s.peak_alloc_gib:.2f} | "
                f"{failed:.0f} | {'held' if s.held else 'broke'} |")
    lines += ["", "Stage p50 ms per render call (" + ", ".join(STAGES) + "):", ""]
    for r in runs:
        for s in r.steps:
            stages = " / ".join(f"{s.stage_ms_p50.get(k, float('nan')):.0f}" for k in STAGES)
            lines.append(f"- {r.name}, {s.users} users: {stages}")
    for r in runs:
        if r.steps and r.steps[0].first_call and r.steps[0].client["ttff_s"]:
            s, first = r.steps[0], r.steps[0].first_call
            stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in first.items() if k != "chunks")
            lines.append(f"\nFirst chunk of a turn, {r.name}, {s.users} user(s): TTFF of the "
                         f"first turn {s.client['ttff_s'][0] * 1e3:.0f} ms; its render call "
                         f"({first['chunks']:.0f} chunk(s)) ms: {stages}.")
    notes = [r.note for r in runs if r.note]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def describe_settings(s: dict[str, Any]) -> str:
    cache = f" + DeepCache {s['deepcache_interval']}" if s["deepcache_interval"] > 1 else ""
    graphs = ", CUDA graphs" if s["cuda_graphs"] else ""
    graphs += " + torch.compile" if s.get("compile") else ""
    graphs += " + AOTInductor" if s.get("aot") else ""
    graphs += ", paste planned between steps" if s.get("plan_between_steps") else ""
    start = s.get("turn_start_deepcache_interval", 1)
    graphs += f", turn starts DeepCache {start}" if start > 1 else ""
    return f"{s['sampler']} {s['inference_steps']} steps{cache}{graphs}"


# --- main --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (dry run)")
    p.add_argument("--out", type=Path, default=Path("out/gpu_serve"))
    p.add_argument("--configs", default="exact,fast")
    p.add_argument("--users-exact", default="1,3,6")
    p.add_argument("--users-fast", default="1,3,6,9,12,15,18,24")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per step")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no ramp step after this many seconds")
    p.add_argument("--codec", choices=["h264", "jpeg"], default="h264")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for /readyz (a cold --compile warm-up takes minutes)")
    p.add_argument("--render-timeout", type=float, default=5.0)
    add_runner_options(p)
    p.add_argument("--gpus", type=int, default=1, help="renderers (engine lanes), one per GPU")
    args = p.parse_args(argv)
    args.users = {"exact": [int(x) for x in args.users_exact.split(",")],
                  "fast": [int(x) for x in args.users_fast.split(",")]}
    args.resolution = 64 if args.tiny else 256
    return args


@dataclass
class BenchSetup:
    """What both GPU benchmarks start from: logging, models on each device, metadata."""

    devices: list[torch.device]
    dtype: torch.dtype
    models: list[LatentSyncModels]  # one set per device
    card: str
    meta: dict[str, Any]  # the machine, models and the settings every row shares


def bench_setup(args: argparse.Namespace, gpus: int = 1) -> BenchSetup:
    configure_logging(AgentConfig().logging.model_copy(update={"level": args.log_level,
                                                              "format": "console"}))
    tune_process()
    devices = [torch.device("cpu" if args.tiny else f"cuda:{i}") for i in range(gpus)]
    dtype = torch.float32 if args.tiny else torch.float16
    t0 = time.perf_counter()
    models = [build_models(args.tiny, d, dtype) for d in devices]
    if devices[0].type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for m in (models[0].unet, models[0].codec.vae)
                  for p in m.parameters())
    card = torch.cuda.get_device_name(0) if devices[0].type == "cuda" else "CPU (tiny dry run)"
    log(f"models built in {build_s:.1f} s on {card}")
    meta = {"machine": describe(), "card": card, "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "resolution": args.resolution,
            "models": "tiny" if args.tiny else "stage2.json UNet, Whisper tiny, sd-vae-ft-mse",
            "codec": args.codec, "height": args.height, "max_batch": args.max_batch,
            "render_timeout": args.render_timeout, "model_build_s": build_s,
            "weights_gib": weights / GIB, "duration": args.duration}
    return BenchSetup(devices, dtype, models, card, meta)


async def main_async(args: argparse.Namespace) -> None:
    start = time.monotonic()
    deadline = start + args.budget_s
    setup = bench_setup(args, args.gpus)
    device, models_per_gpu = setup.devices[0], setup.models
    meta = {**setup.meta, "gpus": args.gpus, "settle": args.settle}
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[ConfigRun] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        AvatarRegistry(server_config(args, cache, {}).avatars).warmup()  # cached before timing
        for name in args.configs.split(","):
            runs.append(await run_config(args, name, models_per_gpu, cache, deadline))
            save(args.out, runs, meta)
    meta["total_s"] = time.monotonic() - start
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        meta["device_used_gib_at_end"] = (total - free) / GIB
    save(args.out, runs, meta)
    print(markdown(runs, meta))


def save(out: Path, runs: list[ConfigRun], meta: dict[str, Any]) -> None:
    (out / "gpu_serve.json").write_text(json.dumps(
        {"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1, default=str))
    (out / "gpu_serve.md").write_text(markdown(runs, meta))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --tiny for a CPU dry run")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
