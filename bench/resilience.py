"""Scheduling under load: deadline misses, frame gaps and fairness against offered load.

The CPU renderer wrapped in chaos delays stands in for one GPU (`--gpu-ms A,B`: a
render call takes A ms plus B ms per chunk on top of the CPU work, so batching pays
as on a GPU), with one primary lane and the CPU fallback behind it. Each row starts
`python -m agent serve` afresh, opens N equal sessions that all speak back-to-back
turns of speech-like audio (streamed at `--tts-speed` x real time, as a TTS
delivers it), and measures over a steady window:

- deadline-miss rate: chunks finished after their deadline, over chunks rendered
  (server metrics; a chunk whose audio came after its deadline counts only when
  its render took longer than usual);
- hold rate: slots of a turn that repeated the last picture because the next
  chunk was not back (client side, from seq numbers);
- inter-frame arrival gaps (client side), frames per tier, TTFF;
- fairness: Jain's index over the sessions' on-time shares (1 - hold rate) and
  over their delivered turn frames per second (1.0 = perfectly equal).

Speech load is the speech frames the sessions played per second over the
stand-in GPU's throughput at full batches (closed loop: sessions that wait on
holds ask for less). Admission control is relaxed (`--admission off`, the
default) so that overload shows; with `on` the server refuses what it cannot hold.
`--tiers off` keeps sessions at tier 1 under load (no shedding to the CPU
fallback), to see what the scheduler alone does.
`--pacing both` runs each row with load-driven tier drops paced per instance (the
default `degradation.miss_demotion_interval_s`) and unpaced (0), in the same run.
The first row, without chaos, is the baseline (plain CPU renderer, same run).

    python -m bench.resilience --sessions 1,2,4,6,8 --gpu-ms 40,60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import SessionClient, SessionRecord, SessionRefused
from agent.protocol import FrameFlags
from bench.machine import describe, proc_cpu_seconds
from tests.serverutil import server_process, speech_like

CHUNK = 8  # the CPU renderer's frames per chunk
MAX_BATCH = 4
FPS = 25.0
# Admission lets every session in, so that overload shows.
RELAXED_ADMISSION: dict[str, Any] = {"admission.speaking_share": 0.01,
                                     "admission.max_utilization": 1.0}
# Late chunks never move a session (failures would; the load rows have none).
TIERS_OFF: dict[str, Any] = {"degradation.miss_window": 64, "degradation.miss_ratio": 1.0,
                             "degradation.queue_wait_s": 1000.0}


@dataclass
class Row:
    label: str
    sessions: int
    admitted: int
    offered: float  # demand over capacity
    miss_rate: float
    hold_rate: float
    gap_p50: float
    gap_p95: float
    gap_p99: float
    ttff_p50: float
    ttff_p95: float
    tiers: tuple[float, float, float]
    jain_ontime: float
    jain_rate: float
    shed: float
    server_cpu: float
    gap_max: float = float("nan")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def jain(xs: list[float]) -> float:
    a = np.asarray(xs, float)
    return float(a.sum() ** 2 / (len(a) * (a**2).sum())) if len(a) and (a**2).sum() > 0 else 1.0


def batch_fps(chunks: int, chunk_frames: int, call_s: float) -> float:
    """Frames per second of a renderer whose call of `chunks` chunks takes `call_s`."""
    return chunks * chunk_frames / call_s


def speech_load(speech_shares: Sequence[float], capacity_fps: float, fps: float = FPS) -> float:
    """Speech frames the sessions asked for per second (each session's share of its frames
    that were speech, times the frame rate) over the renderer's throughput."""
    return fps * sum(speech_shares) / capacity_fps


