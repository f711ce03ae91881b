"""Simulated users for bench.gpu_serve, in their own process: one JSON line on stdout.

    python -m bench.gpu_serve_users --url ws://127.0.0.1:PORT/v1/session --users 6 \
        --speaking 2 --duration 15 --settle 3

Opens `users` sessions; the first `speaking` ones speak 2-5 s turns of
speech-like audio in real time (0.5-1.5 s pauses, start times spread over 2 s),
the others stay idle. New turns start until settle + duration; turns under way
then finish. Per turn: TTFF = first audio sent -> arrival of the turn's first
video frame; held frames = frames the turn spent on screen beyond its own (the
renderer fell behind and the stream repeated the last picture). Gaps are the
arrival intervals of video frames inside [settle, settle + duration].
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.client import SessionClient, SessionRecord, SessionRefused
from tests.serverutil import speech_like

FPS = 25
RATE = 16_000
TURN_TIMEOUT_S = 60.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass(frozen=True, slots=True)
class TurnRecord:
    first_audio: float  # monotonic
    ttff_s: float
    frames: int  # the turn's own frames
    held: int  # extra frame slots it took on screen


async def speaker(client: SessionClient, rng: np.random.Generator, stop: float,
                  turns: list[TurnRecord]) -> None:
    await asyncio.sleep(float(rng.uniform(0.0, 2.0)))
    n = 0
    while time.monotonic() < stop:
        n += 1
        turn = f"t{n}"
        audio = speech_like(float(rng.uniform(2.0, 5.0)), RATE, seed=int(rng.integers(1 << 30)))
        first = await client.speak(turn, audio, RATE)
        started = await client.wait_message("turn.started", TURN_TIMEOUT_S, turn=turn)
        seq: int = started["seq"]
        await client.wait_for(functools.partial(has_frame, seq=seq), TURN_TIMEOUT_S)
        arrival = arrival_of(client.record, seq)
        assert arrival is not None
        done = await client.wait_message("turn.done", TURN_TIMEOUT_S, turn=turn)
        span = (done["pts_us"] - started["pts_us"]) * FPS // 1_000_000
        turns.append(TurnRecord(first, arrival - first, done["frames"], span - done["frames"]))
        await asyncio.sleep(float(rng.uniform(0.5, 1.5)))


def arrival_of(record: SessionRecord, seq: int) -> float | None:
    """When the video frame `seq` arrived (searched from the newest)."""
    return next((v.arrival for v in reversed(record.video) if v.header.seq == seq), None)


def has_frame(record: SessionRecord, seq: int) -> bool:
    return arrival_of(record, seq) is not None


def gaps(client: SessionClient, t0: float, t1: float) -> list[float]:
    arrivals = [v.arrival for v in client.record.video if t0 <= v.arrival <= t1]
    return np.diff(arrivals).tolist() if len(arrivals) > 1 else []


async def run(args: argparse.Namespace) -> dict[str, Any]:
    hello = {"video": {"codec": args.codec, "max_height": args.height}}
    opened = await asyncio.gather(*(SessionClient.open(args.url, hello=hello, open_timeout=30)
                                    for _ in range(args.users)), return_exceptions=True)
    refused = [r for r in opened if isinstance(r, SessionRefused)]
    clients = [c for c in opened if isinstance(c, SessionClient)]
    failed = [r for r in opened if isinstance(r, BaseException) and r not in refused]
    if refused or failed:  # admission control said no: a result, not a crash
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
        if failed and not refused:
            raise failed[0]
        return {"users": args.users, "speaking": args.speaking, "refused": len(refused),
                "reason": str(refused[0]),
                "other_failures": [f"{type(r).__name__}: {r}" for r in failed][:5]}
    rng = np.random.default_rng(args.seed)
    start = time.monotonic()
    stop = start + args.settle + args.duration
    turns: list[TurnRecord] = []
    tasks = [asyncio.create_task(speaker(c, np.random.default_rng(rng.integers(1 << 30)), stop,
                                         turns))
             for c in clients[: args.speaking]]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    end = time.monotonic()
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    window = (start + args.settle, stop)
    speaking_gaps = [g for c in clients[: args.speaking] for g in gaps(c, *window)]
    idle_gaps = [g for c in clients[args.speaking :] for g in gaps(c, *window)]
    closes = [c.record.close_code for c in clients if c.record.close_code is not None]
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()
    ttffs = [t.ttff_s for t in turns]
    own = sum(t.frames for t in turns)
    held = sum(t.held for t in turns)
    return {
        "users": args.users, "speaking": args.speaking, "turns": len(turns),
        "window_s": args.duration, "run_s": end - start,
        "ttff_s": ttffs, "ttff_p50_s": pct(ttffs, 50), "ttff_p95_s": pct(ttffs, 95),
        "gap_p50_s": pct(speaking_gaps, 50), "gap_p95_s": pct(speaking_gaps, 95),
        "gap_p99_s": pct(speaking_gaps, 99), "gap_max_s": max(speaking_gaps, default=np.nan),
        "idle_gap_p95_s": pct(idle_gaps, 95),
        "turn_frames": own, "held_frames": held,
        "held_share": held / (own + held) if own + held else float("nan"),
        "errors": errors[:5], "error_count": len(errors), "closed_early": closes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--speaking", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--codec", default="h264")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # the users' CPU stays low

        runner = uvloop.run
    print(json.dumps(runner(run(args))), flush=True)


if __name__ == "__main__":
    main()
