"""`python -m load_tests`: simulated conversational users against a running server.

Exit codes: 0 every check passed (or none was asked for), 1 an SLO given on
the command line failed (soak: memory grew or sessions were left open),
2 bad arguments, server not ready, or no session could be opened at all,
130 cut short by Ctrl-C or SIGTERM (the report of the part that ran is written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from load_tests.config import LoadConfig, Persona, SloLimits
from load_tests.modes import CAPACITY_SLOS, Mode, ModeOptions, NoSessions, execute
from load_tests.plot import write_plot
from load_tests.report import format_summary
from load_tests.runner import http_base, wait_ready
from load_tests.speech import SpeechBank

DEFAULT_CACHE = Path("~/.cache/avatar-agent/load-tests/speech")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests",
        description="Simulated conversational users against a running avatar server: a "
                    "JSON report, a PNG plot, a summary, and a non-zero exit when an SLO "
                    "fails.")
    p.add_argument("--url", required=True, help="session URL, ws://HOST:PORT/v1/session")
    p.add_argument("--users", type=int, default=1,
                   help="simulated users (capacity mode: the first step)")
    p.add_argument("--duration", type=float, required=True,
                   help="seconds of load (capacity mode: seconds per step)")
    p.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    p.add_argument("--barge-in", type=float, default=0.1,
                   help="probability that a user interrupts a turn")
    p.add_argument("--reconnect", type=float, default=0.02,
                   help="probability per turn that the connection drops and resumes")
    p.add_argument("--report", type=Path, default=Path("out/load-report.json"),
                   help="JSON report (the plot goes next to it as .png)")
    p.add_argument("--slo-ttff-p95", type=float, metavar="SECONDS",
                   help="fail when time to first frame p95 is above this")
    p.add_argument("--slo-gap-p95", type=float, metavar="SECONDS",
                   help="fail when the inter-frame gap p95 is above this")

    m = p.add_argument_group("modes")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--soak", action="store_true",
                      help="also judge the server's RSS growth and sessions left over")
    mode.add_argument("--capacity", action="store_true",
                      help="ramp users until an SLO breaks; reports the knee (default SLOs: "
                           f"ttff p95 {CAPACITY_SLOS.ttff_p95_s} s, gap p95 "
                           f"{CAPACITY_SLOS.gap_p95_s} s)")
    m.add_argument("--step", type=int, default=2, help="capacity: users added per step")
    m.add_argument("--max-users", type=int, default=40, help="capacity: highest user count")
    m.add_argument("--max-rss-growth", type=float, default=5.0, metavar="MB_PER_MIN",
                   help="soak: RSS growth after the warm-up that counts as a leak")
    m.add_argument("--soak-warmup", type=float, metavar="SECONDS",
                   help="soak: RSS growth before this is warm-up, not a leak "
                        "(default: the first half of the run)")

    u = p.add_argument_group("users")
    u.add_argument("--decode", choices=["all", "keyframes", "none"], default="keyframes",
                   help="video decoded by the client (CPU on the same machine as the server "
                        "when run locally); default: keyframes")
    u.add_argument("--speech", choices=["auto", "espeak", "synthetic"], default="auto",
                   help="auto: espeak-ng speech when installed, else speech-like audio")
    u.add_argument("--speech-cache", type=Path, default=DEFAULT_CACHE,
                   help="where espeak-ng clips are kept")
    u.add_argument("--turn-median", type=float, default=4.0, help="median turn length (s)")
    u.add_argument("--turn-max", type=float, default=15.0, help="longest turn (s)")
    u.add_argument("--think-median", type=float, default=2.5,
                   help="median pause between turns (s)")
    u.add_argument("--codec", choices=["h264", "jpeg"], help="video codec (server default)")
    u.add_argument("--max-height", type=int, help="video height asked for (server default)")
    u.add_argument("--avatar", help="avatar id (server default)")
    u.add_argument("--token", help="API token")
    u.add_argument("--seed", type=int, default=0, help="seed of the users' choices")

    o = p.add_argument_group("measurement")
    o.add_argument("--metrics-url", help="server /metrics (default: from --url)")
    o.add_argument("--sample-interval", type=float, default=2.0,
                   help="seconds between /metrics and client CPU samples")
    o.add_argument("--playout-buffer", type=float, default=0.1, metavar="SECONDS",
                   help="a frame trailing the fastest one by more than this is late")
    o.add_argument("--wait-ready", type=float, default=30.0, metavar="SECONDS",
                   help="wait this long for the server's /readyz before giving up")
    return p


def _configs(args: argparse.Namespace) -> tuple[LoadConfig, ModeOptions]:
    persona = Persona(barge_in=args.barge_in, reconnect=args.reconnect,
                      turn_median_s=args.turn_median, turn_max_s=args.turn_max,
                      think_median_s=args.think_median,
                      think_max_s=max(10.0, args.think_median))
    metrics_url = args.metrics_url or http_base(args.url) + "/metrics"
    cfg = LoadConfig(url=args.url, metrics_url=metrics_url, users=args.users,
                     duration_s=args.duration, spawn_rate=args.spawn_rate, persona=persona,
                     decode=args.decode, codec=args.codec, max_height=args.max_height,
                     avatar=args.avatar, token=args.token, seed=args.seed,
                     playout_buffer_s=args.playout_buffer,
                     sample_interval_s=args.sample_interval)
    mode: Mode = "capacity" if args.capacity else "soak" if args.soak else "run"
    opts = ModeOptions(mode=mode, slo=SloLimits(args.slo_ttff_p95, args.slo_gap_p95),
                       step=args.step, max_users=max(args.max_users, args.users),
                       max_rss_growth_mb_per_min=args.max_rss_growth,
                       soak_warmup_s=args.soak_warmup)
    return cfg, opts


async def _main(args: argparse.Namespace, cfg: LoadConfig, opts: ModeOptions
                ) -> tuple[dict[str, Any], bool]:
    await wait_ready(cfg.url, args.wait_ready)
    bank = await asyncio.to_thread(SpeechBank.build, cfg.audio_rate, args.speech,
                                   args.speech_cache.expanduser(), cfg.seed)
    if opts.mode == "capacity":
        print(f"capacity: {cfg.users} users, +{opts.step} every {cfg.duration_s:g} s up to "
              f"{opts.max_users}, until an SLO breaks", flush=True)
    return await execute(cfg, bank, opts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg, opts = _configs(args)
    except ValueError as exc:
        parser.error(str(exc))
    runner: Any = asyncio.run
    try:
        import uvloop  # the client's CPU is part of the measurement: keep it low

        runner = uvloop.run
    except ImportError:
        pass
    try:
        report, passed = runner(_main(args, cfg, opts))
    except (ConnectionError, NoSessions, ValueError) as exc:
        print(f"load_tests: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    plot = args.report.with_suffix(".png")
    report["plot"] = str(plot)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1))
    write_plot(report, plot)
    print(format_summary(report))
    if "capacity" in report:
        print(format_capacity(report["capacity"]))
    print(f"report: {args.report}  plot: {plot}")
    if report["cut_short"]:
        return 130  # the report covers part of the run: it verifies nothing
    return 0 if passed else 1


def format_capacity(c: dict[str, Any]) -> str:
    lines = [f"{'users':>5}{'ttff p95 ms':>13}{'gap p95 ms':>12}{'server cpu %':>14}"
             f"{'client cpu %':>14}{'other cpu %':>13}{'errors':>8}  verdict"]
    for s in c["steps"]:
        lines.append(f"{s['users']:>5}{_f(s['ttff_p95_s'], 1000):>13}"
                     f"{_f(s['gap_p95_s'], 1000):>12}{_f(s['server_cpu_percent']):>14}"
                     f"{_f(s['client_cpu_percent']):>14}{_f(s['other_cpu_percent']):>13}"
                     f"{s['errors']:>8}  {'held' if s['passed'] else 'broke'}")
    knee = c["knee_users"]
    if knee is None:
        lines.append("capacity: below the first step (an SLO broke at once)")
    elif c["reached_max_users"]:
        lines.append(f"capacity: at least {knee} users (every step held up to --max-users)")
    else:
        lines.append(f"capacity (knee): {knee} users; SLOs broke at {c['broke_at_users']}")
    return "\n".join(lines)


def _f(x: float | None, k: float = 1.0) -> str:
    return "-" if x is None else f"{x * k:.0f}"
