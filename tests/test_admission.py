"""Admission control core: session cap, frame-time budget, GPU memory, drain."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.admission import AdmissionController, AdmissionState, GpuMemory
from agent.config import AdmissionConfig

pytestmark = pytest.mark.unit

CFG = AdmissionConfig(speaking_share=0.5, max_utilization=0.8, prior_frame_cost_s=0.02,
                      gpu_memory_limit=0.8, session_gpu_bytes=100, retry_after_ms=1500)
CTRL = AdmissionController(CFG)


def state(**kw: object) -> AdmissionState:
    base: dict[str, object] = dict(sessions=0, max_sessions=100, draining=False, fps=25, lanes=1,
                                   frame_cost_s=None, speaking_share=None, gpu=None)
    base.update(kw)
    return AdmissionState(**base)  # type: ignore[arg-type]


def test_drain_and_session_cap_refuse_with_retry_after() -> None:
    d = CTRL.decide(state(draining=True))
    assert not d.admit and d.reason == "draining" and d.retry_after_ms > 0
    d = CTRL.decide(state(sessions=4, max_sessions=4, frame_cost_s=0.001))
    assert (d.admit, d.reason, d.retry_after_ms) == (False, "max_sessions", 1500)
    assert CTRL.decide(state(sessions=3, max_sessions=4, frame_cost_s=0.001)).admit


def test_frame_budget_uses_measured_cost_and_speaking_share() -> None:
    # 0.04 s/frame x 25 fps x 0.5 speaking = 0.5 s/s per session; 1 lane x 0.8 holds 1.
    assert CTRL.decide(state(sessions=0, frame_cost_s=0.04)).admit
    d = CTRL.decide(state(sessions=1, frame_cost_s=0.04))
    assert not d.admit and d.reason == "frame_budget" and "capacity 0.80" in d.message
    # Two GPUs (capacity 1.6) hold three; a measured share above the planning floor counts.
    assert CTRL.decide(state(sessions=2, frame_cost_s=0.04, lanes=2)).admit
    assert not CTRL.decide(state(sessions=3, frame_cost_s=0.04, lanes=2)).admit
    assert CTRL.decide(state(sessions=1, frame_cost_s=0.02, lanes=1)).admit
    assert not CTRL.decide(state(sessions=1, frame_cost_s=0.02, speaking_share=1.0)).admit
    # Before any measurement the prior is used.
    assert CTRL.frame_load(state(), 2) == pytest.approx(2 * 0.5 * 25 * 0.02)


def test_gpu_memory_refuses_above_the_limit() -> None:
    gpu = GpuMemory(used_bytes=600, total_bytes=1000, base_bytes=500)
    # planned = max(600, 500 + 1 x 100) + 100 = 700 <= 800
    assert CTRL.decide(state(sessions=1, frame_cost_s=0.001, gpu=gpu)).admit
    # planned = max(600, 500 + 2 x 100) + 100 = 800: still within
    assert CTRL.decide(state(sessions=2, frame_cost_s=0.001, gpu=gpu)).admit
    d = CTRL.decide(state(sessions=3, frame_cost_s=0.001, gpu=gpu))
    assert not d.admit and d.reason == "gpu_memory" and "90%" in d.message
    hot = GpuMemory(used_bytes=790, total_bytes=1000, base_bytes=500)  # measured use wins
    assert CTRL.decide(state(sessions=0, frame_cost_s=0.001, gpu=hot)).reason == "gpu_memory"


@given(st.integers(0, 200), st.floats(1e-4, 0.2), st.integers(1, 8), st.floats(0.0, 1.0))
def test_admitting_never_overcommits_the_frame_budget(sessions: int, cost: float, lanes: int,
                                                      share: float) -> None:
    s = state(sessions=sessions, max_sessions=1000, frame_cost_s=cost, lanes=lanes,
              speaking_share=share)
    if CTRL.decide(s).admit:
        assert CTRL.frame_load(s, sessions + 1) <= lanes * CFG.max_utilization + 1e-9
    else:
        assert CTRL.frame_load(s, sessions + 1) > lanes * CFG.max_utilization
