"""Every Prometheus object of the server, in one registry with the `avatar_` prefix.

Names, labels and bucket edges are a contract: dashboards and alerts in
`deploy/` depend on them. Cores produce stats; the shells call the methods
here. No session ids in labels. Every family exists from start-up.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import (
    ProcessCollector as _ProcessCollector,
)

STAGES = ("admission", "queue_wait", "audio_features", "inference", "validate", "paste",
          "encode", "send",
          # Renderer-specific stages, materialised too so their series exist from start-up.
          "face", "decode", "source", "mouth")
ERROR_TYPES = ("model_timeout", "gpu_oom", "model_error", "validation", "encode", "protocol",
               "auth", "internal")
PRIORITIES = ("in_turn", "turn_start", "speculative")
TIERS = ("1", "2", "3")
# Admission refusals by the security limits (agent/limits.py, agent/auth.py).
SECURITY_REJECTIONS = ("principal_sessions", "connection_rate", "blocked", "pending_hellos",
                       "origin")
# ok: primary renderer; fallback: the CPU fallback rendered it; static: no renderer could,
# its source pictures were shown; invalid: failed validation (source pictures shown).
CHUNK_OUTCOMES = ("ok", "fallback", "static", "invalid", "error", "timeout", "cancelled",
                  "shed")
VALIDATION_CHECKS = ("shape", "nonfinite", "blank", "saturated", "incoherent")
SLOW_CONSUMER_ACTIONS = ("video_dropped", "tier_down", "closed")

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TTFF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
GAP_BUCKETS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
TURN_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        _ProcessCollector(registry=r)
        self.stage_duration = Histogram(
            "avatar_stage_duration_seconds", "Duration of one pipeline stage.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r)
        self.time_to_first_frame = Histogram(
            "avatar_time_to_first_frame_seconds",
            "From a turn's first audio to its first video frame sent.",
            buckets=TTFF_BUCKETS, registry=r)
        self.inter_frame_interval = Histogram(
            "avatar_inter_frame_interval_seconds", "Gap between consecutive video frames sent.",
            buckets=GAP_BUCKETS, registry=r)
        self.turn_duration = Histogram(
            "avatar_turn_duration_seconds", "Video length of a finished turn.",
            buckets=TURN_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "avatar_queue_wait_seconds", "Time a chunk waited for a renderer.", ["priority"],
            buckets=WAIT_BUCKETS, registry=r)
        self.resume_duration = Histogram(
            "avatar_resume_duration_seconds", "Time to restore a resumed session.",
            buckets=STAGE_BUCKETS, registry=r)

        self.frames_sent = Counter(
            "avatar_frames_sent", "Video frames sent.", ["tier"], registry=r)
        self.chunks = Counter("avatar_chunks", "Chunks finished, by outcome.", ["outcome"],
                              registry=r)
        self.turns = Counter("avatar_turns", "Turns finished, by outcome.", ["outcome"],
                             registry=r)
        self.errors = Counter("avatar_errors", "Errors, by type.", ["type"], registry=r)
        self.admission_rejections = Counter(
            "avatar_admission_rejections", "Sessions refused, by reason.", ["reason"], registry=r)
        self.frame_validation_failures = Counter(
            "avatar_frame_validation_failures", "Rendered chunks failing a check.", ["check"],
            registry=r)
        self.breaker_transitions = Counter(
            "avatar_circuit_breaker_transitions", "Circuit breaker state changes.",
            ["from_state", "to_state"], registry=r)
        self.degradation_transitions = Counter(
            "avatar_degradation_transitions", "Tier changes.", ["from_tier", "to_tier"],
            registry=r)
        self.barge_ins = Counter("avatar_barge_ins", "Interrupts received.", registry=r)
        self.slow_consumer_events = Counter(
            "avatar_slow_consumer_events", "Actions taken for slow clients.", ["action"],
            registry=r)
        self.deadline_misses = Counter(
            "avatar_chunk_deadline_misses", "Chunks finished after their deadline.",
            ["priority"], registry=r)

        self.active_sessions = Gauge("avatar_active_sessions", "Sessions connected.", registry=r)
        self.sessions_by_tier = Gauge(
            "avatar_sessions_by_tier", "Sessions per quality tier.", ["tier"], registry=r)
        self.queue_depth = Gauge(
            "avatar_queue_depth", "Chunks waiting for a renderer.", ["priority"], registry=r)
        self.breaker_state = Gauge(
            "avatar_circuit_breaker_state", "0 closed, 1 half-open, 2 open.", registry=r)
        self.degradation_tier = Gauge(
            "avatar_degradation_tier", "Instance-wide quality tier (1 best).", registry=r)
        self.draining = Gauge("avatar_draining", "1 while draining for shutdown.", registry=r)
        self.model_ready = Gauge("avatar_model_ready", "1 once models are warm.", registry=r)
        self.gpu_utilization = Gauge(
            "avatar_gpu_utilization_ratio", "GPU busy share, 0-1.", ["gpu"], registry=r)
        self.gpu_memory_used = Gauge(
            "avatar_gpu_memory_used_bytes", "GPU memory used.", ["gpu"], registry=r)
        self.gpu_memory_total = Gauge(
            "avatar_gpu_memory_total_bytes", "GPU memory in total.", ["gpu"], registry=r)
        self.render_threads_hung = Gauge(
            "avatar_render_threads_hung", "Render threads abandoned after a timeout, still busy.",
            registry=r)

        # Materialise labelled children so every series exists from start-up.
        for s in STAGES:
            self.stage_duration.labels(s)
        for p in PRIORITIES:
            self.queue_wait.labels(p)
            self.deadline_misses.labels(p)
            self.queue_depth.labels(p).set(0)
        for t in TIERS:
            self.frames_sent.labels(t)
            self.sessions_by_tier.labels(t).set(0)
        for e in ERROR_TYPES:
            self.errors.labels(e)
        for o in CHUNK_OUTCOMES:
            self.chunks.labels(o)
        for c in VALIDATION_CHECKS:
            self.frame_validation_failures.labels(c)
        for a in SLOW_CONSUMER_ACTIONS:
            self.slow_consumer_events.labels(a)
        for o in ("completed", "interrupted", "failed"):
            self.turns.labels(o)
        for reason in ("max_sessions", "draining", "frame_budget", "gpu_memory",
                       *SECURITY_REJECTIONS):
            self.admission_rejections.labels(reason)
        self.degradation_tier.set(1)
        for gauge in (self.gpu_utilization, self.gpu_memory_used, self.gpu_memory_total):
            gauge.labels("0").set(0)  # real readings replace these where a GPU exists

    def render(self) -> bytes:
        return generate_latest(self.registry)
