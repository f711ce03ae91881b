"""Typed configuration: one root config composed of per-subsystem configs.

YAML under `configs/` is read at the entry point only (`load_config`); every
core receives its own config object and never reads the environment. Every
field has a default and a one-line doc; cross-field checks name the values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# scheme://host[:port], no path: what browsers send in the Origin header.
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


class ServerConfig(_Config):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8765, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    max_sessions: int = Field(64, ge=1, description="Sessions admitted at once on this instance.")
    hello_timeout_s: float = Field(10.0, gt=0, description="Close a connection without hello.")
    drain_timeout_s: float = Field(20.0, ge=0, description="SIGTERM: time for turns to finish.")
    ping_interval_s: float | None = Field(
        20.0, description="WebSocket keepalive ping interval; None disables."
    )
    ping_timeout_s: float | None = Field(
        20.0, description="Close a client that does not answer a keepalive ping in time."
    )
    state_url: str | None = Field(
        None, description="redis://HOST:PORT/DB to share resumable sessions; None: in memory."
    )
    state_save_interval_s: float = Field(
        10.0, gt=0, description="How often a live session's resumable state is saved."
    )
    allowed_origins: tuple[str, ...] = Field(
        (), description="Browser Origins that may open sessions (403 otherwise); empty: any."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain; serves wss://.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    trusted_proxy_hops: int = Field(
        0, ge=0, description="Proxies in front that append X-Forwarded-For; 0 trusts none."
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return tuple(o.lower() for o in value)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class AuthConfig(_Config):
    tokens: tuple[SecretStr, ...] = Field(
        (), description="Static API tokens; with none and no ticket secret the server runs open."
    )
    token_file: Path | None = Field(
        None, description="File of API tokens, one per line; blank lines and # comments skipped."
    )
    ticket_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of session tickets (prefer ticket_secret_file)."
    )
    ticket_secret_file: Path | None = Field(None, description="File holding the ticket key.")
    ticket_max_ttl_s: float = Field(
        3600.0, gt=0, description="Refuse tickets that expire later than this from now."
    )

    @model_validator(mode="after")
    def _one_secret(self) -> AuthConfig:
        if self.ticket_secret is not None and self.ticket_secret_file is not None:
            raise ValueError("give ticket_secret or ticket_secret_file, not both")
        return self


class LimitsConfig(_Config):
    max_message_bytes: int = Field(
        1 << 20, ge=1024, description="Largest client message; bigger closes with 1009."
    )
    max_turn_s: float = Field(120.0, gt=0, description="Longest turn of audio accepted.")
    max_queued_turns: int = Field(8, ge=0, description="Turns queued behind the active one.")
    resume_window_s: float = Field(60.0, ge=0, description="How long a lost session can resume.")
    max_hello_bytes: int = Field(
        16384, ge=1024, description="Largest message before authentication; bigger closes 1009."
    )
    max_pending_hellos: int = Field(
        256, ge=1, description="Connections waiting to authenticate at once; more get 1013."
    )
    audio_realtime_factor: float = Field(
        10.0, ge=1.0, description="Client audio may arrive at most this many times real time..."
    )
    audio_burst_s: float = Field(
        30.0, ge=0, description="...after a head start of this many seconds of audio."
    )
    control_messages_per_s: float = Field(
        50.0, gt=0, description="Sustained rate of JSON messages from one client."
    )
    control_message_burst: int = Field(100, ge=1, description="JSON messages allowed at once.")
    abuse_strikes: int = Field(
        20, ge=1, description="Refusals within abuse_window_s that count as abuse (close 1008)."
    )
    abuse_window_s: float = Field(10.0, gt=0, description="Window of abuse_strikes.")
    max_sessions_per_token: int = Field(
        0, ge=0, description="Sessions one API token holds at once; 0: only server.max_sessions."
    )
    max_sessions_per_ticket: int = Field(
        4, ge=0, description="Sessions one ticket subject (sub) holds at once; 0: no cap."
    )
    connections_per_s: float = Field(
        10.0, gt=0, description="New WebSocket connections per client address, sustained."
    )
    connection_burst: int = Field(100, ge=1, description="New connections per address at once.")
    connection_block_s: float = Field(
        60.0, ge=0, description="How long an abusive address (strikes) is refused with 1008."
    )
    max_send_backlog_s: float = Field(
        10.0, gt=0, description="A client this far behind reading its stream is closed."
    )


class VideoConfig(_Config):
    codec: Literal["h264", "jpeg"] = Field("h264", description="Default codec of server video.")
    max_height: int = Field(512, ge=64, description="Default output height (capped by the avatar).")
    keyframe_interval_s: float = Field(
        2.0, gt=0, le=2.0, description="Longest gap between keyframes."
    )
    idle_keyframe_interval_frames: int = Field(
        25, ge=1, description="Keyframe spacing of the shared idle video (join points)."
    )
    h264_crf: int = Field(23, ge=0, le=51, description="libx264 constant rate factor.")
    h264_preset: str = Field("ultrafast", description="libx264 preset.")
    jpeg_quality: int = Field(85, ge=1, le=100, description="JPEG quality.")
    send_lead_s: float = Field(
        0.12, ge=0, le=0.5, description="How far ahead of its pts a frame is sent."
    )
    send_buffer_frames: int = Field(
        50, ge=4, description="Per-session send buffer; past it video frames are dropped."
    )


class TimelineConfig(_Config):
    blend_out_ms: int = Field(320, ge=200, le=500, description="Converge to neutral at turn end.")
    blend_in_ms: int = Field(200, ge=0, le=500, description="Leave neutral at turn start.")
    interrupt_blend_ms: int = Field(240, ge=40, le=500, description="Converge on interrupt.")


class DefaultAvatarConfig(_Config):
    size: int = Field(512, ge=64, description="Width and height of the generated default avatar.")
    clip_seconds: tuple[float, ...] = Field(
        (4.0, 8.0, 16.0, 32.0), description="Lengths of the generated source clips."
    )
    seed: int = Field(7, description="Seed of the generated motion.")


class AvatarConfig(_Config):
    cache_dir: Path = Field(
        Path("~/.cache/avatar-agent/avatars"), description="Where prepared avatars live."
    )
    default: str = Field("default", description="Avatar used when hello names none.")
    default_avatar: DefaultAvatarConfig = Field(default_factory=DefaultAvatarConfig)
    fps: int = Field(25, description="Frame rate of avatars and of the video we send.")


class CpuRendererConfig(_Config):
    chunk_frames: int = Field(
        8, ge=1, le=16, description="Frames per chunk; smaller starts speech sooner."
    )
    workers: int = Field(2, ge=1, description="Threads rendering chunks in parallel.")


class LatentSyncConfig(_Config):
    checkpoint_dir: Path = Field(Path("checkpoints"), description="Folder with the weights.")
    resolution: Literal[256, 512] = Field(256, description="Face crop size (v1.5: 256, v1.6: 512).")
    inference_steps: int = Field(
        20, ge=1, description="Denoising steps per chunk (LatentSync: 20 DDIM; dpm++: 8-10)."
    )
    guidance_scale: float = Field(1.5, ge=1.0, description="Classifier-free guidance scale.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Compute dtype."
    )
    max_batch: int = Field(4, ge=1, description="Chunks batched into one UNet call.")
    seed: int = Field(1247, description="Seed of the initial latents.")
    sampler: Literal["ddim", "dpm++"] = Field(
        "ddim", description="ddim: LatentSync's exact sampler; dpm++: DPM-Solver++, fewer steps."
    )
    deepcache_interval: int = Field(
        1, ge=1, description="DeepCache: the whole UNet every N steps, its shallow path between;"
        " 1 = off (exact)."
    )
    cuda_graphs: bool = Field(
        True, description="Replay the UNet as CUDA graphs, captured per batch size at warm-up"
        " (CUDA devices only; same numbers as eager)."
    )
    turn_start_deepcache_interval: int = Field(
        1, ge=1, description="DeepCache interval for a render call that holds a turn's first"
        " chunk (its latency is the time to first frame); 1 = the same as every other call."
        " 3 over the exact 20-step DDIM: about 2.4x faster, small differences (see the README)."
    )
    compile: bool = Field(
        False, description="Compile the UNet with torch.compile (Inductor) under the CUDA graphs"
        " (CUDA only): about 1.5x the frames per second on an H100. The first start compiles"
        " each forward kind once for every batch size (exact; DeepCache's refresh and"
        " shallow: 1.5-2 min each on an H100); later starts reuse compile_cache_dir. The VAE"
        " decoder is compiled too (its decode 2.2x faster on an H100; 15-23 s a shape cold)."
    )
    compile_cache_dir: Path = Field(
        Path("~/.cache/avatar-agent/inductor"), description="Inductor's on-disk caches"
        " (TORCHINDUCTOR_CACHE_DIR) when compile is on; keep it on a volume."
    )
    aot: bool = Field(
        False, description="Run the UNet as ahead-of-time compiled artifacts (torch.export +"
        " AOTInductor; under the CUDA graphs on CUDA) instead of compile: the first start"
        " compiles each forward kind in use once for batches up to max_batch and stores it"
        " in aot_cache_dir; later starts load it. The artifacts hold no weights (any"
        " checkpoint of the architecture uses them); each load is checked against eager."
    )
    aot_cache_dir: Path = Field(
        Path("~/.cache/avatar-agent/aot"), description="Where aot keeps its artifacts, keyed"
        " by model config, dtype, shapes, batch range, GPU model and torch version."
    )
    frame_attention: Literal["matmul", "triton", "auto"] = Field(
        "auto", description="How compiled forwards (compile or aot, on CUDA) run the motion"
        " modules' attention over a chunk's 16 frames: 'matmul', two small batched matmuls"
        " (32.1 fps at 8 chunks on an H100, exact settings), 'triton', one Triton kernel"
        " (34.3 fps; needs Triton, which CUDA builds of torch on Linux ship), or 'auto' (the"
        " default): 'triton' where Triton is installed, 'matmul' elsewhere."
    )

    @model_validator(mode="after")
    def _one_compiler(self) -> LatentSyncConfig:
        if self.compile and self.aot:
            raise ValueError("compile and aot are two ways to compile the UNet: turn on one")
        return self


class RendererConfig(_Config):
    name: Literal["auto", "cpu", "latentsync"] = Field(
        "auto", description="auto: latentsync when its checkpoints and CUDA exist, else cpu."
    )
    cpu: CpuRendererConfig = Field(default_factory=CpuRendererConfig)
    latentsync: LatentSyncConfig = Field(default_factory=LatentSyncConfig)


class EngineConfig(_Config):
    max_queue: int = Field(256, ge=1, description="Chunks waiting for a renderer at most.")
    render_timeout_s: float = Field(5.0, gt=0, description="A chunk not back in time fails.")
    aging_s: float = Field(
        1.0, gt=0, description="Waiting this long lifts a chunk one priority class."
    )
    turn_start_budget_s: float = Field(
        0.5, gt=0, description="Deadline of a turn's first chunk, from its submission."
    )
    urgent_horizon_s: float = Field(
        1.0, gt=0, description="Chunks due later than this count as speculative work."
    )
    fallback_workers: int = Field(
        2, ge=1, description="CPU renderer threads serving tier 2 and the fallback."
    )
    max_abandoned_threads: int = Field(
        4, ge=1, description="Hung render threads per lane before the lane is given up."
    )
    chaos: str | None = Field(
        None, description="Fault injection into the primary renderer (drills, tests), "
        "e.g. 'hang=1.0' or 'error=0.2,delay_ms=300'; see docs/resilience.md."
    )


class BreakerConfig(_Config):
    timeouts_to_open: int = Field(1, ge=1, description="Consecutive timeouts that open it.")
    errors_to_open: int = Field(3, ge=1, description="Consecutive failures that open it.")
    open_s: float = Field(2.0, gt=0, description="Wait before the first half-open probe.")
    max_open_s: float = Field(30.0, gt=0, description="Longest wait between probes (doubling).")


class DegradationConfig(_Config):
    stable_s: float = Field(
        10.0, ge=0, description="Healthy time before a session steps up one tier."
    )
    miss_window: int = Field(8, ge=1, description="Recent chunks judged for deadline misses.")
    miss_ratio: float = Field(
        0.25, gt=0, le=1, description="Share of late chunks in the window that drops a tier."
    )
    miss_demotion_interval_s: float = Field(
        2.0, ge=0, description="Least time between two sessions' deadline-miss drops (or their "
        "step-ups) from or into one tier, instance-wide; 0 lets them all move at once."
    )
    late_tolerance_s: float = Field(
        0.1, ge=0, description="A chunk the playout waited on longer than this was late."
    )
    queue_wait_s: float = Field(
        1.0, gt=0, description="A chunk waiting longer than this drops its session a tier."
    )
    congestion_events: int = Field(
        3, ge=1, description="Send-buffer overflows within congestion_window_s that drop to tier 2."
    )
    congestion_window_s: float = Field(5.0, gt=0, description="Window for congestion_events.")
    tier2_scale: float = Field(
        0.5, gt=0, le=1, description="Tier 2 and 3 picture height as a share of the session's."
    )


class AdmissionConfig(_Config):
    speaking_share: float = Field(
        0.5, gt=0, le=1, description="Expected share of time a session speaks (planning floor)."
    )
    max_utilization: float = Field(
        0.85, gt=0, le=1, description="Share of renderer time admission may plan to use."
    )
    prior_frame_cost_s: float = Field(
        0.02, gt=0, description="Render cost per frame assumed until one is measured."
    )
    gpu_memory_limit: float = Field(
        0.8, gt=0, le=1, description="Refuse sessions when GPU memory would pass this share."
    )
    session_gpu_bytes: int = Field(
        256 << 20, ge=0, description="GPU memory budgeted per session."
    )
    retry_after_ms: int = Field(2000, ge=0, description="retry_after_ms when refusing for load.")


class ValidationConfig(_Config):
    enabled: bool = Field(True, description="Check every rendered chunk before it is shown.")
    blank_std: float = Field(2.0, ge=0, description="A frame with less pixel spread is blank.")
    saturated_share: float = Field(
        0.3, gt=0, le=1, description="Extra share of clipped pixels (vs the source) that fails."
    )
    max_mean_diff: float = Field(
        24.0, gt=0, description="Mean abs difference from the source outside the mouth that fails."
    )


class LeakGuardConfig(_Config):
    threshold: float = Field(
        0.9, gt=0, le=1, description="RSS or GPU memory share that drains and restarts."
    )
    interval_s: float = Field(5.0, gt=0, description="How often memory is sampled.")
    samples: int = Field(3, ge=1, description="Consecutive samples over threshold before acting.")
    exit_code: int = Field(75, ge=0, le=255, description="Exit status after a leak drain.")


class ObservabilityConfig(_Config):
    sample_dir: Path | None = Field(
        None, description="Save a sampled share of turns (input audio, output video) here."
    )
    sample_rate: float = Field(0.0, ge=0, le=1, description="Share of turns to sample.")
    sample_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Samples kept in all; the oldest go first."
    )
    profile_chunks: int = Field(
        0, ge=0, description="Write a torch profiler (Perfetto) trace of this many chunks."
    )
    profile_dir: Path = Field(Path("profiles"), description="Where profiler traces go.")
    gpu_poll_s: float = Field(5.0, gt=0, description="How often GPU gauges are read (NVML).")


class LoggingConfig(_Config):
    format: Literal["json", "console"] = Field("json", description="Log line format.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")


class AgentConfig(_Config):
    """The root config."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    timeline: TimelineConfig = Field(default_factory=TimelineConfig)
    avatars: AvatarConfig = Field(default_factory=AvatarConfig)
    renderer: RendererConfig = Field(default_factory=RendererConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    leak_guard: LeakGuardConfig = Field(default_factory=LeakGuardConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if 16_000 % self.avatars.fps:
            raise ValueError(f"avatars.fps={self.avatars.fps} must divide 16000 (audio samples)")
        if self.video.send_buffer_frames * 2 < self.avatars.fps * self.video.send_lead_s:
            raise ValueError(
                f"video.send_buffer_frames={self.video.send_buffer_frames} cannot hold "
                f"video.send_lead_s={self.video.send_lead_s} of frames"
            )
        if self.breaker.max_open_s < self.breaker.open_s:
            raise ValueError(
                f"breaker.max_open_s={self.breaker.max_open_s} is below "
                f"breaker.open_s={self.breaker.open_s}"
            )
        if self.engine.chaos is not None:
            from agent.chaos import ChaosSpec

            ChaosSpec.parse(self.engine.chaos)  # raises ValueError naming the bad part
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> AgentConfig:
        """A copy with dotted-path overrides applied (e.g. {"server.port": 0})."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = value
        return parse_config(data, source="overrides")


def parse_config(data: dict[str, Any], source: str) -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid config in {source}:\n" + "\n".join(lines)) from None


def load_config(path: Path | None) -> AgentConfig:
    """Read a YAML config; None gives the defaults."""
    if path is None:
        return AgentConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return parse_config(raw, source=str(path))
