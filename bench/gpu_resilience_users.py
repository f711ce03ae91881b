"""Sessions for bench.gpu_resilience, in their own process: one row of bench.resilience.

    python -m bench.gpu_resilience_users --url ws://127.0.0.1:PORT/v1/session --pid PID \
        --sessions 4 --warmup 4 --duration 12 --capacity-fps 120 [--fault 3,6]

Opens up to `sessions` sessions (stops at the first refusal) that all speak
back-to-back turns streamed at `--tts-speed` x real time, and measures them as
`bench.resilience.measure_row` does (server metrics over HTTP; `--pid` is the
server's process, for its CPU time). Prints `{"event": "window", "t0": T}` as the
measured window opens (monotonic clock, shared with the bench process, which
starts and lifts the fault relative to it), then one JSON line: the row and, with
`--fault AT,FOR` (seconds into the window), what the sessions saw of the fault.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from agent.client import SessionRecord
from bench.resilience import measure_row, pct


def fault_view(records: list[SessionRecord], fault: tuple[float, float], end: float
               ) -> dict[str, Any]:
    """What the sessions saw of a fault over [fault[0], fault[1]] (monotonic), up to `end`:
    gaps and frames per tier during it, each session's tier changes (seconds from the
    fault's start), when each dropped and when each was back at tier 1 after the lift."""
    f0, f1 = fault
    gaps: list[float] = []
    tiers = np.zeros(3)
    events: list[tuple[float, int, int, str]] = []
    dropped: list[float | None] = []
    back: list[float | None] = []
    for i, rec in enumerate(records):
        during = [v for v in rec.video if f0 <= v.arrival <= f1]
        gaps.extend(np.diff([v.arrival for v in during]).tolist())
        for v in during:
            tiers[v.header.tier - 1] += 1
        changes = [(at, int(m["tier"]), str(m.get("reason", ""))) for at, m in rec.messages
                   if m.get("type") == "tier" and f0 <= at <= end]
        events += [(at - f0, i, tier, reason) for at, tier, reason in changes]
        dropped.append(next((at - f0 for at, tier, _ in changes if tier > 1), None))
        last = changes[-1] if changes else None
        back.append(last[0] - f1 if last is not None and last[1] == 1 and last[0] >= f1
                    else None)
    share = tiers / max(tiers.sum(), 1)
    return {
        "gap_p50_s": pct(gaps, 50), "gap_p95_s": pct(gaps, 95),
        "gap_max_s": max(gaps, default=float("nan")),
        "tier_share": [float(x) for x in share],
        "events": sorted(events),
        "dropped_after_s": dropped,  # per session, from the fault's start; None: never
        "back_after_lift_s": back,  # per session, from the lift; None: not at tier 1 by `end`
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    hello = {"video": {"codec": args.codec, "max_height": args.height}}

    def opened(t0: float) -> None:
        print(json.dumps({"event": "window", "t0": t0}), flush=True)

    row, records, (t0, t1) = await measure_row(
        args.label, args.url, args.pid, args.sessions, args.duration, args.warmup,
        args.capacity_fps, args.tts_speed, hello=hello, on_window=opened)
    out: dict[str, Any] = {"row": asdict(row), "window": [t0, t1]}
    if args.fault:
        at, length = (float(x) for x in args.fault.split(","))
        out["fault"] = fault_view(records, (t0 + at, t0 + at + length), t1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True, help="the server's process")
    p.add_argument("--label", default="")
    p.add_argument("--sessions", type=int, required=True)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--capacity-fps", type=float, required=True)
    p.add_argument("--tts-speed", type=float, default=4.0)
    p.add_argument("--codec", default="h264")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--fault", default="", help="AT,FOR: seconds into the window, and length")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
