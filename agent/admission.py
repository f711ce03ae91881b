"""Admission control: whether one more session fits on this instance, sans I/O.

Three budgets, checked in order:
- sessions: at most `server.max_sessions` (admitted plus opening);
- frame time: the render time a session needs per second (its speaking
  share times fps times the measured cost of one frame on the primary
  renderer) summed over every session plus the new one must stay within
  `max_utilization` of the primary lanes' time (one lane per GPU);
- GPU memory: what the framework reports in use (at least the memory at
  start-up plus `session_gpu_bytes` per session), plus one more session's
  budget, must stay within `gpu_memory_limit` of the device.
A refusal carries the wire's `retry_after_ms` and the metric's reason label.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AdmissionConfig


@dataclass(frozen=True, slots=True)
class GpuMemory:
    used_bytes: int  # in use now (device-wide or the framework's reserve, the larger)
    total_bytes: int
    base_bytes: int  # in use after warm-up, before any session


@dataclass(frozen=True, slots=True)
class AdmissionState:
    sessions: int  # admitted or opening
    max_sessions: int
    draining: bool
    fps: int
    lanes: int  # primary lanes: GPUs, or CPU render threads
    frame_cost_s: float | None  # measured render seconds per frame; None until measured
    speaking_share: float | None  # measured share of sessions in a turn; None until measured
    gpu: GpuMemory | None  # None without a GPU


@dataclass(frozen=True, slots=True)
class Decision:
    admit: bool
    reason: str = ""  # avatar_admission_rejections label
    message: str = ""
    retry_after_ms: int = 0


ADMIT = Decision(True)


class AdmissionController:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config

    def frame_load(self, state: AdmissionState, sessions: int) -> float:
        """Render seconds per second that `sessions` sessions are planned to need."""
        cfg = self.config
        cost = state.frame_cost_s if state.frame_cost_s is not None else cfg.prior_frame_cost_s
        share = max(cfg.speaking_share, state.speaking_share or 0.0)
        return sessions * share * state.fps * cost

    def decide(self, state: AdmissionState) -> Decision:
        cfg = self.config
        if state.draining:
            return Decision(False, "draining", "server is draining; connect to another instance",
                            1000)
        if state.sessions >= state.max_sessions:
            return Decision(False, "max_sessions",
                            f"session limit of {state.max_sessions} reached", cfg.retry_after_ms)
        need = self.frame_load(state, state.sessions + 1)
        capacity = state.lanes * cfg.max_utilization
        if need > capacity:
            return Decision(False, "frame_budget",
                            f"render budget full: {state.sessions + 1} sessions would need "
                            f"{need:.2f} s of rendering per second, capacity {capacity:.2f}",
                            cfg.retry_after_ms)
        gpu = state.gpu
        if gpu is not None and gpu.total_bytes > 0:
            planned = max(gpu.used_bytes, gpu.base_bytes + state.sessions * cfg.session_gpu_bytes)
            projected = planned + cfg.session_gpu_bytes
            limit = cfg.gpu_memory_limit * gpu.total_bytes
            if projected > limit:
                return Decision(False, "gpu_memory",
                                f"GPU memory would reach {projected / gpu.total_bytes:.0%} "
                                f"(limit {cfg.gpu_memory_limit:.0%})", cfg.retry_after_ms)
        return ADMIT
