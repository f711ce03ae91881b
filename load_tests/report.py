"""From a finished run to numbers: aggregates, windows, time series, SLO checks,
the JSON report and the printed summary. Pure functions of the collected data.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from load_tests.server_metrics import ServerSample, cpu_percent, histogram_quantile
from load_tests.stats import ClientSeries, UserStats

SCHEMA = 1
LATENCIES = (  # report key, UserStats attribute, label in the summary
    ("connect_to_ready_s", "connect_s", "connect to ready"),
    ("resume_to_ready_s", "resume_s", "resume to ready"),
    ("ttff_s", "ttff_s", "time to first frame"),
    ("gap_s", "gap_s", "inter-frame gap"),
    ("interrupt_ack_s", "interrupt_ack_s", "interrupt to turn.done"),
    ("interrupt_to_idle_s", "interrupt_idle_s", "interrupt to idle video"),
)
SLO_KEYS = {"ttff_p95_s": ("ttff_s", 95), "gap_p95_s": ("gap_s", 95)}


def summary(values: Iterable[float] | np.ndarray) -> dict[str, float | int]:
    v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
    if not len(v):
        return {"count": 0, "mean": math.nan, "p50": math.nan, "p95": math.nan,
                "p99": math.nan, "max": math.nan}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"count": int(len(v)), "mean": float(v.mean()), "p50": float(p50),
            "p95": float(p95), "p99": float(p99), "max": float(v.max())}


def _series(users: Sequence[UserStats], attr: str, start: float, end: float) -> np.ndarray:
    parts = [getattr(u, attr).values(start, end) for u in users]
    return np.concatenate(parts) if parts else np.zeros(0)


def aggregate(users: Sequence[UserStats], start: float = -math.inf,
              end: float = math.inf) -> dict[str, Any]:
    """Latency summaries of samples in [start, end), and totals (totals are whole-run)."""
    out: dict[str, Any] = {key: summary(_series(users, attr, start, end))
                           for key, attr, _ in LATENCIES}
    jitter = [np.frombuffer(u.jitter_s) for u in users]
    av = [np.abs(np.frombuffer(u.av_offset_s)) for u in users]
    out["pts_jitter_s"] = summary(np.concatenate(jitter) if jitter else np.zeros(0))
    out["av_offset_abs_s"] = summary(np.concatenate(av) if av else np.zeros(0))
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    tiers: Counter[int] = Counter()
    closes: Counter[int] = Counter()
    for u in users:
        counts.update(u.counts)
        errors.update(u.errors)
        tiers.update(u.tiers)
        closes.update(u.close_codes)
    video = counts["video_frames"]
    out["frames"] = {
        "video": video, "audio": counts["audio_frames"], "keyframes": counts["keyframes"],
        "video_mb": counts["video_bytes"] / 2**20,
        "late": counts["late_frames"], "late_share": counts["late_frames"] / video if video
        else 0.0, "dropped": counts["dropped_frames"], "seq_gaps": counts["seq_gaps"],
        "unpaired_av": counts["unpaired_av"], "decoded": counts["decoded"],
        "decode_skipped": counts["decode_skipped"], "by_tier": dict(sorted(tiers.items())),
    }
    out["turns"] = {k: counts[f"turns_{k}"] for k in
                    ("sent", "completed", "interrupted", "cut_at_end")}
    out["turns"]["interrupts_sent"] = counts["interrupts_sent"]
    out["sessions"] = {
        "users": len(users), "connections": counts["connections"],
        "drops": counts["drops"], "resumed": counts["resumed"],
        "resume_refused": counts["resume_refused"], "bye_failed": counts["bye_failed"],
        "connected_s": sum(u.connected_s for u in users),
        "close_codes": {str(k): v for k, v in sorted(closes.items())},
    }
    out["tier_changes"] = counts["tier_changes"] + counts["tier_messages"]
    out["errors"] = dict(sorted(errors.items()))
    return out


def user_entry(u: UserStats) -> dict[str, Any]:
    agg = aggregate([u])
    return {"user": u.user, **{k: agg[k] for k in ("connect_to_ready_s", "ttff_s", "gap_s",
                                                   "interrupt_to_idle_s", "frames", "turns",
                                                   "sessions", "tier_changes", "errors")}}


def _in(samples: Sequence[ServerSample], start: float, end: float) -> list[ServerSample]:
    return [s for s in samples if start - 1e-6 <= s.t <= end + 1e-6]


def window(users: Sequence[UserStats], server: Sequence[ServerSample], client: ClientSeries,
           start: float, end: float) -> dict[str, Any]:
    """What SLOs and capacity steps look at: samples in [start, end)."""
    ttff = _series(users, "ttff_s", start, end)
    gap = _series(users, "gap_s", start, end)
    inside = _in(server, start, end)
    first, last = (inside[0], inside[-1]) if len(inside) >= 2 else (None, None)
    errors = sum(1 for u in users for t, _ in u.error_log if start <= t < end)
    lag = client.loop_lag.values(start, end)
    server_cpu = cpu_percent(first, last) if first and last else math.nan
    client_cpu = _mean(client.cpu.values(start, end + 1e-6))
    machine_cpu = _mean(client.machine_cpu.values(start, end + 1e-6))
    return {
        "start_s": start, "end_s": end,
        "users_connected": _mean(client.connected.values(start, end + 1e-6)),
        "ttff_count": int(len(ttff)), "ttff_p50_s": _pct(ttff, 50), "ttff_p95_s": _pct(ttff, 95),
        "gap_count": int(len(gap)), "gap_p50_s": _pct(gap, 50), "gap_p95_s": _pct(gap, 95),
        "server_cpu_percent": server_cpu,
        "server_rss_mb": last.rss_bytes / 2**20 if last else math.nan,
        "server_ttff_p95_s": histogram_quantile(0.95, first.ttff, last.ttff)
        if first and last else math.nan,
        "server_gap_p95_s": histogram_quantile(0.95, first.gap, last.gap)
        if first and last else math.nan,
        "client_cpu_percent": client_cpu,
        # Meaningful when the server runs on this machine: work that competed for its cores.
        "other_cpu_percent": machine_cpu - server_cpu - client_cpu,
        "client_loop_lag_p95_s": _pct(lag, 95),
        "errors": errors,
    }


def timeseries(users: Sequence[UserStats], server: Sequence[ServerSample], client: ClientSeries,
               end: float) -> dict[str, Any]:
    width = max(1.0, math.ceil(end / 60))
    rows = [window(users, server, client, t, t + width)
            for t in np.arange(0.0, end, width)]
    keys = ("ttff_p50_s", "ttff_p95_s", "gap_p50_s", "gap_p95_s", "errors")
    out: dict[str, Any] = {"window_s": width, "t_s": [r["start_s"] + width / 2 for r in rows]}
    out.update({k: [r[k] for r in rows] for k in keys})
    out["server"] = {"t_s": [s.t for s in server],
                     "active_sessions": [s.active_sessions for s in server],
                     "rss_mb": [s.rss_bytes / 2**20 for s in server],
                     "cpu_percent": [math.nan] + [
                         cpu_percent(a, b) for a, b in zip(server, server[1:], strict=False)]}
    out["client"] = {"t_s": list(client.connected.t), "connected": list(client.connected.v),
                     "cpu_percent": [math.nan, *client.cpu.v],
                     "machine_cpu_percent": [math.nan, *client.machine_cpu.v]}
    log = sorted((t, code) for u in users for t, code in u.error_log)
    out["error_log"] = [[t, code] for t, code in log]
    return out


def evaluate_slos(limits: dict[str, float], measured: dict[str, Any]) -> dict[str, Any]:
    """Each limit against the overall p95 it names; no samples fails the check."""
    checks = []
    for name, limit in limits.items():
        key, q = SLO_KEYS[name]
        value = measured[key][f"p{q}"]
        ok = value is not None and not math.isnan(value) and value <= limit
        checks.append({"name": name, "limit": limit, "value": value, "passed": bool(ok)})
    return {"checks": checks, "passed": all(c["passed"] for c in checks)}


def machine() -> dict[str, Any]:
    from bench.machine import describe

    return {"description": describe(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0]}


def jsonable(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.integer | np.floating):
        return jsonable(value.item())
    return value


def _pct(v: np.ndarray, q: float) -> float:
    return float(np.percentile(v, q)) if len(v) else math.nan


def _mean(v: np.ndarray) -> float:
    return float(v.mean()) if len(v) else math.nan


# --- the printed summary -----------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.1f}"


def format_summary(report: dict[str, Any]) -> str:
    cfg, o = report["config"], report["overall"]
    lines = [f"load test ({report['mode']}): {cfg['users']} users, {cfg['duration_s']:g} s, "
             f"{cfg['url']}  [speech: {report['speech']}, decode: {cfg['decode']}]"
             + (f"  CUT SHORT after {report['measured_s']:.0f} s" if report["cut_short"]
                else ""),
             f"{'latency (ms)':<26}{'count':>7}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}"]
    rows = [(label, key) for key, _, label in LATENCIES]
    rows += [("pts jitter", "pts_jitter_s"), ("|A/V offset|", "av_offset_abs_s")]
    for label, key in rows:
        s = o[key]
        lines.append(f"{label:<26}{s['count']:>7}{_ms(s['p50']):>9}{_ms(s['p95']):>9}"
                     f"{_ms(s['p99']):>9}{_ms(s['max']):>9}")
    t, f, se = o["turns"], o["frames"], o["sessions"]
    lines.append(f"turns: {t['sent']} sent, {t['completed']} completed, {t['interrupted']} "
                 f"interrupted, {t['cut_at_end']} cut at the end")
    lines.append(f"sessions: {se['connections']} connections, {se['drops']} drops, "
                 f"{se['resumed']} resumed, {se['resume_refused']} resume refused")
    lines.append(f"frames: {f['video']} video, {f['audio']} audio, {f['late']} late "
                 f"({100 * f['late_share']:.2f}%), {f['dropped']} dropped by the server, "
                 f"{f['decoded']} decoded, {f['decode_skipped']} decode skipped")
    errors = ", ".join(f"{k} {v}" for k, v in o["errors"].items()) or "none"
    lines.append(f"tier changes: {o['tier_changes']}; errors: {errors}")
    c, sv = report["client"], report["server"]
    lines.append(f"client: {_num(c['cpu_percent_mean'])}% of one core, event-loop lag p95 "
                 f"{_ms(c['loop_lag_s']['p95'])} ms; this machine, every process: "
                 f"{_num(c['machine_cpu_percent_mean'])}% of one core")
    if sv["samples"]:
        lines.append(f"server: {_num(sv['cpu_percent_mean'])}% of one core, RSS "
                     f"{_num(sv['rss_mb']['start'])} -> {_num(sv['rss_mb']['end'])} MB "
                     f"(max {_num(sv['rss_mb']['max'])}); its own view: ttff p95 "
                     f"{_ms(sv['view']['ttff_p95_s'])} ms, gap p95 "
                     f"{_ms(sv['view']['gap_p95_s'])} ms")
    else:
        lines.append(f"server: /metrics not reachable at {sv['metrics_url']}")
    soak = report.get("soak")
    if soak is not None:
        slope = soak["rss_slope_mb_per_min"]
        verdict = "FLAGGED" if soak["flagged"] else "ok"
        lines.append(
            f"soak: RSS slope after {soak['warmup_s']:g} s "
            f"{'n/a' if slope is None else f'{slope:.1f}'} MB/min (limit "
            f"{soak['max_rss_growth_mb_per_min']:g}), sessions left after the run "
            f"{_num(soak['sessions_left_after_run'])}  {verdict}"
            + (f" ({soak['note']})" if soak["note"] else ""))
    for check in report["slo"]["checks"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        lines.append(f"SLO {check['name']} <= {check['limit']:g} s: measured "
                     f"{_ms(check['value'])} ms  {verdict}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"
