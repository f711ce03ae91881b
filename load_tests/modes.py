"""The three ways to drive a `LoadRun` and the report each one writes.

- run: hold `users` for `duration`, check the SLOs over the whole run.
- soak: the same, then judge the server's memory growth and leftover sessions.
- capacity: start at `users`, add `step` users every `duration` seconds until
  an SLO breaks (confirmed once) or `max_users`; the knee is the last count held.
"""

from __future__ import annotations

import asyncio
import datetime
import math
from dataclasses import dataclass
from typing import Any, Literal

from load_tests.capacity import CapacitySearch
from load_tests.config import LoadConfig, SloLimits
from load_tests.report import (
    SCHEMA,
    aggregate,
    evaluate_slos,
    jsonable,
    machine,
    summary,
    timeseries,
    user_entry,
    window,
)
from load_tests.runner import LoadRun
from load_tests.server_metrics import (
    cpu_percent,
    histogram_quantile,
    parse_metrics,
    rss_growth,
    scrape,
)
from load_tests.speech import SpeechBank

Mode = Literal["run", "soak", "capacity"]
CAPACITY_SLOS = SloLimits(ttff_p95_s=2.0, gap_p95_s=0.1)  # when none is given


@dataclass(frozen=True, slots=True)
class ModeOptions:
    mode: Mode = "run"
    slo: SloLimits = SloLimits()
    step: int = 2  # capacity: users added per step
    max_users: int = 40  # capacity: stop here
    settle_share: float = 0.25  # capacity: start of each step left out (users joining)
    max_rss_growth_mb_per_min: float = 5.0  # soak
    # soak: RSS before this is warm-up, not growth (None: the first half of the run). The
    # avatar's frames are memory-mapped, so RSS climbs while sessions first visit them.
    soak_warmup_s: float | None = None


class NoSessions(Exception):
    """No simulated user could open a session: the numbers would mean nothing."""


async def execute(cfg: LoadConfig, bank: SpeechBank, opts: ModeOptions
                  ) -> tuple[dict[str, Any], bool]:
    """Run the mode; returns the report and whether every check passed."""
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    host = machine()
    run = LoadRun(cfg, bank)
    await run.start()
    extra: dict[str, Any] = {}
    search: CapacitySearch | None = None
    try:
        if opts.mode == "capacity":
            search = await _capacity(run, opts)
        else:
            run.spawn(cfg.users)
            await run.hold(cfg.duration_s)
    finally:
        end = run.now()
        await run.finish()
    users = [u.stats for u in run.users]
    if not any(u.counts["connections"] for u in users):
        errors = aggregate(users)["errors"]
        raise NoSessions(f"no simulated user could open a session at {cfg.url} "
                         f"(errors: {errors or 'none'})")
    overall = aggregate(users, end=end)
    passed = True
    slo: dict[str, Any] = {"checks": [], "passed": True}
    if search is not None:
        extra["capacity"] = search.summary()
    else:
        slo = evaluate_slos(opts.slo.given(), overall)
        passed = slo["passed"]
    if opts.mode == "soak":
        extra["soak"] = await _soak_verdict(run, opts, end)
        passed = passed and not extra["soak"]["flagged"]
    report = {
        "tool": "load_tests", "schema": SCHEMA, "mode": opts.mode, "started_at": started_at,
        "wall_s": run.now(), "measured_s": end, "cut_short": run.cut_short.is_set(),
        "machine": host, "speech": bank.source,
        "config": _config(cfg, opts), "overall": overall,
        "users": [user_entry(u) for u in users],
        "client": _client(run, end), "server": _server(run, end),
        "timeseries": timeseries(users, run.server, run.series, end),
        "slo": slo, **extra,
    }
    return jsonable(report), passed


async def _capacity(run: LoadRun, opts: ModeOptions) -> CapacitySearch:
    limits = opts.slo.given() or CAPACITY_SLOS.given()
    search = CapacitySearch(start=run.cfg.users, step=opts.step, max_users=opts.max_users,
                            limits=limits)
    held = 0
    while (users := search.next_users()) is not None:
        run.spawn(users - held)
        held = users
        start = run.now()
        if not await run.hold(run.cfg.duration_s):
            print(f"  {users:>3} users: cut short, not judged", flush=True)
            break
        w = window([u.stats for u in run.users], run.server, run.series,
                   start + opts.settle_share * run.cfg.duration_s, run.now())
        result = search.record(users, w)
        verdict = "held" if result.passed else "BROKE: " + "; ".join(result.failures)
        print(f"  {users:>3} users: ttff p95 {_s(w['ttff_p95_s'])}, gap p95 "
              f"{_s(w['gap_p95_s'])}, server cpu {_pc(w['server_cpu_percent'])}, client cpu "
              f"{_pc(w['client_cpu_percent'])}, other {_pc(w['other_cpu_percent'])}  "
              f"{verdict}", flush=True)
    return search


