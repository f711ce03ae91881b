"""The resilience benches' pure arithmetic: capacity, speech load, config text, fault view."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.client import Received, SessionRecord
from agent.config import AgentConfig
from agent.protocol import FrameFlags, MediaHeader, MediaKind
from bench.gpu_resilience_users import fault_view
from bench.resilience import RELAXED_ADMISSION, TIERS_OFF, batch_fps, speech_load, yaml_overrides

pytestmark = pytest.mark.unit


def test_capacity_and_speech_load() -> None:
    # 4 chunks of 16 frames in 0.5 s: 128 frames/s.
    assert batch_fps(4, 16, 0.5) == pytest.approx(128.0)
    # Two sessions speaking half and all of their frames at 25 fps ask for 37.5 frames/s.
    assert speech_load([0.5, 1.0], 75.0) == pytest.approx(0.5)
    assert speech_load([], 75.0) == 0.0


def test_yaml_overrides_load_as_the_same_config() -> None:
    both = {**RELAXED_ADMISSION, **TIERS_OFF}
    via_yaml = AgentConfig.model_validate(yaml.safe_load(yaml_overrides(both)))
    assert via_yaml == AgentConfig().with_overrides(both)


def frame(at: float, seq: int, tier: int) -> Received:
    header = MediaHeader(MediaKind.VIDEO, FrameFlags.SPEECH, tier, seq, seq * 40_000)
    return Received(header, b"", at)


def test_fault_view_times_drops_and_recovery_from_the_fault() -> None:
    # Frames every 40 ms from t=0 to 20 s; the fault is [5, 10]; the session drops at 7 s
    # and is back at tier 1 at 14 s.
    rec = SessionRecord()
    rec.video = [frame(i * 0.04, i, 2 if 7.0 <= i * 0.04 < 14.0 else 1) for i in range(500)]
    rec.messages = [(7.0, {"type": "tier", "tier": 2, "reason": "renderer failed"}),
                    (14.0, {"type": "tier", "tier": 1, "reason": "recovered"})]
    idle = SessionRecord(video=[frame(i * 0.04, i, 1) for i in range(500)])
    view = fault_view([rec, idle], (5.0, 10.0), 20.0)
    assert view["gap_p95_s"] == pytest.approx(0.04)
    assert view["dropped_after_s"] == [pytest.approx(2.0), None]
    assert view["back_after_lift_s"] == [pytest.approx(4.0), None]
    assert [(e[1], e[2]) for e in view["events"]] == [(0, 2), (0, 1)]
    # During the fault: 2 s of one session at tier 1, 3 s at tier 2, the other all at 1.
    assert view["tier_share"] == pytest.approx([0.7, 0.3, 0.0], abs=0.01)


@pytest.mark.integration
async def test_the_users_driver_reports_admission_refusals(tmp_path: Path) -> None:
    """bench.gpu_serve's users: sessions the server refuses at open are a result (the
    ramp ends there), not a crash of the bench."""
    import argparse

    from bench.gpu_serve_users import run
    from tests.serverutil import running_server, small_config

    config = small_config(tmp_path, **{"server.max_sessions": 1})
    async with running_server(config) as server:
        args = argparse.Namespace(url=server.url, users=2, speaking=1, duration=1.0,
                                  settle=0.0, codec="jpeg", height=128, seed=0)
        report = await run(args)
    assert report["refused"] == 1
    assert report["reason"].startswith("overloaded: session limit of 1")
