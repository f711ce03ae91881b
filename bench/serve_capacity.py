"""How many sessions one machine holds at 25 fps on the CPU path.

Starts `python -m agent serve` in its own process, opens N sessions from this
process (a share of them speaking turns of speech-like audio in real time,
the rest idle), and measures over a steady window: inter-frame arrival gaps,
time to first speech frame per turn, and the server's CPU and RSS. A row
with no sessions is the baseline in the same run.

    python -m bench.serve_capacity --sessions 0,4,8,16 --speaking 0.33
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from agent.client import SessionClient
from bench.machine import describe, proc_cpu_seconds, proc_rss_bytes
from tests.serverutil import server_process, speech_like


@dataclass
class Row:
    sessions: int
    speaking: int
    gap_p50: float
    gap_p95: float
    gap_p99: float
    ttff_p50: float
    ttff_p95: float
    turns: int
    server_cpu: float  # cores
    client_cpu: float
    rss_mb: float
    tier2_share: float  # share of sessions the server moved below tier 1


async def speaker(client: SessionClient, rng: np.random.Generator, stop: float,
                  ttffs: list[float]) -> None:
    n = 0
    while time.monotonic() < stop - 1.0:
        n += 1
        seconds = float(rng.uniform(2.0, 5.0))
        audio = speech_like(seconds, 16000, seed=int(rng.integers(1 << 30)))
        turn = f"t{n}"
        first = await client.speak(turn, audio, 16000)
        await client.wait_for(
            lambda r, t=turn: any(m.get("type") == "turn.started" and m["turn"] == t
                                  for _, m in r.messages), 10)
        started = next(m for _, m in client.record.messages
                       if m.get("type") == "turn.started" and m["turn"] == turn)
        await client.wait_for(lambda r, s=started["seq"]: any(v.header.seq == s
                                                               for v in r.video), 10)
        arrival = next(v.arrival for v in client.record.video if v.header.seq == started["seq"])
        if arrival > stop - 0.5:
            break
        ttffs.append(arrival - first)
        await client.wait_message("turn.done", 30, turn=turn)
        await asyncio.sleep(float(rng.uniform(0.5, 1.5)))


async def run_row(url: str, pid: int, sessions: int, share: float, duration: float,
                  warmup: float, height: int, codec: str) -> Row:
    n_speak = round(sessions * share)
    clients = []
    for _ in range(sessions):
        clients.append(await SessionClient.open(
            url, hello={"video": {"codec": codec, "max_height": height}}))
    rng = np.random.default_rng(sessions)
    start = time.monotonic()
    stop = start + warmup + duration
    ttffs: list[float] = []
    tasks = [asyncio.create_task(speaker(c, rng, stop, ttffs)) for c in clients[:n_speak]]
    await asyncio.sleep(warmup)
    cpu0, ccpu0, t0 = proc_cpu_seconds(pid), time.process_time(), time.monotonic()
    await asyncio.sleep(max(stop - time.monotonic(), 0))
    cpu1, ccpu1, t1 = proc_cpu_seconds(pid), time.process_time(), time.monotonic()
    rss = proc_rss_bytes(pid)
    for t in tasks:
        t.cancel()
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()
    gaps: list[float] = []
    for c in clients:
        arrivals = [v.arrival for v in c.record.video if t0 <= v.arrival <= t1]
        gaps.extend(np.diff(arrivals).tolist())

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    degraded = sum(1 for c in clients if any(v.header.tier > 1 for v in c.record.video))
    return Row(sessions, n_speak, pct(gaps, 50), pct(gaps, 95), pct(gaps, 99),
               pct(ttffs, 50), pct(ttffs, 95), len(ttffs), (cpu1 - cpu0) / (t1 - t0),
               (ccpu1 - ccpu0) / (t1 - t0), rss / 2**20, degraded / max(sessions, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", default="0,4,8,12,16,24")
    p.add_argument("--speaking", type=float, default=1 / 3)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--codec", default="h264")
    args = p.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.sessions.split(",")]:
            with server_process("--avatar-dir", tmp, "--renderer", "cpu",
                                "--max-sessions", "1000") as (proc, url):
                rows.append(asyncio.run(run_row(url, proc.pid, n, args.speaking, args.duration,
                                                args.warmup, args.height, args.codec)))
            r = rows[-1]
            print(f"  {n} sessions: gap p95 {r.gap_p95 * 1000:.1f} ms, ttff p95 "
                  f"{r.ttff_p95 * 1000:.0f} ms, server {r.server_cpu:.2f} cores", file=sys.stderr)
    print(f"\nMachine: {describe()}")
    print(f"Server: python -m agent serve (CPU renderer), {args.codec} {args.height}px, 25 fps; "
          f"{args.speaking:.0%} of sessions speaking 2-5 s turns in real time\n")
    print("| sessions | speaking | gap p50 ms | gap p95 ms | gap p99 ms | TTFF p50 ms | "
          "TTFF p95 ms | turns | server CPU (cores) | client CPU | server RSS MB | "
          "below tier 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.sessions} | {r.speaking} | {r.gap_p50 * 1e3:.1f} | {r.gap_p95 * 1e3:.1f} | "
              f"{r.gap_p99 * 1e3:.1f} | {r.ttff_p50 * 1e3:.0f} | {r.ttff_p95 * 1e3:.0f} | "
              f"{r.turns} | {r.server_cpu:.2f} | {r.client_cpu:.2f} | {r.rss_mb:.0f} | "
              f"{r.tier2_share:.0%} |")


if __name__ == "__main__":
    main()
