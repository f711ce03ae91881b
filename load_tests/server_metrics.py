"""The server's side: `/metrics` samples (RSS, CPU, sessions, latency histograms),
histogram quantiles over a window, and memory growth for soak runs.

Parsing and analysis are pure; `scrape` is the one blocking call (run it in
a thread). CPU and RSS come from the server's own process collector, so no
PID is needed and a remote server works the same.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending


@dataclass(frozen=True, slots=True)
class ServerSample:
    t: float  # seconds from the run start
    rss_bytes: float
    cpu_seconds: float
    active_sessions: float
    open_fds: float
    ttff: Buckets  # avatar_time_to_first_frame_seconds
    gap: Buckets  # avatar_inter_frame_interval_seconds


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
    return body.decode()


def parse_metrics(text: str, t: float) -> ServerSample:
    values: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {"ttff": [], "gap": []}
    names = {"avatar_time_to_first_frame_seconds_bucket": "ttff",
             "avatar_inter_frame_interval_seconds_bucket": "gap"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                buckets[names[sample.name]].append((float(sample.labels["le"]), sample.value))
            elif not sample.labels:
                values[sample.name] = sample.value
    return ServerSample(
        t=t,
        rss_bytes=values.get("process_resident_memory_bytes", math.nan),
        cpu_seconds=values.get("process_cpu_seconds_total", math.nan),
        active_sessions=values.get("avatar_active_sessions", math.nan),
        open_fds=values.get("process_open_fds", math.nan),
        ttff=tuple(sorted(buckets["ttff"])),
        gap=tuple(sorted(buckets["gap"])),
    )


def cpu_percent(a: ServerSample, b: ServerSample) -> float:
    """CPU used between two samples, in percent of one core (200 = two cores busy)."""
    if b.t <= a.t:
        return math.nan
    return 100.0 * (b.cpu_seconds - a.cpu_seconds) / (b.t - a.t)


def histogram_quantile(q: float, start: Buckets, end: Buckets) -> float:
    """Prometheus-style quantile of the observations made between two scrapes
    (linear inside the bucket; NaN without observations; the highest finite
    bound when it falls in +Inf)."""
    if not end or len(start) not in (0, len(end)):
        return math.nan
    base = [c for _, c in start] if start else [0.0] * len(end)
    counts = [c - b for (_, c), b in zip(end, base, strict=True)]
    total = counts[-1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for (bound, _), cum in zip(end, counts, strict=True):
        if cum >= rank:
            if math.isinf(bound):
                return lower
            inside = cum - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cum
    return lower


@dataclass(frozen=True, slots=True)
class Growth:
    slope_mb_per_min: float  # least-squares slope of RSS after the warm-up
    start_mb: float  # median of the first third of the samples after the warm-up
    end_mb: float  # median of the last third
    flagged: bool


def rss_growth(samples: list[ServerSample], *, warmup_s: float, limit_mb_per_min: float,
               min_growth_mb: float = 16.0) -> Growth | None:
    """Memory growth after the warm-up. RSS of a busy server swings by a hundred MB
    from sample to sample (frames allocated and freed), so growth is flagged only when
    the least-squares slope is above the limit and the median of the last third of the
    samples is above that of the first third by more than `min_growth_mb`."""
    pts = [(s.t, s.rss_bytes / 2**20) for s in samples
           if s.t >= warmup_s and not math.isnan(s.rss_bytes)]
    if len(pts) < 6:
        return None
    t, mb = np.array(pts).T
    slope = float(np.polyfit(t / 60.0, mb, 1)[0])
    third = len(mb) // 3
    first, last = float(np.median(mb[:third])), float(np.median(mb[-third:]))
    flagged = slope > limit_mb_per_min and last - first > min_growth_mb
    return Growth(slope, first, last, bool(flagged))
