"""The load tester end to end: its real CLI (`python -m load_tests`) against the real
server on 127.0.0.1 port 0. A 3-user, 10-second smoke checks the report, the plot
and the SLO exit code; a two-step capacity ramp checks the knee logic."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest

from agent.server import AgentServer
from load_tests.report import evaluate_slos
from load_tests.server_metrics import ServerSample, rss_growth
from tests.conftest import REPO, timeout
from tests.serverutil import running_server, small_config

pytestmark = pytest.mark.integration


async def load_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "load_tests", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout(90))
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def sessions_closed(server: AgentServer) -> None:
    for _ in range(int(timeout(5) / 0.05)):
        if not server.sessions:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(server.sessions)} sessions still open after the run")


def finite(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)


async def test_smoke_three_users_ten_seconds(tmp_path: Path) -> None:
    report_path = tmp_path / "out" / "report.json"
    async with running_server(small_config(tmp_path / "avatars")) as server:
        rc, out = await load_cli(
            "--url", server.url, "--users", "3", "--duration", "10", "--spawn-rate", "3",
            "--barge-in", "0.5", "--reconnect", "0.2", "--seed", "3",
            "--speech-cache", str(tmp_path / "speech"), "--report", str(report_path),
            # Impossible (no frame comes back within a microsecond) and generous:
            "--slo-ttff-p95", "0.000001", "--slo-gap-p95", "5")
        await sessions_closed(server)  # every simulated user said bye or was closed
    assert rc == 1, out  # the impossible SLO fails the run; 2 would mean it never ran
    report = json.loads(report_path.read_text())
    assert report["mode"] == "run" and report["schema"] == 1
    assert report["config"]["users"] == 3 and report["config"]["duration_s"] == 10
    assert report["speech"] == ("espeak-ng" if shutil.which("espeak-ng") else "synthetic")
    o = report["overall"]

    sessions = o["sessions"]
    assert sessions["users"] == 3 and len(report["users"]) == 3
    assert o["connect_to_ready_s"]["count"] == 3  # one fresh session each; the rest resume
    assert sessions["connections"] == 3 + o["resume_to_ready_s"]["count"]
    assert 0 < o["connect_to_ready_s"]["p50"] < timeout(5)
    assert sessions["resumed"] + sessions["resume_refused"] == o["resume_to_ready_s"]["count"]

    # 25 fps while connected: every frame slot was received or dropped by the server,
    # plus the catch-up burst of `send_lead` at each connection's start.
    frames = o["frames"]
    slots = 25 * sessions["connected_s"]
    assert 0.6 * slots <= frames["video"] + frames["dropped"] <= slots + 5 * sessions[
        "connections"]
    # Audio is never dropped. The server sends each pts's video before its audio, so a
    # connection's end can cut off one frame's audio from the count, no more.
    assert frames["audio"] >= frames["video"] - sessions["connections"]
    assert frames["keyframes"] >= sessions["connections"]
    assert 0.02 < o["gap_s"]["p50"] < 0.08
    # One gap per frame after each connection's first. Per-user entries count the whole
    # run; "overall" latencies stop at the end of the measured time, and totals don't:
    # frames arriving while the users say bye are counted but their gaps are not.
    whole_run_gaps = sum(u["gap_s"]["count"] for u in report["users"])
    assert whole_run_gaps == frames["video"] - sessions["connections"]
    assert 0.9 * whole_run_gaps <= o["gap_s"]["count"] <= whole_run_gaps
    assert 0 <= frames["late_share"] <= 1
    assert 1 <= frames["decoded"] <= frames["keyframes"]  # --decode keyframes (default)
    assert not any(code.startswith("decode") or code == "internal" for code in o["errors"])

    turns = o["turns"]
    assert turns["sent"] >= 3
    assert turns["completed"] + turns["interrupted"] + turns["cut_at_end"] <= turns["sent"]
    assert 1 <= o["ttff_s"]["count"] <= turns["sent"]
    assert 0 < o["ttff_s"]["p50"] < timeout(5)
    assert o["interrupt_ack_s"]["count"] <= min(turns["interrupted"], turns["interrupts_sent"])
    assert o["interrupt_to_idle_s"]["count"] <= turns["interrupts_sent"]
    assert all(0.0 < x < timeout(5) for x in (o["interrupt_to_idle_s"]["p50"],) if finite(x))
    assert o["pts_jitter_s"]["count"] == whole_run_gaps  # jitter is whole-run too
    assert sum(u["turns"]["sent"] for u in report["users"]) == turns["sent"]

    ttff, gap = report["slo"]["checks"]
    assert (ttff["name"], ttff["passed"], ttff["value"]) == ("ttff_p95_s", False,
                                                             o["ttff_s"]["p95"])
    assert (gap["name"], gap["passed"], gap["value"]) == ("gap_p95_s", True, o["gap_s"]["p95"])
    assert report["slo"]["passed"] is False
    # The same numbers under limits they meet pass: the exit code follows the limits.
    met = {"ttff_p95_s": o["ttff_s"]["p95"], "gap_p95_s": o["gap_s"]["p95"]}
    assert evaluate_slos(met, o)["passed"] is True
    assert evaluate_slos({"gap_p95_s": o["gap_s"]["p95"] / 2}, o)["passed"] is False

    server_part = report["server"]
    assert len(server_part["samples"]) >= 3 and server_part["scrape_errors"] == 0
    assert all(s[1] > 0 for s in server_part["samples"])  # RSS from /metrics
    assert finite(server_part["cpu_percent_mean"]) and server_part["cpu_percent_mean"] > 0
    assert finite(report["client"]["cpu_percent_mean"])
    ts = report["timeseries"]
    assert len(ts["t_s"]) == len(ts["gap_p95_s"]) == len(ts["ttff_p95_s"]) >= 5
    assert len(ts["client"]["t_s"]) == len(ts["client"]["cpu_percent"])
    assert max(ts["client"]["connected"]) <= 3

    plot = cv2.imread(report["plot"])
    assert plot is not None and plot.shape[1] == 1200
    assert "time to first frame" in out and "FAIL" in out


async def test_capacity_ramp_stops_when_an_slo_breaks(tmp_path: Path) -> None:
    report_path = tmp_path / "capacity.json"
    async with running_server(small_config(tmp_path / "avatars")) as server:
        rc, out = await load_cli(
            "--url", server.url, "--capacity", "--users", "1", "--step", "1",
            "--max-users", "3", "--duration", "3", "--speech", "synthetic",
            "--slo-gap-p95", "0.000001", "--sample-interval", "1", "--report",
            str(report_path))
    assert rc == 0, out
    cap = json.loads(report_path.read_text())["capacity"]
    # Broke at the first step, held once more to confirm, then stopped.
    assert [s["users"] for s in cap["steps"]] == [1, 1]
    assert not any(s["passed"] for s in cap["steps"])
    assert cap["knee_users"] is None and cap["broke_at_users"] == 1
    assert all(s["gap_count"] > 0 and finite(s["server_cpu_percent"]) for s in cap["steps"])
    assert "below the first step" in out


async def test_usage_errors_and_an_unreachable_server_exit_2(tmp_path: Path) -> None:
    rc, out = await load_cli("--url", "ws://127.0.0.1:9/v1/session", "--duration", "1",
                             "--barge-in", "2")
    assert rc == 2 and "barge_in=2" in out
    rc, out = await load_cli("--url", "ws://127.0.0.1:9/v1/session", "--duration", "1",
                             "--wait-ready", "0", "--report", str(tmp_path / "r.json"))
    assert rc == 2 and "not ready" in out
    assert not (tmp_path / "r.json").exists()


def test_soak_flags_steady_rss_growth_only() -> None:
    def samples(mb_per_min: float) -> list[ServerSample]:
        return [ServerSample(t, (300 + mb_per_min * t / 60) * 2**20, 0.0, 4.0, 20.0, (), ())
                for t in range(0, 600, 5)]

    leak = rss_growth(samples(20.0), warmup_s=30, limit_mb_per_min=5.0)
    flat = rss_growth(samples(0.0), warmup_s=30, limit_mb_per_min=5.0)
    assert leak is not None and leak.flagged and leak.slope_mb_per_min == pytest.approx(20.0)
    assert flat is not None and not flat.flagged
    assert rss_growth(samples(20.0)[:11], warmup_s=30, limit_mb_per_min=5.0) is None
    # Swings of +-100 MB around a flat level are allocator churn, not a leak.
    noisy = [ServerSample(s.t, s.rss_bytes + (100 if i % 2 else -100) * 2**20, 0.0, 4.0,
                          20.0, (), ()) for i, s in enumerate(samples(0.0))]
    churn = rss_growth(noisy, warmup_s=30, limit_mb_per_min=5.0)
    assert churn is not None and not churn.flagged
