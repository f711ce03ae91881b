"""Observability through the real server: metric families, JSON logs with ids, turn records,
sampled turns and profiler traces."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from pathlib import Path

import pytest
import structlog

from agent.client import SessionClient
from agent.config import LoggingConfig
from agent.logs import configure_logging
from tests.conftest import timeout
from tests.serverutil import running_server, small_config, speech_like

pytestmark = pytest.mark.integration

FAMILIES = [
    "avatar_stage_duration_seconds", "avatar_time_to_first_frame_seconds",
    "avatar_inter_frame_interval_seconds", "avatar_turn_duration_seconds",
    "avatar_queue_wait_seconds", "avatar_resume_duration_seconds", "avatar_frames_sent_total",
    "avatar_chunks_total", "avatar_turns_total", "avatar_errors_total",
    "avatar_admission_rejections_total", "avatar_frame_validation_failures_total",
    "avatar_circuit_breaker_transitions_total", "avatar_degradation_transitions_total",
    "avatar_barge_ins_total", "avatar_slow_consumer_events_total", "avatar_active_sessions",
    "avatar_sessions_by_tier", "avatar_queue_depth", "avatar_circuit_breaker_state",
    "avatar_degradation_tier", "avatar_draining", "avatar_model_ready",
    "avatar_gpu_utilization_ratio", "avatar_gpu_memory_used_bytes",
    "avatar_gpu_memory_total_bytes", "process_resident_memory_bytes",
]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


async def test_families_logs_records_samples_and_profiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(LoggingConfig(format="json", level="info"))
    cfg = small_config(tmp_path / "avatars", **{
        "logging.format": "json",
        "observability.sample_dir": str(tmp_path / "samples"),
        "observability.sample_rate": 1.0,
        "observability.profile_chunks": 1,
        "observability.profile_dir": str(tmp_path / "profiles"),
    })
    try:
        async with running_server(cfg) as srv:
            before = await asyncio.to_thread(scrape, srv.port)
            for family in FAMILIES:
                assert f"# TYPE {family.removesuffix('_total')}" in before, family
            assert 'avatar_time_to_first_frame_seconds_bucket{le="3.0"}' in before
            assert 'avatar_inter_frame_interval_seconds_bucket{le="0.1"}' in before
            assert 'avatar_gpu_utilization_ratio{gpu="0"} 0.0' in before
            client = await SessionClient.open(srv.url, hello={"trace_id": "trace-abc"})
            await client.speak("t1", speech_like(0.8, 16000), 16000, realtime=0)
            await client.wait_message("turn.done", timeout(10), turn="t1")
            session = client.record.ready["session"]
            await client.close()
            after = await asyncio.to_thread(scrape, srv.port)
        assert 'avatar_turns_total{outcome="completed"} 1.0' in after
        assert "avatar_time_to_first_frame_seconds_count 1.0" in after
        assert 'avatar_stage_duration_seconds_count{stage="encode"}' in after
        assert 'avatar_stage_duration_seconds_count{stage="queue_wait"} 0.0' not in after
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()
             if line.startswith("{")]
    mine = [e for e in lines if e.get("session_id") == session]
    events = {e["event"] for e in mine}
    assert {"session_opened", "turn_queued", "turn_started", "turn_done", "turn_trace",
            "session_closed"} <= events
    assert all(e["trace_id"] == "trace-abc" for e in mine)
    assert all(e["turn_id"] == "t1" for e in mine if e["event"].startswith("turn_"))
    (record,) = [e for e in mine if e["event"] == "turn_trace"]
    assert record["outcome"] == "completed"
    assert {"queue_wait", "encode"} <= set(record["stage_totals_s"])
    assert record["spans"] and all(s["duration_s"] >= 0 for s in record["spans"])
    (sample,) = list((tmp_path / "samples").iterdir())
    assert (sample / "input.wav").stat().st_size > 20_000
    assert (sample / "output.mp4").stat().st_size > 1_000
    assert json.loads((sample / "trace.json").read_text())["turn_id"] == "t1"
    (trace,) = list((tmp_path / "profiles").glob("*.trace.json"))
    assert "traceEvents" in json.loads(trace.read_text())
