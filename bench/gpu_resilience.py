"""Issue 5 on the diffusion renderer: deadline misses, gaps and fairness against load.

`bench.resilience`'s measurement with the LatentSync renderer on a GPU in place
of the CPU renderer behind chaos delays. The server is `AgentServer` in this
process over RANDOM full-size weights (`bench.gpu_serve`'s models, built once);
the CPU renderer is the fallback behind it. Per sampler config (fast:
DPM-Solver++ 8 + DeepCache 3; exact: 20-step DDIM; both with CUDA graphs) one
renderer serves all the config's rows (its CUDA graphs and face cache stay
warm); each row starts a fresh server. First the renderer's throughput at full
batches (`max_batch` chunks of speech, median of a few calls after two untimed
calls) is measured: it is the capacity that speech load is relative to.

Each row opens N equal sessions from a child process
(`bench.gpu_resilience_users`) that all speak back-to-back turns streamed at
`--tts-speed` x real time, and reports what `bench.resilience` does (sessions
admitted, speech load, deadline-miss rate from server metrics, hold rate, gap
and TTFF percentiles, frames per tier, Jain's index over on-time shares and
over delivered frames per second) plus GPU busy (share of the window inside
render calls), frames rendered per second and peak GPU memory. Rows: the load
ramp per config with admission relaxed so that overload shows and tiers on
(sessions that fall behind move to the CPU fallback); on the first config also
one row with load-driven tiers off, one with admission on (refusals show as
admitted < sessions) and one chaos row: every primary render hangs for a few
seconds mid-window (`ChaosRenderer`, as `serve --chaos` wraps the primary),
the breaker must open, sessions fall back to the CPU renderer without the
stream stalling (gap p95 < 100 ms during the fault), then recover once the
fault lifts; it reports the breaker states seen in the server and the tier
changes seen by the clients.

    python -m bench.gpu_resilience --out out/gpu_resilience            # on a CUDA machine
    python -m bench.gpu_resilience --tiny --out out/gpu_resilience_dry  # CPU dry run

Random weights: the frames are noise, the cost is the released models' cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.avatars import AvatarRegistry
from agent.chaos import ChaosSpec, Fault
from agent.config import AgentConfig
from agent.server import AgentServer
from bench.gpu_serve import (
    GIB,
    SAMPLERS,
    TimedRenderer,
    add_runner_options,
    bench_setup,
    describe_settings,
    log,
    runner_settings,
    server_config,
    wait_ready,
)
from bench.resilience import RELAXED_ADMISSION, TIERS_OFF, batch_fps
from media.avatar import Avatar
from media.types import RENDER_SAMPLE_RATE, ChunkKey, FrameSpec, RenderChunk

# gpu_serve's server config relaxes admission; the admission row puts the defaults back.
ADMISSION_DEFAULTS: dict[str, Any] = {
    f"admission.{key}": getattr(AgentConfig().admission, key) for key in
    ("speaking_share", "max_utilization")}

GAP_SLO_S = 0.100
UNTIMED_CALLS = 2  # before timing full batches: face cache, first-call costs


class SharedRenderer(TimedRenderer):
    """Serves one config's rows: a server's `close` leaves it open (its CUDA graphs and
    face cache stay warm for the next row's server); `release` closes it."""

    def close(self) -> None:
        pass

    def release(self) -> None:
        super().close()


@dataclass(frozen=True, slots=True)
class RowPlan:
    config: str  # a SAMPLERS key
    label: str
    sessions: int
    overrides: dict[str, Any]
    duration: float
    fault: tuple[float, float] | None = None  # every primary render hangs from AT s, FOR s


@dataclass
class RowRun:
    plan: RowPlan
    row: dict[str, Any]  # bench.resilience.Row
    fault: dict[str, Any] | None  # bench.gpu_resilience_users.fault_view
    breaker: list[tuple[float, str]] = field(default_factory=list)  # (s from fault, state)
    hangs: int = 0
    gpu_busy: float = float("nan")
    fps_rendered: float = float("nan")
    peak_alloc_gib: float = float("nan")
    wall_s: float = float("nan")


def full_batch_fps(renderer: TimedRenderer, avatar: Avatar, calls: int) -> tuple[float, float]:
    """(frames per second, median seconds) of `calls` full-batch calls of speech chunks."""
    caps = renderer.capabilities
    n, loop = caps.chunk_frames, avatar.idle_loop
    audio = (0.1 * np.random.default_rng(0).standard_normal(2 * RENDER_SAMPLE_RATE)
             ).astype(np.float32)
    batch = [RenderChunk(ChunkKey(f"~capacity{j}", "~", 0), avatar.id,
                         tuple(FrameSpec(loop[(j * n + i) % len(loop)].source, speech=True)
                               for i in range(n)), 0, audio, avatar.fps)
             for j in range(caps.max_batch)]
    for _ in range(UNTIMED_CALLS):
        renderer.render(batch)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        renderer.render(batch)
        times.append(time.perf_counter() - start)
    call_s = float(np.median(times))
    return batch_fps(len(batch), n, call_s), call_s


async def inject_hang(server: AgentServer, t0: float, fault: tuple[float, float]) -> None:
    assert server.chaos is not None
    at, length = fault
    await asyncio.sleep(max(t0 + at - time.monotonic(), 0.0))
    server.chaos.set_spec(ChaosSpec(hang=1.0))
    await asyncio.sleep(max(t0 + at + length - time.monotonic(), 0.0))
    server.chaos.set_spec(ChaosSpec())  # releases the hung renders


async def watch_breaker(server: AgentServer, origin: float, seen: list[tuple[float, str]]
                        ) -> None:
    """The primary lane's breaker state changes, seconds from `origin` (every 50 ms)."""
    while True:
        state = server.engine.stats().lanes[0].state
        if not seen or seen[-1][1] != state:
            seen.append((round(time.monotonic() - origin, 2), state))
        await asyncio.sleep(0.05)


async def run_row(args: argparse.Namespace, plan: RowPlan, renderer: SharedRenderer,
                  cache: Path, capacity_fps: float) -> RowRun:
    started = time.monotonic()
    settings = {**SAMPLERS[plan.config], **runner_settings(args)}
    overrides = dict(plan.overrides)
    if plan.fault is not None:
        overrides["engine.chaos"] = "seed=0"  # harmless until the fault is set
    config = server_config(args, cache, settings).with_overrides(overrides)
    cuda = renderer.capabilities.device.startswith("cuda")
    server = AgentServer(config, renderer=renderer)
    await server.start()
    side: list[asyncio.Task[None]] = []
    breaker: list[tuple[float, str]] = []
    report: dict[str, Any] = {}
    try:
        await wait_ready(server.port, 300)
        renderer.calls.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cmd = [sys.executable, "-m", "bench.gpu_resilience_users", "--url", server.url,
               "--pid", str(os.getpid()), "--label", plan.label, "--sessions",
               str(plan.sessions), "--warmup", str(args.warmup), "--duration",
               str(plan.duration), "--capacity-fps", str(capacity_fps), "--tts-speed",
               str(args.tts_speed), "--codec", args.codec, "--height", str(args.height)]
        if plan.fault is not None:
            cmd += ["--fault", ",".join(str(x) for x in plan.fault)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    limit=1 << 24)
        assert proc.stdout is not None
        async for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("event") == "window" and plan.fault is not None:
                t0 = float(msg["t0"])
                side += [asyncio.create_task(inject_hang(server, t0, plan.fault)),
                         asyncio.create_task(watch_breaker(server, t0 + plan.fault[0],
                                                           breaker))]
            elif "row" in msg:
                report = msg
        if await proc.wait() != 0 or not report:
            raise RuntimeError(f"session driver exited {proc.returncode}")
    finally:
        for task in side:
            task.cancel()
        if server.chaos is not None:
            server.chaos.set_spec(ChaosSpec())
        hangs = server.chaos.injected[Fault.HANG] if server.chaos is not None else 0
        await server.close()
    run = RowRun(plan, report["row"], report.get("fault"), breaker, hangs)
    t0, t1 = report["window"]
    offset = time.monotonic() - time.perf_counter()
    calls = [c for c in renderer.calls if t0 <= c.start + offset <= t1]
    run.gpu_busy = sum(c.busy for c in calls) / (t1 - t0)
    run.fps_rendered = sum(c.frames for c in calls) / (t1 - t0)
    if cuda:
        run.peak_alloc_gib = torch.cuda.max_memory_allocated() / GIB
    run.wall_s = time.monotonic() - started
    return run


# --- report ------------------------------------------------------------------------


def markdown(runs: list[RowRun], meta: dict[str, Any]) -> str:
    lines = [
        f"# Resilience on LatentSync: misses, gaps and fairness against load ({meta['card']})",
        "",
        f"Machine: {meta['machine']}; {meta['card']}; torch {meta['torch']}; {meta['dtype']}; "
        f"random weights ({meta['models']}) at {meta['resolution']} px; video {meta['codec']} "
        f"{meta['height']} px, 25 fps; max_batch {meta['max_batch']}; render timeout "
        f"{meta['render_timeout']} s; CPU renderer as fallback.",
        f"Every session speaks 2.5-3.5 s turns back to back, its audio streamed at "
        f"{meta['tts_speed']:g}x real time; {meta['duration']:g} s measured after "
        f"{meta['warmup']:g} s per row, a fresh server per row. Speech load: speech frames "
        "asked for per second over the renderer's throughput at full batches:",
    ]
    lines += [f"- {name}: {describe_settings(c['settings'])}: {meta['max_batch']} chunk(s) a "
              f"call in {c['call_s'] * 1e3:.0f} ms, {c['fps']:.1f} frames/s"
              for name, c in meta["capacity"].items()]
    lines += ["", "| config | row | sessions | admitted | speech load | deadline misses | holds "
              "| gap p50 ms | gap p95 ms | gap max ms | TTFF p50 ms | TTFF p95 ms | "
              "tier 1/2/3 % | Jain on-time | Jain throughput | GPU busy % | fps rendered | "
              "peak GPU GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = r.row
        t1, t2, t3 = (100 * x for x in w["tiers"])
        gib = "-" if np.isnan(r.peak_alloc_gib) else f"{r.peak_alloc_gib:.2f}"
        lines.append(
            f"| {r.plan.config} | {r.plan.label} | {w['sessions']} | {w['admitted']} | "
            f"{w['offered']:.2f} | {w['miss_rate']:.1%} | {w['hold_rate']:.1%} | "
            f"{w['gap_p50'] * 1e3:.1f} | {w['gap_p95'] * 1e3:.1f} | {w['gap_max'] * 1e3:.0f} | "
            f"{w['ttff_p50'] * 1e3:.0f} | {w['ttff_p95'] * 1e3:.0f} | {t1:.0f}/{t2:.0f}/{t3:.0f} "
            f"| {w['jain_ontime']:.3f} | {w['jain_rate']:.3f} | {r.gpu_busy * 100:.0f} | "
            f"{r.fps_rendered:.1f} | {gib} |")
    for r in runs:
        if r.fault is not None and r.plan.fault is not None:
            lines += ["", *chaos_lines(r, meta)]
    if meta.get("notes"):
        lines += ["", *[f"- {n}" for n in meta["notes"]]]
    return "\n".join(lines) + "\n"


def chaos_lines(r: RowRun, meta: dict[str, Any]) -> list[str]:
    assert r.fault is not None and r.plan.fault is not None
    at, length = r.plan.fault
    f = r.fault
    n = r.row["admitted"]
    dropped = [d for d in f["dropped_after_s"] if d is not None]
    back = [b for b in f["back_after_lift_s"] if b is not None]
    reasons = sorted({e[3] for e in f["events"] if e[2] > 1})
    t1, t2, t3 = (100 * x for x in f["tier_share"])
    ok = "yes" if f["gap_p95_s"] < GAP_SLO_S else "NO"
    states = ", ".join(f"{s} {t:+.2f}" for t, s in r.breaker)
    events = "; ".join(f"{t:+.2f} s{i}->{tier}" for t, i, tier, _ in f["events"])
    return [
        f"Chaos row ({r.plan.config}, {n} session{'' if n == 1 else 's'}): every primary "
        f"render hangs from {at:g} s to {at + length:g} s into the {r.plan.duration:g} s "
        f"window ({r.hangs} render calls hung); breaker open_s {meta['breaker_open_s']:g} s, "
        f"tier step-up after {meta['stable_s']:g} s healthy. Times in s from the fault's "
        f"start (lifted at +{length:g}).",
        "",
        f"- Primary breaker (server, polled every 50 ms): {states or 'not seen'}.",
        f"- Sessions' tier messages: {len(dropped)} of {n} dropped"
        + (f", at +{min(dropped):.2f} to +{max(dropped):.2f} s" if dropped else "")
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + f"; {len(back)} of {n} back at tier 1 by the window's end"
        + (f", {min(back):.2f} to {max(back):.2f} s after the lift" if back else "") + ".",
        f"- Tier changes (session -> tier): {events or 'none'}.",
        f"- During the fault: gap p50/p95/max {f['gap_p50_s'] * 1e3:.1f}/"
        f"{f['gap_p95_s'] * 1e3:.1f}/{f['gap_max_s'] * 1e3:.0f} ms (p95 < "
        f"{GAP_SLO_S * 1e3:.0f} ms: {ok}); frames at tier 1/2/3 {t1:.0f}/{t2:.0f}/{t3:.0f} %.",
    ]


def save(out: Path, runs: list[RowRun], meta: dict[str, Any]) -> None:
    (out / "gpu_resilience.json").write_text(json.dumps(
        {"meta": meta, "rows": [asdict(r) for r in runs]}, indent=1, default=str))
    (out / "gpu_resilience.md").write_text(markdown(runs, meta))


# --- main --------------------------------------------------------------------------

# Options left out: (full size on a GPU, --tiny on the CPU).
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "configs": ("fast,exact", "fast"),
    "sessions_fast": ("2,4,6,8", "1,2"),
    "sessions_exact": ("1,2,3", "1"),
    "duration": (12.0, 5.0),
    "warmup": (4.0, 2.0),
    "chaos_sessions": (4, 1),
    "fault": ("3,10", "1,10"),
    "chaos_duration": (32.0, 26.0),
    "admission_sessions": (8, 3),
    "tiers_off_sessions": (8, 2),
    "height": (512, 128),
    # A tiny chunk takes seconds on the CPU: one chunk a call, and time to finish it.
    "max_batch": (4, 1),
    "render_timeout": (5.0, 8.0),
    "capacity_calls": (3, 1),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (dry run)")
    p.add_argument("--out", type=Path, default=Path("out/gpu_resilience"))
    p.add_argument("--configs", help="sampler configs (fast,exact; tiny fast); the extra "
                   "rows run on the first")
    p.add_argument("--sessions-fast", help="load rows of fast (2,4,6,8; tiny 1,2)")
    p.add_argument("--sessions-exact", help="load rows of exact (1,2,3; tiny 1)")
    p.add_argument("--duration", type=float, help="measured seconds per row (12; tiny 5)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (4; tiny 2)")
    p.add_argument("--tts-speed", type=float, default=4.0,
                   help="audio streams at this many times real time")
    p.add_argument("--chaos-sessions", type=int,
                   help="sessions of the chaos row (4; tiny 1; 0: none)")
    p.add_argument("--fault", help="AT,FOR: the hang's start in the chaos window and its "
                   "length, s (3,10; tiny 1,10)")
    p.add_argument("--chaos-duration", type=float, help="its measured seconds (32; tiny 26)")
    p.add_argument("--admission-sessions", type=int,
                   help="sessions of the admission-on row (8; tiny 3; 0: none)")
    p.add_argument("--tiers-off-sessions", type=int,
                   help="sessions of the tiers-off row (8; tiny 2; 0: none)")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="start no row that would end after this many seconds")
    p.add_argument("--codec", choices=["h264", "jpeg"], default="h264")
    p.add_argument("--height", type=int, help="video height (512; tiny 128)")
    p.add_argument("--max-batch", type=int, help="chunks per render call (4; tiny 1)")
    p.add_argument("--render-timeout", type=float, help="seconds (5; tiny 8)")
    p.add_argument("--capacity-calls", type=int,
                   help="timed full-batch calls after two untimed ones (3; tiny 1)")
    add_runner_options(p)
    args = p.parse_args(argv)
    for name, (full, tiny) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.resolution = 64 if args.tiny else 256
    return args


def plan_rows(args: argparse.Namespace) -> list[RowPlan]:
    configs = args.configs.split(",")
    sessions = {"fast": args.sessions_fast, "exact": args.sessions_exact}
    plans: list[RowPlan] = []
    for i, name in enumerate(configs):
        plans += [RowPlan(name, "load", int(n), RELAXED_ADMISSION, args.duration)
                  for n in sessions[name].split(",")]
        if i > 0:
            continue
        if args.chaos_sessions:
            at, length = (float(x) for x in args.fault.split(","))
            plans.append(RowPlan(name, "chaos: hang", args.chaos_sessions, RELAXED_ADMISSION,
                                 args.chaos_duration, (at, length)))
        if args.admission_sessions:
            plans.append(RowPlan(name, "admission on", args.admission_sessions,
                                 ADMISSION_DEFAULTS,
                                 args.duration))
        if args.tiers_off_sessions:
            plans.append(RowPlan(name, "tiers off", args.tiers_off_sessions,
                                 {**RELAXED_ADMISSION, **TIERS_OFF}, args.duration))
    return plans


async def main_async(args: argparse.Namespace) -> None:
    start = time.monotonic()
    deadline = start + args.budget_s
    setup = bench_setup(args)
    models = setup.models[0]
    defaults = AgentConfig()
    meta: dict[str, Any] = {
        **setup.meta, "tts_speed": args.tts_speed, "warmup": args.warmup,
        "breaker_open_s": defaults.breaker.open_s, "stable_s": defaults.degradation.stable_s,
        "capacity": {}, "notes": [], "command": " ".join(sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[RowRun] = []
    overhead = 10.0  # server start and stop, driver start: the largest seen so far
    plans = plan_rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        avatars = AvatarRegistry(server_config(args, cache, {}).avatars)
        avatar = avatars.warmup()  # cached before timing
        for name in dict.fromkeys(p.config for p in plans):
            settings = {**SAMPLERS[name], **runner_settings(args)}
            todo = [p for p in plans if p.config == name]
            if time.monotonic() + args.warmup + todo[0].duration + overhead > deadline:
                meta["notes"].append(f"{name}: not run, time budget spent")
                continue
            config = server_config(args, cache, settings)
            renderer = SharedRenderer(avatars.get, config.renderer.latentsync, models=models,
                                      resolution=args.resolution)
            try:
                renderer.warmup()
                fps, call_s = full_batch_fps(renderer, avatar, args.capacity_calls)
                meta["capacity"][name] = {"settings": settings, "fps": fps, "call_s": call_s}
                log(f"{name}: {fps:.1f} frames/s at full batches ({call_s * 1e3:.0f} ms a call)")
                for plan in todo:
                    if time.monotonic() + args.warmup + plan.duration + overhead > deadline:
                        meta["notes"].append(f"{name} {plan.label} {plan.sessions} sessions: "
                                             "not run, time budget spent")
                        continue
                    run = await run_row(args, plan, renderer, cache, fps)
                    overhead = max(overhead, run.wall_s - args.warmup - plan.duration)
                    runs.append(run)
                    w = run.row
                    log(f"{name} {plan.label} N={plan.sessions}: admitted {w['admitted']}, "
                        f"load {w['offered']:.2f}, misses {w['miss_rate']:.1%}, holds "
                        f"{w['hold_rate']:.1%}, gap p95 {w['gap_p95'] * 1e3:.0f} ms "
                        f"({run.wall_s:.0f} s)")
                    save(args.out, runs, meta)
            finally:
                renderer.release()
    meta["total_s"] = time.monotonic() - start
    save(args.out, runs, meta)
    print(markdown(runs, meta))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --tiny for a CPU dry run")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