async def _soak_verdict(run: LoadRun, opts: ModeOptions, end: float) -> dict[str, Any]:
    """RSS growth between the warm-up and the end of the load (memory given back as
    users leave would hide a leak), and sessions still open once every user left."""
    during = [s for s in run.server if s.t <= end]
    left = math.nan
    for _ in range(20):  # the server notices closed connections within moments
        try:
            sample = parse_metrics(await asyncio.to_thread(scrape, run.cfg.metrics_url),
                                   run.now())
        except OSError:
            break
        run.server.append(sample)
        left = sample.active_sessions
        if left == 0:
            break
        await asyncio.sleep(0.5)
    warmup = opts.soak_warmup_s if opts.soak_warmup_s is not None else run.cfg.duration_s / 2
    growth = rss_growth(during, warmup_s=warmup,
                        limit_mb_per_min=opts.max_rss_growth_mb_per_min)
    leaked = not math.isnan(left) and left > 0
    return {
        "max_rss_growth_mb_per_min": opts.max_rss_growth_mb_per_min,
        "warmup_s": warmup,
        "rss_slope_mb_per_min": growth.slope_mb_per_min if growth else None,
        "rss_median_first_last_third_mb": [growth.start_mb, growth.end_mb] if growth
        else None,
        "rss_growth_flagged": bool(growth and growth.flagged),
        "sessions_left_after_run": left,
        "flagged": bool(growth and growth.flagged) or leaked,
        "note": None if growth else "too few /metrics samples after the warm-up to judge",
    }


def _config(cfg: LoadConfig, opts: ModeOptions) -> dict[str, Any]:
    p = cfg.persona
    return {
        "url": cfg.url, "metrics_url": cfg.metrics_url, "users": cfg.users,
        "duration_s": cfg.duration_s, "spawn_rate": cfg.spawn_rate, "barge_in": p.barge_in,
        "reconnect": p.reconnect, "decode": cfg.decode, "codec": cfg.codec,
        "max_height": cfg.max_height, "audio_rate": cfg.audio_rate, "seed": cfg.seed,
        "turn_median_s": p.turn_median_s, "turn_max_s": p.turn_max_s,
        "think_median_s": p.think_median_s, "playout_buffer_s": cfg.playout_buffer_s,
        "slo": opts.slo.given(), "step": opts.step, "max_users": opts.max_users,
    }


def _client(run: LoadRun, end: float) -> dict[str, Any]:
    cpu = run.series.cpu.values()
    machine = run.series.machine_cpu.values()
    return {
        "decode": run.cfg.decode,
        "cpu_percent_mean": float(cpu.mean()) if len(cpu) else math.nan,
        "cpu_percent_max": float(cpu.max()) if len(cpu) else math.nan,
        "machine_cpu_percent_mean": float(machine.mean()) if len(machine) else math.nan,
        "loop_lag_s": summary(run.series.loop_lag.values(end=end)),
        "note": "client CPU is this process (users, decode thread), machine CPU every "
                "process on the client's machine, both in percent of one core; loop lag is "
                "how late the client's event loop woke up, which delays arrival timestamps "
                "by as much",
    }


def _server(run: LoadRun, end: float) -> dict[str, Any]:
    samples = run.server
    rss = [s.rss_bytes / 2**20 for s in samples]
    during = [s for s in samples if s.t <= end + 1e-6]
    view: dict[str, float] = {"ttff_p95_s": math.nan, "gap_p95_s": math.nan}
    cpu = math.nan
    if len(during) >= 2:
        a, b = during[0], during[-1]
        cpu = cpu_percent(a, b)
        view = {"ttff_p95_s": histogram_quantile(0.95, a.ttff, b.ttff),
                "gap_p95_s": histogram_quantile(0.95, a.gap, b.gap)}
    return {
        "metrics_url": run.cfg.metrics_url, "scrape_errors": run.metrics_errors,
        "samples": [[s.t, s.rss_bytes, s.cpu_seconds, s.active_sessions, s.open_fds]
                    for s in samples],
        "sample_fields": ["t_s", "rss_bytes", "cpu_seconds", "active_sessions", "open_fds"],
        "cpu_percent_mean": cpu,
        "rss_mb": {"start": rss[0] if rss else math.nan, "max": max(rss, default=math.nan),
                   "end": rss[-1] if rss else math.nan},
        "view": view,
    }


def _s(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1000:.0f} ms"


def _pc(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0f}%"