def scrape(url: str) -> dict[str, float]:
    metrics = url.replace("ws://", "http://").replace("/v1/session", "/metrics")
    with urllib.request.urlopen(metrics, timeout=5) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("avatar_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def total(m: dict[str, float], prefix: str, exclude: tuple[str, ...] = ()) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix) and not any(e in k for e in exclude))


async def speaker(client: SessionClient, rng: np.random.Generator, stop: float, speed: float,
                  ttffs: list[tuple[float, float]]) -> None:
    n = 0
    while time.monotonic() < stop:
        n += 1
        turn = f"t{n}"
        audio = speech_like(float(rng.uniform(2.5, 3.5)), 16000, seed=int(rng.integers(1 << 30)))
        first = await client.speak(turn, audio, 16000, realtime=speed)
        await client.wait_message("turn.done", 60, turn=turn)
        started = client.messages("turn.started")[-1]
        arrival = next((v.arrival for v in client.record.video
                        if v.header.seq == started["seq"]), None)
        if arrival is not None:
            ttffs.append((arrival, arrival - first))
        await asyncio.sleep(float(rng.uniform(0.2, 0.4)))


def turn_slots(rec: SessionRecord, t0: float, t1: float) -> tuple[int, int]:
    """(turn frames, hold slots) of the turns that started within [t0, t1]."""
    seq_arrival = {v.header.seq: v.arrival for v in rec.video}
    dones = {m["turn"]: m for _, m in rec.messages if m.get("type") == "turn.done"}
    frames = holds = 0
    for _, m in rec.messages:
        if m.get("type") != "turn.started" or m["turn"] not in dones:
            continue
        start = m["seq"]
        if not t0 <= seq_arrival.get(start, -1.0) <= t1:
            continue
        last = next((v.header.seq for v in rec.video if v.header.seq >= start
                     and v.header.flags & FrameFlags.LAST_OF_TURN), None)
        if last is None:
            continue
        n = int(dones[m["turn"]]["frames"])
        frames += n
        holds += max(last - start + 1 - n, 0)
    return frames, holds


async def run_row(label: str, url: str, pid: int, sessions: int, duration: float,
                  warmup: float, capacity_fps: float, speed: float) -> Row:
    row, _, _ = await measure_row(label, url, pid, sessions, duration, warmup, capacity_fps,
                                  speed)
    return row


async def measure_row(label: str, url: str, pid: int, sessions: int, duration: float,
                      warmup: float, capacity_fps: float, speed: float, *,
                      hello: dict[str, Any] | None = None,
                      on_window: Callable[[float], None] | None = None,
                      ) -> tuple[Row, list[SessionRecord], tuple[float, float]]:
    """One row: the Row, the sessions' records and the measured window (monotonic);
    `on_window(t0)` is called as the window opens."""
    clients: list[SessionClient] = []
    for _ in range(sessions):
        try:
            clients.append(await SessionClient.open(url, hello=hello))
        except SessionRefused:
            break
    rng = np.random.default_rng(sessions)
    stop = time.monotonic() + warmup + duration
    ttffs: list[tuple[float, float]] = []
    tasks = [asyncio.create_task(speaker(c, rng, stop, speed, ttffs)) for c in clients]
    await asyncio.sleep(warmup)
    m0, cpu0, t0 = scrape(url), proc_cpu_seconds(pid), time.monotonic()
    if on_window is not None:
        on_window(t0)
    await asyncio.sleep(duration)
    m1, cpu1, t1 = scrape(url), proc_cpu_seconds(pid), time.monotonic()
    for t in tasks:
        t.cancel()
    await asyncio.sleep(0.5)
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()
    records = [c.record for c in clients]
    row = summarise(label, sessions, records, (t0, t1), (m0, m1), (cpu1 - cpu0) / (t1 - t0),
                    [d for at, d in ttffs if t0 <= at <= t1], capacity_fps)
    return row, records, (t0, t1)


def summarise(label: str, sessions: int, records: list[SessionRecord],
              window: tuple[float, float], metrics: tuple[dict[str, float], dict[str, float]],
              server_cpu: float, ttffs: list[float], capacity_fps: float) -> Row:
    (t0, t1), (m0, m1) = window, metrics
    done = (total(m1, "avatar_chunks_total", ("cancelled", "static", "shed"))
            - total(m0, "avatar_chunks_total", ("cancelled", "static", "shed")))
    misses = total(m1, "avatar_chunk_deadline_misses_total") - total(
        m0, "avatar_chunk_deadline_misses_total")
    shed = total(m1, 'avatar_chunks_total{outcome="shed"') - total(
        m0, 'avatar_chunks_total{outcome="shed"')
    gaps: list[float] = []
    ontime: list[float] = []
    rates: list[float] = []
    tier_counts = np.zeros(3)
    all_frames = all_holds = 0
    speech_shares: list[float] = []
    for rec in records:
        window_frames = [v for v in rec.video if t0 <= v.arrival <= t1]
        gaps.extend(np.diff([v.arrival for v in window_frames]).tolist())
        for v in window_frames:
            tier_counts[v.header.tier - 1] += 1
        frames, holds = turn_slots(rec, t0, t1)
        all_frames += frames
        all_holds += holds
        ontime.append(1 - holds / (frames + holds) if frames + holds else 1.0)
        rates.append(frames / (t1 - t0))
        speech_shares.append(sum(1 for v in window_frames if v.header.flags & FrameFlags.SPEECH)
                             / max(len(window_frames), 1))
    share = tier_counts / max(tier_counts.sum(), 1)
    return Row(label, sessions, len(records), speech_load(speech_shares, capacity_fps),
               misses / done if done else float("nan"),
               all_holds / (all_frames + all_holds) if all_frames + all_holds else 0.0,
               pct(gaps, 50), pct(gaps, 95), pct(gaps, 99), pct(ttffs, 50),
               pct(ttffs, 95), (float(share[0]), float(share[1]), float(share[2])),
               jain(ontime), jain(rates), shed, server_cpu, max(gaps, default=float("nan")))


def yaml_overrides(overrides: dict[str, Any]) -> str:
    """{"section.key": value} as YAML (one level of sections)."""
    sections: dict[str, list[str]] = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        sections.setdefault(section, []).append(f"  {key}: {value}\n")
    return "".join(f"{section}:\n" + "".join(lines) for section, lines in sections.items())


def write_config(path: Path, avatar_dir: Path, size: int, admission: bool, tiers: bool,
                 extra: dict[str, Any] | None = None) -> None:
    relaxed = yaml_overrides({**({} if admission else RELAXED_ADMISSION),
                              **({} if tiers else TIERS_OFF), **(extra or {})})
    path.write_text(
        f"avatars:\n  cache_dir: {avatar_dir}\n  default_avatar:\n    size: {size}\n"
        "    clip_seconds: [4.0, 8.0]\n"
        f"video:\n  max_height: {size}\n"
        "renderer:\n  name: cpu\n  cpu:\n    workers: 1\n"  # one primary lane: one "GPU"
        "server:\n  max_sessions: 1000\n  drain_timeout_s: 1.0\n"
        "logging:\n  level: warning\n" + relaxed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", default="1,2,4,6,8")
    p.add_argument("--gpu-ms", default="40,60", help="A,B: a call takes A ms + B ms a chunk")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--admission", choices=["on", "off"], default="off")
    p.add_argument("--tiers", choices=["on", "off"], default="on",
                   help="off: deadline misses and queue wait never lower a session's tier")
    p.add_argument("--tts-speed", type=float, default=4.0,
                   help="audio streams at this many times real time (1: just in time)")
    p.add_argument("--pacing", choices=["on", "off", "both"], default="on",
                   help="load-driven tier drops paced per instance (degradation."
                   "miss_demotion_interval_s as configured) or not (0); both: each row twice")
    args = p.parse_args()
    call_ms, chunk_ms = (float(x) for x in args.gpu_ms.split(","))
    chaos = f"delay_ms={call_ms:g},chunk_ms={chunk_ms:g}"
    # The stand-in GPU's throughput at full batches, in frames per second.
    capacity_fps = batch_fps(MAX_BATCH, CHUNK, (call_ms + MAX_BATCH * chunk_ms) / 1000)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for pacing in ("on", "off"):
            configs[pacing] = Path(tmp) / f"bench-{pacing}.yaml"
            write_config(configs[pacing], Path(tmp) / "avatars", args.size,
                         args.admission == "on", args.tiers == "on",
                         {} if pacing == "on" else {"degradation.miss_demotion_interval_s": 0})
        pacings = ["off", "on"] if args.pacing == "both" else [args.pacing]
        plan = [("baseline (no chaos)", 1, None, pacings[-1])] + [
            ("stand-in GPU" + (f", pacing {pacing}" if args.pacing == "both" else ""), int(n),
             chaos, pacing) for n in args.sessions.split(",") for pacing in pacings]
        for label, n, spec, pacing in plan:
            chaos_args = ("--chaos", spec) if spec else ()
            with server_process("--config", str(configs[pacing]), *chaos_args) as (proc, url):
                rows.append(asyncio.run(run_row(label, url, proc.pid, n, args.duration,
                                                args.warmup, capacity_fps, args.tts_speed)))
            r = rows[-1]
            print(f"  {label}, {n} sessions: misses {r.miss_rate:.1%}, holds {r.hold_rate:.1%}, "
                  f"gap p95 {r.gap_p95 * 1e3:.0f} ms", file=sys.stderr)
    print(f"\nMachine: {describe()}")
    print(f"Server: python -m agent serve, CPU renderer, h264 {args.size}px, 25 fps; one primary "
          f"lane with chaos {chaos} standing in for a GPU (capacity {capacity_fps:.0f} "
          f"frames/s at batch {MAX_BATCH}), CPU fallback behind it; admission {args.admission}, "
          f"load-driven tiers {args.tiers}, paced drops {args.pacing}. "
          f"Every session speaks 2.5-3.5 s turns back to back, its audio streamed at "
          f"{args.tts_speed:g}x real time; "
          f"{args.duration:g} s window after {args.warmup:g} s.\n")
    print("| run | sessions | admitted | speech load | deadline misses | holds | gap p50 ms | "
          "gap p95 ms | gap p99 ms | TTFF p50 ms | TTFF p95 ms | tier 1/2/3 % | "
          "Jain on-time | Jain throughput | shed | server CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t1, t2, t3 = (100 * x for x in r.tiers)
        print(f"| {r.label} | {r.sessions} | {r.admitted} | {r.offered:.2f} | "
              f"{r.miss_rate:.1%} | {r.hold_rate:.1%} | {r.gap_p50 * 1e3:.1f} | "
              f"{r.gap_p95 * 1e3:.1f} | {r.gap_p99 * 1e3:.1f} | {r.ttff_p50 * 1e3:.0f} | "
              f"{r.ttff_p95 * 1e3:.0f} | {t1:.0f}/{t2:.0f}/{t3:.0f} | {r.jain_ontime:.3f} | "
              f"{r.jain_rate:.3f} | {r.shed:.0f} | {r.server_cpu:.2f} |")


if __name__ == "__main__":
    main()
