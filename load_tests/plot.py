"""The report's PNG: stacked time panels (latency percentiles, sessions, CPU, errors).

Drawn with OpenCV, which the server already depends on, so the load tester
needs no plotting package; the panels are plain line charts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

WIDTH, PANEL_H, TOP, LEFT, RIGHT = 1200, 220, 50, 80, 200
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, LIGHT = (20, 20, 20), (150, 150, 150), (225, 225, 225)
COLORS = [(200, 90, 30), (40, 40, 200), (40, 150, 40), (160, 40, 160), (0, 140, 210),
          (120, 120, 0)]  # BGR

Line = tuple[str, Sequence[float], Sequence[float | None]]  # label, x, y


def write_plot(report: dict[str, Any], path: Path) -> None:
    ts = report["timeseries"]
    t = ts["t_s"]
    sv, cl = ts["server"], ts["client"]
    slo = report["config"]["slo"]
    caps = report.get("capacity")
    if caps is not None:
        slo = caps["limits"]
    errors = _cumulative_errors(ts["error_log"], report["wall_s"])
    gap_slo = slo.get("gap_p95_s")
    # name, lines, SLO line, smallest y range
    panels: list[tuple[str, list[Line], float | None, float]] = [
        ("time to first frame (s), per window",
         [("p50", t, ts["ttff_p50_s"]), ("p95", t, ts["ttff_p95_s"])], slo.get("ttff_p95_s"),
         0.5),
        ("inter-frame gap (ms), per window",
         [("p50", t, _scale(ts["gap_p50_s"], 1000)), ("p95", t, _scale(ts["gap_p95_s"], 1000))],
         gap_slo * 1000 if gap_slo else None, 50.0),
        ("sessions",
         [("client connected", cl["t_s"], cl["connected"]),
          ("server active", sv["t_s"], sv["active_sessions"])], None, 1.0),
        ("CPU (% of one core)",
         [("server", sv["t_s"], sv["cpu_percent"]), ("client", cl["t_s"], cl["cpu_percent"]),
          ("machine (all)", cl["t_s"], cl["machine_cpu_percent"])], None, 10.0),
        ("errors (cumulative)", errors, None, 1.0),
    ]
    height = TOP + PANEL_H * len(panels) + 40
    img = np.full((height, WIDTH, 3), 255, np.uint8)  # (H, W, 3) BGR
    cfg = report["config"]
    title = (f"load test ({report['mode']}): {cfg['users']} users, {cfg['duration_s']:g} s, "
             f"{cfg['url']}  started {report['started_at']}")
    cv2.putText(img, title, (LEFT, 30), FONT, 0.55, BLACK, 1, cv2.LINE_AA)
    x_max = max(float(report["wall_s"]), 1.0)
    steps = [(s["start_s"], s["users"]) for s in caps["steps"]] if caps else []
    for i, (name, lines, limit, floor) in enumerate(panels):
        y0 = TOP + i * PANEL_H
        _panel(img, (LEFT, y0 + 20, WIDTH - RIGHT, y0 + PANEL_H - 30), name, lines, limit,
               floor, x_max, steps, last=i == len(panels) - 1)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write the plot to {path}")


def _panel(img: np.ndarray, box: tuple[int, int, int, int], name: str, lines: list[Line],
           limit: float | None, floor: float, x_max: float, steps: list[tuple[float, int]],
           last: bool) -> None:
    x0, y0, x1, y1 = box
    values = [float(v) for _, _, ys in lines for v in ys if v is not None and _ok(v)]
    top = max([*values, limit or 0.0, floor]) * 1.05
    y_step = _nice_step(top, 4)
    y_max = y_step * math.ceil(top / y_step)
    x_step = _nice_step(x_max, 8)
    cv2.putText(img, name, (x0, y0 - 6), FONT, 0.5, BLACK, 1, cv2.LINE_AA)

    def px(x: float, y: float) -> tuple[int, int]:
        return (int(x0 + (x1 - x0) * min(x, x_max) / x_max),
                int(y1 - (y1 - y0) * min(y, y_max) / y_max))

    for k in range(round(y_max / y_step) + 1):
        y = px(0, k * y_step)[1]
        cv2.line(img, (x0, y), (x1, y), LIGHT, 1)
        cv2.putText(img, _tick(k * y_step), (8, y + 4), FONT, 0.4, GREY, 1, cv2.LINE_AA)
    for k in range(int(x_max / x_step) + 1):
        x = px(k * x_step, 0)[0]
        cv2.line(img, (x, y1), (x, y1 + 4), GREY, 1)
        cv2.putText(img, _tick(k * x_step), (x - 8, y1 + 18), FONT, 0.4, GREY, 1, cv2.LINE_AA)
    if last:
        cv2.putText(img, "seconds", (x1 - 60, y1 + 34), FONT, 0.4, GREY, 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), GREY, 1)
    for start, users in steps:
        x = px(start, 0)[0]
        cv2.line(img, (x, y0), (x, y1), LIGHT, 1)
        cv2.putText(img, str(users), (x + 2, y0 + 12), FONT, 0.35, GREY, 1, cv2.LINE_AA)
    if limit is not None:
        y = px(0, limit)[1]
        cv2.line(img, (x0, y), (x1, y), (0, 0, 230), 1, cv2.LINE_AA)
        cv2.putText(img, f"SLO {_tick(limit)}", (x0 + 4, y - 4), FONT, 0.4, (0, 0, 230), 1,
                    cv2.LINE_AA)
    for j, (label, xs, ys) in enumerate(lines):
        color = COLORS[j % len(COLORS)]
        run: list[tuple[int, int]] = []
        for vx, vy in [*zip(xs, ys, strict=True), (math.nan, None)]:
            if vy is not None and _ok(vy) and _ok(vx):
                run.append(px(float(vx), float(vy)))
                continue
            if len(run) == 1:
                cv2.circle(img, run[0], 3, color, -1, cv2.LINE_AA)
            elif run:
                cv2.polylines(img, [np.array(run, np.int32)], False, color, 2, cv2.LINE_AA)
            run = []
        cv2.putText(img, label, (x1 + 10, y0 + 18 + 18 * j), FONT, 0.45, color, 1, cv2.LINE_AA)


def _nice_step(span: float, ticks: int) -> float:
    """1, 2 or 5 times a power of ten, giving at most `ticks` intervals over `span`."""
    raw = span / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _cumulative_errors(log: list[list[Any]], end: float) -> list[Line]:
    """One step line per error code (the four most frequent), from 0 to `end`."""
    if not log:
        return [("none", [0.0, end], [0.0, 0.0])]
    codes: dict[str, list[float]] = {}
    for t, code in log:
        codes.setdefault(code, []).append(float(t))
    top = sorted(codes, key=lambda c: -len(codes[c]))[:4]
    lines: list[Line] = []
    for code in top:
        xs, ys = [0.0], [0.0]
        for n, t in enumerate(sorted(codes[code]), 1):
            xs += [t, t]
            ys += [n - 1.0, float(n)]
        xs.append(end)
        ys.append(ys[-1])
        lines.append((f"{code} ({len(codes[code])})", xs, ys))
    return lines


def _scale(values: Sequence[float | None], k: float) -> list[float | None]:
    return [v * k if _ok(v) else None for v in values]  # type: ignore[operator]


def _ok(v: Any) -> bool:
    return isinstance(v, float | int) and math.isfinite(v)


def _tick(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if v else "0"
