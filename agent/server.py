"""The server: shared resources, HTTP endpoints and the WebSocket entry on one port.

`AgentServer` owns what sessions share: avatars, the renderers and their
engine (primary lanes, CPU fallback, breakers), pre-encoded idle and static
video, admission control, the session store and metrics. It starts listening
at once (`/healthz` 200) and warms up in the background (`/readyz` 503 until
the default avatar is loaded, every renderer warmed, the loaded avatars
prepared on every primary renderer and the renderers timed). An avatar first
named by a session is prepared while that session opens, before its `ready`.
SIGTERM drains; `InstanceWatch` keeps the instance tier and the leak guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from agent.admission import AdmissionController, AdmissionState
from agent.auth import (
    Principal,
    authenticator_from_config,
    bearer_token,
    client_address,
    origin_allowed,
    world_readable,
)
from agent.avatars import AvatarRegistry
from agent.breaker import BreakerTransition
from agent.chaos import ChaosRenderer, ChaosSpec
from agent.config import AgentConfig
from agent.connection import SessionConnection, close_draining, error_reply
from agent.engine import ChunkOutcome, Engine
from agent.errors import (
    AgentError,
    CloseCode,
    ConfigError,
    OverloadedError,
    RenderError,
    Unauthorized,
)
from agent.framechecks import FrameChecks
from agent.limits import ConnectionLimiter, SessionQuota
from agent.metrics import Metrics
from agent.protocol import dump
from agent.renderers import build_renderer
from agent.scheduler import ChunkScheduler
from agent.telemetry import SampleWriter, read_gpus
from agent.watch import InstanceWatch
from media.avatar import Avatar
from media.cpu_renderer import CpuRenderer
from media.encode import EncodedFrame, encode_loop, fit_size
from media.idle_video import compose, idle_frames
from media.types import (
    RENDER_SAMPLE_RATE,
    AvatarPrep,
    ChunkKey,
    Frame,
    FrameSpec,
    RenderChunk,
    Renderer,
)
from sessions.store import MemorySessionStore, SessionStore

log = structlog.get_logger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"
SESSION_PATH = "/v1/session"


VideoKey = tuple[str, str, str, int, int]  # kind, avatar, codec, width, height


class AgentServer:
    def __init__(self, config: AgentConfig, *,
                 renderer: Renderer | Sequence[Renderer] | None = None,
                 fallback: Renderer | None = None, store: SessionStore | None = None) -> None:
        self.config = config
        self.clock: Callable[[], float] = time.monotonic  # the one clock of every core
        self.metrics = Metrics()
        self.auth = authenticator_from_config(config.auth)  # raises ConfigError
        self.connections = ConnectionLimiter.from_config(config.limits)
        self.quota = SessionQuota.from_config(config.limits)
        self._quota_held: dict[SessionConnection, Principal] = {}
        self._awaiting_hello: set[ServerConnection] = set()
        self.avatars = AvatarRegistry(config.avatars)
        given = renderer if renderer is not None else build_renderer(config, self.avatars)
        primaries = [given] if not isinstance(given, Sequence) else list(given)
        obs = config.observability
        if obs.profile_chunks > 0:
            from media.profiling import ProfilingRenderer

            primaries = [ProfilingRenderer(primaries[0], obs.profile_dir, obs.profile_chunks),
                         *primaries[1:]]
        self.sampler = (SampleWriter(obs.sample_dir.expanduser(), obs.sample_rate,
                                     obs.sample_max_bytes)
                        if obs.sample_dir is not None and obs.sample_rate > 0 else None)
        self.chaos: ChaosRenderer | None = None
        if config.engine.chaos is not None:
            # Chaos wraps the primary only: the fallbacks must stay healthy.
            self.chaos = ChaosRenderer(primaries[0], ChaosSpec.parse(config.engine.chaos))
            primaries = [self.chaos, *primaries[1:]]
        self.renderer: Renderer = primaries[0]  # sessions size chunks by its capabilities
        self._calibrate_on = given if not isinstance(given, Sequence) else given[0]
        self.fallback_renderer: Renderer = fallback or CpuRenderer(self.avatars.get,
                                                                   config.renderer.cpu)
        caps = self.renderer.capabilities
        self._primaries = tuple(dict.fromkeys(primaries))  # each renderer once
        if caps.device == "cpu" and len(primaries) == 1:
            # A CPU renderer is stateless: one lane per worker thread, same instance.
            primaries = primaries * config.renderer.cpu.workers
        self.checks = FrameChecks(self.avatars.get, config.validation)
        eng = config.engine
        self.engine = Engine(
            primaries,
            self.fallback_renderer,
            ChunkScheduler(max_batch=caps.max_batch, max_queue=eng.max_queue,
                           aging_s=eng.aging_s, horizon_s=eng.urgent_horizon_s),
            breaker=config.breaker,
            fallback_workers=eng.fallback_workers,
            render_timeout_s=eng.render_timeout_s,
            max_abandoned=eng.max_abandoned_threads,
            stand_in=self.checks.stand_in,
            validate=self.checks.validate if config.validation.enabled else None,
            prior_frame_cost_s=config.admission.prior_frame_cost_s,
            clock=self.clock,
            on_outcome=self._on_chunk,
            on_breaker=self._on_breaker,
        )
        self.admission = AdmissionController(config.admission)
        self.watch = InstanceWatch(self)
        self.store: SessionStore = store or _make_store(config)
        self.encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self.sessions: dict[str, SessionConnection] = {}
        self._pending: set[SessionConnection] = set()
        self._videos: dict[VideoKey, asyncio.Task[tuple[EncodedFrame, ...]]] = {}
        self._prepared: dict[str, asyncio.Task[list[AvatarPrep]]] = {}
        self._neutral: dict[str, Frame] = {}
        self._background: set[asyncio.Task[object]] = set()
        self.sessions_changed = asyncio.Event()  # a session opened, closed or went idle
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self.ready = False
        self.draining = False
        self.exit_code = 0
        self._server: Server | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._draining: set[SessionConnection] = set()
        self.stopped = asyncio.Event()

    # --- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config.server
        # sessions.redis_store (and redis) is imported only when a Redis store is made.
        redis_store = sys.modules.get("sessions.redis_store")
        if redis_store is not None and isinstance(self.store, redis_store.RedisSessionStore):
            await self.store.ping()
        tls = _tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
        self.engine.start()
        self._server = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            ssl=tls,
            process_request=self._process_request,
            process_response=self._process_response,
            compression=None,  # media is already compressed; per-message deflate costs CPU
            max_size=self.config.limits.max_message_bytes,
            ping_interval=cfg.ping_interval_s,
            ping_timeout=cfg.ping_timeout_s,
            server_header="avatar-agent",
        )
        self._announce_auth()
        self._warm_task = asyncio.create_task(self._warmup(), name="warmup")
        self.watch.start()
        gpus = asyncio.create_task(self._poll_gpus(), name="gpu-gauges")
        self._background.add(gpus)
        gpus.add_done_callback(self._background.discard)

    @property
    def port(self) -> int:
        assert self._server is not None
        sock = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.server.tls_cert else "ws"
        return f"{scheme}://{self.config.server.host}:{self.port}{SESSION_PATH}"

    def _announce_auth(self) -> None:
        a = self.config.auth
        if self.auth.open:
            log.warning("auth_disabled", message="NO AUTHENTICATION: any client that reaches "
                        f"{self.config.server.host}:{self.port} can open sessions; pass "
                        "--auth-token, --auth-token-file or --ticket-secret-file")
        else:
            log.info("auth_enabled", tokens=len(a.tokens) + (1 if a.token_file else 0),
                     tickets=self.auth.accepts_tickets)
        for path in (a.token_file, a.ticket_secret_file):
            if path is not None and world_readable(path):
                log.warning("secret_file_world_readable", path=str(path),
                            message="other users can read it; chmod 600")

    async def _warmup(self) -> None:
        started = time.perf_counter()
        try:
            avatar = await asyncio.to_thread(self.avatars.warmup)
            for renderer in self._primaries:  # one after the other: one GPU each
                await asyncio.to_thread(renderer.warmup)
            await asyncio.gather(*(self.prepare_avatar(a) for a in self.avatars.loaded()))
            if self.fallback_renderer is not self._calibrate_on:
                await asyncio.to_thread(self.fallback_renderer.warmup)
            await asyncio.to_thread(self._calibrate, avatar)
            fmt = self.config.video
            w, h = fit_size(avatar.width, avatar.height, min(fmt.max_height, avatar.height))
            await self.idle_video(avatar, fmt.codec, w, h)
            self.prepare_tiers(avatar, fmt.codec, w, h)
            self.watch.after_warmup()
        except Exception:
            log.exception("warmup_failed")
            raise
        self.ready = True
        self.metrics.model_ready.set(1)
        log.info("ready", seconds=round(time.perf_counter() - started, 2),
                 renderer=self.renderer.capabilities.name, avatar=avatar.id)

    async def wait_ready(self) -> None:
        assert self._warm_task is not None
        await asyncio.shield(self._warm_task)

    def prepare_avatar(self, avatar_id: str) -> asyncio.Future[list[AvatarPrep]]:
        """The avatar's per-avatar renderer work (`Engine.prepare_avatar`), started on its
        first call and shared by every later one; a caller that gives up does not stop it."""
        task = self._prepared.get(avatar_id)
        if task is None:
            task = asyncio.create_task(self.engine.prepare_avatar(avatar_id),
                                       name=f"prepare-{avatar_id}")
            self._prepared[avatar_id] = task
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return asyncio.shield(task)

    def _calibrate(self, avatar: Avatar) -> None:
        """Seed the latency models with one timed chunk per renderer (admission and batch
        sizing need a frame cost before the first session speaks). Off the event loop."""
        n = self.renderer.capabilities.chunk_frames
        loop = avatar.idle_loop
        specs = tuple(FrameSpec(loop[i % len(loop)].source, speech=True) for i in range(n))
        rng = np.random.default_rng(0)
        audio = (0.1 * rng.standard_normal(RENDER_SAMPLE_RATE)).astype(np.float32)
        chunk = RenderChunk(ChunkKey("~calibration", "~", 0), avatar.id, specs, 0, audio,
                            avatar.fps)
        for renderer, model in ((self._calibrate_on, self.engine.primary_latency),
                                (self.fallback_renderer, self.engine.fallback_latency)):
            try:
                renderer.render([chunk])  # the first call may pay one-off costs
                started = time.perf_counter()
                renderer.render([chunk])
            except RenderError as exc:
                # Not fatal: its breaker will keep work away from it while it fails.
                log.warning("calibration_failed", renderer=renderer.capabilities.name,
                            error=str(exc))
                continue
            model.observe(n, time.perf_counter() - started)

    async def drain(self) -> None:
        """SIGTERM: /readyz 503 and 1013 for new sessions at once; each session closes with
        1012 and a `goaway` carrying its resume token as soon as it has no turn left,
        every one at the drain deadline."""
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        log.info("draining", sessions=len(self.sessions))
        deadline = self.clock() + self.config.server.drain_timeout_s
        closing: set[asyncio.Task[None]] = set()
        while self.sessions and self.clock() < deadline:
            for conn in list(self.sessions.values()):
                if conn.core is not None and conn.core.idle and conn not in self._draining:
                    self._draining.add(conn)
                    closing.add(asyncio.create_task(conn.close_for_restart()))
            self.sessions_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self.sessions_changed.wait()
        for conn in list(self.sessions.values()):
            if conn not in self._draining:
                self._draining.add(conn)
                closing.add(asyncio.create_task(conn.close_for_restart()))
        if closing:
            await asyncio.wait(closing, timeout=self.config.server.drain_timeout_s + 5)

    async def close(self) -> None:
        await self.watch.close()
        for task in list(self._background):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        await self.engine.close()
        self.encode_pool.shutdown(wait=False, cancel_futures=True)
        for renderer in self._primaries:
            renderer.close()
        await self.store.close()
        self.stopped.set()

    def _exit_if_warmup_failed(self, task: asyncio.Task[None]) -> None:
        """A server that cannot warm up never becomes ready: say why and exit non-zero
        (a supervisor restarts it or shows the error) instead of answering 503 forever."""
        if task.cancelled() or task.exception() is None:
            return
        print(f"avatar agent: start-up failed: {task.exception()}", file=sys.stderr,
              flush=True)
        self.request_stop(exit_code=1)

    def request_stop(self, exit_code: int = 0) -> None:
        """Drain and exit (SIGTERM, or the leak guard with a non-zero code)."""
        self.exit_code = self.exit_code or exit_code
        self._stop.set()

    async def serve_forever(self) -> int:
        """Serve until SIGTERM/SIGINT or the leak guard; drain; return the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        assert self._warm_task is not None
        self._warm_task.add_done_callback(self._exit_if_warmup_failed)
        http_scheme = "https" if self.config.server.tls_cert else "http"
        print(f"avatar agent listening on {self.url}  (health: {http_scheme}://"
              f"{self.config.server.host}:{self.port}/readyz)", flush=True)
        if self.auth.open:
            print("WARNING: authentication is OFF: anyone who can reach this port can open "
                  "sessions. Pass --auth-token/--auth-token-file or --ticket-secret-file "
                  "(see docs/security.md).", file=sys.stderr, flush=True)
        await self._stop.wait()
        await self.drain()
        await self.close()
        return self.exit_code

    # --- sessions ---------------------------------------------------------

    def authenticate(self, token: str | None, ws: ServerConnection, address: str) -> Principal:
        """The principal for hello's token or else the Authorization header.

        Runs before anything is allocated for the session; a failure counts
        against the client's address (repeated failures block it).
        """
        if token is None and ws.request is not None:
            headers = ws.request.headers.get_all("Authorization")
            token = bearer_token(headers[0]) if len(headers) == 1 else None
        try:
            principal = self.auth.authenticate(token, time.time())
        except Unauthorized:
            if self.connections.strike(address, time.monotonic()):
                log.warning("address_blocked", address=address, reason="failed authentication",
                            seconds=self.config.limits.connection_block_s)
            raise
        self._awaiting_hello.discard(ws)
        return principal

    def admit(self, conn: SessionConnection) -> None:
        """Admission control (agent.admission), then the principal's quota; raises
        OverloadedError to refuse. Takes a session slot; `unregister` gives it back."""
        stats = self.engine.stats()
        state = AdmissionState(
            sessions=len(self.sessions) + len(self._pending),
            max_sessions=self.config.server.max_sessions,
            draining=self.draining,
            fps=self.config.avatars.fps,
            lanes=max(stats.primary_lanes_alive, 1),
            frame_cost_s=stats.primary_frame_cost_s,
            speaking_share=self.watch.speaking_share,
            gpu=self.watch.gpu,
        )
        decision = self.admission.decide(state)
        if not decision.admit:
            self.metrics.admission_rejections.labels(decision.reason).inc()
            log.info("session_refused", reason=decision.reason, detail=decision.message)
            raise OverloadedError(decision.message, decision.retry_after_ms)
        if not self.quota.acquire(conn.principal):
            self.metrics.admission_rejections.labels("principal_sessions").inc()
            raise OverloadedError(
                f"this credential already holds {self.quota.cap(conn.principal)} sessions, "
                "its limit; close one first", PRINCIPAL_RETRY_MS)
        self._quota_held[conn] = conn.principal
        self._pending.add(conn)

    def register(self, conn: SessionConnection) -> None:
        self._pending.discard(conn)
        self.sessions[conn.session_id] = conn
        self.metrics.active_sessions.set(len(self.sessions))

    def unregister(self, conn: SessionConnection) -> None:
        """Idempotent: also called for connections that failed before `register`."""
        self._pending.discard(conn)
        principal = self._quota_held.pop(conn, None)
        if principal is not None:
            self.quota.release(principal)
        self._draining.discard(conn)
        if self.sessions.get(conn.session_id) is conn:
            del self.sessions[conn.session_id]
        self.metrics.active_sessions.set(len(self.sessions))
        self.sessions_changed.set()

    # --- shared media (encoded once per format, shared by every session) ----------

    async def idle_video(self, avatar: Avatar, codec: str, width: int, height: int
                         ) -> tuple[EncodedFrame, ...]:
        """The avatar's idle loop."""
        def frames() -> list[Frame]:
            return idle_frames(avatar, width, height)

        return await self._shared_video(("idle", avatar.id, codec, width, height), frames,
                                        avatar.fps)

    async def static_video(self, avatar: Avatar, codec: str, width: int, height: int
                           ) -> tuple[EncodedFrame, ...]:
        """Tier 3: the neutral picture, a keyframe every `idle_keyframe_interval_frames`
        and unchanged pictures between them (a few bytes each in h264)."""
        n = self.config.video.idle_keyframe_interval_frames

        def frames() -> list[Frame]:
            return [self.neutral_picture(avatar)] * n

        return await self._shared_video(("static", avatar.id, codec, width, height), frames,
                                        avatar.fps)

    def neutral_picture(self, avatar: Avatar) -> Frame:
        """The avatar at rest (idle_loop[0] is the neutral pose), at its own size."""
        picture = self._neutral.get(avatar.id)
        if picture is None:
            picture = self._neutral[avatar.id] = compose(avatar, avatar.idle_loop[0])
        return picture

    def reduced_size(self, width: int, height: int) -> tuple[int, int]:
        """The picture size of tiers 2 and 3 for a session of width x height."""
        target = max(int(height * self.config.degradation.tier2_scale), 16)
        return fit_size(width, height, min(target, height))

    def prepare_tiers(self, avatar: Avatar, codec: str, width: int, height: int) -> None:
        """Encode the lower tiers' shared videos in the background, so that a tier change
        finds them ready."""
        w, h = self.reduced_size(width, height)
        for make in (self.idle_video, self.static_video):
            task: asyncio.Task[object] = asyncio.create_task(make(avatar, codec, w, h))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _shared_video(self, key: VideoKey, frames: Callable[[], list[Frame]],
                            fps: int) -> tuple[EncodedFrame, ...]:
        """One encode per key, shared by every session that asks. It runs as its own
        task: a session that leaves while waiting (cancelled) neither stops it for the
        others nor leaves an exception nobody reads."""
        task = self._videos.get(key)
        if task is None:
            task = asyncio.create_task(self._encode_shared(key, frames, fps))
            self._videos[key] = task
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    async def _encode_shared(self, key: VideoKey, frames: Callable[[], list[Frame]],
                             fps: int) -> tuple[EncodedFrame, ...]:
        _, _, codec, width, height = key
        try:
            pictures = await asyncio.to_thread(frames)
            return await asyncio.to_thread(
                encode_loop, pictures, codec, width, height, fps,
                self.config.video.idle_keyframe_interval_frames, self.config.video)
        except BaseException:
            del self._videos[key]  # the next request tries again
            raise

    async def _handle(self, ws: ServerConnection) -> None:
        """Connection-level checks, then the session. Nothing is allocated for a
        session before its hello authenticates (`SessionConnection._open`)."""
        address = self._client_address(ws)
        refusal = self._refuse_connection(ws, address)
        if refusal is not None:
            reply, close = error_reply(refusal)
            with contextlib.suppress(Exception):
                await ws.send(dump(reply))
                await close_draining(ws, close or CloseCode.POLICY, reply.message[:120])
            return
        self._awaiting_hello.add(ws)
        try:
            await SessionConnection(self, ws, address).run()
        finally:
            self._awaiting_hello.discard(ws)

    def _refuse_connection(self, ws: ServerConnection, address: str) -> AgentError | None:
        verdict = self.connections.admit(address, time.monotonic())
        retry_ms = max(int(verdict.retry_after_s * 1000), 1)
        if verdict.blocked:
            self.metrics.admission_rejections.labels("blocked").inc()
            self.metrics.errors.labels("auth").inc()
            if verdict.new_block:
                log.warning("address_blocked", address=address, reason="connection rate",
                            seconds=self.config.limits.connection_block_s)
            return Unauthorized("too many refused connections or failed authentications "
                                "from this address; blocked for now", retry_ms)
        if not verdict.allowed:
            self.metrics.admission_rejections.labels("connection_rate").inc()
            return OverloadedError(f"more than {self.config.limits.connections_per_s:g} new "
                                   "connections a second from this address", retry_ms)
        if len(self._awaiting_hello) >= self.config.limits.max_pending_hellos:
            self.metrics.admission_rejections.labels("pending_hellos").inc()
            return OverloadedError("too many connections waiting to authenticate", 1000)
        return None

    def _client_address(self, ws: ServerConnection) -> str:
        peer = ws.remote_address[0] if ws.remote_address else "unknown"
        hops = self.config.server.trusted_proxy_hops
        forwarded = None
        if hops and ws.request is not None:
            forwarded = ",".join(ws.request.headers.get_all("X-Forwarded-For")) or None
        return client_address(str(peer), forwarded, hops)

    async def _poll_gpus(self) -> None:
        """GPU gauges from NVML; without a GPU they stay at zero."""
        m = self.metrics
        while True:
            for g in await asyncio.to_thread(read_gpus):
                label = str(g.index)
                m.gpu_utilization.labels(label).set(g.utilization)
                m.gpu_memory_used.labels(label).set(g.memory_used)
                m.gpu_memory_total.labels(label).set(g.memory_total)
            await asyncio.sleep(self.config.observability.gpu_poll_s)

    def _on_chunk(self, outcome: ChunkOutcome) -> None:
        conn = self.sessions.get(outcome.key.session)
        if conn is not None:
            conn.observer.chunk(outcome, self.clock())
        m = self.metrics
        label = outcome.outcome
        if label == "ok" and outcome.served_by != "primary":
            label = str(outcome.served_by)  # fallback or static
        m.chunks.labels(label).inc()
        if outcome.error_kind is not None:
            m.errors.labels(outcome.error_kind).inc()
        if outcome.check is not None:
            m.errors.labels("validation").inc()
            m.frame_validation_failures.labels(outcome.check).inc()
        prio = outcome.priority.name.lower()
        if outcome.late:
            m.deadline_misses.labels(prio).inc()
        m.queue_wait.labels(prio).observe(outcome.queue_wait_s)
        m.stage_duration.labels("queue_wait").observe(outcome.queue_wait_s)
        for stage, seconds in outcome.stages.items():
            m.stage_duration.labels(stage).observe(seconds)
        for p, n in self.engine.queue_depth.items():
            m.queue_depth.labels(p.name.lower()).set(n)

    def _on_breaker(self, t: BreakerTransition) -> None:
        self.metrics.breaker_transitions.labels(t.from_state.name.lower(),
                                                t.to_state.name.lower()).inc()

    # --- HTTP -------------------------------------------------------------

    def _process_response(self, ws: ServerConnection, request: Request, response: Response
                          ) -> Response:
        # Which instance answered: lets operators and tests see where a load
        # balancer routed a connection.
        response.headers["X-Avatar-Instance"] = self.instance_id
        return response

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == SESSION_PATH:
            origins = request.headers.get_all("Origin")
            allowed = self.config.server.allowed_origins
            if len(origins) > 1 or not origin_allowed(origins[0] if origins else None, allowed):
                self.metrics.admission_rejections.labels("origin").inc()
                return _respond(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain")
            # Until hello authenticates, a message may only be hello-sized.
            ws.protocol.max_message_size = self.config.limits.max_hello_bytes
            return None  # WebSocket handshake
        if path == "/healthz":
            return _respond(http.HTTPStatus.OK, b"ok\n", "text/plain")
        if path == "/readyz":
            ok = self.ready and not self.draining
            status = http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE
            failed = (self._warm_task is not None and self._warm_task.done()
                      and not self._warm_task.cancelled() and self._warm_task.exception())
            state = ("ready" if ok else "draining" if self.draining
                     else "failed" if failed else "starting")
            return _respond(status, f"{state}\n".encode(), "text/plain")
        if path == "/metrics":
            return _respond(http.HTTPStatus.OK, self.metrics.render(),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/v1/avatars":
            body = json.dumps({"avatars": self.avatars.describe()}).encode()
            return _respond(http.HTTPStatus.OK, body, "application/json")
        page = _static_file(path)
        if page is not None:
            return _respond(http.HTTPStatus.OK, page[0], page[1])
        return _respond(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")


def _make_store(config: AgentConfig) -> SessionStore:
    if config.server.state_url:
        from sessions.redis_store import RedisSessionStore  # redis only when configured

        return RedisSessionStore(config.server.state_url)
    return MemorySessionStore(time.monotonic)


PRINCIPAL_RETRY_MS = 5000  # a session of the same credential may end by then
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.(html|js|css)")


def _static_file(path: str, root: Path = WEB_DIR) -> tuple[bytes, str] | None:
    """The browser client's files: plain names of regular files directly in `root`.

    The name is matched before the file system is asked (no separators, dots
    only between name parts, no percent escapes), and the resolved file must
    still be in `root` (no symlink out).
    """
    if path == "/":
        name = "index.html"
    elif path.startswith("/web/"):
        name = path.removeprefix("/web/")
    else:
        return None
    if not _STATIC_NAME.fullmatch(name):
        return None
    candidate = root / name
    try:
        if candidate.resolve(strict=True).parent != root.resolve() or not candidate.is_file():
            return None
        return candidate.read_bytes(), _TYPES[candidate.suffix]
    except OSError:
        return None


def _respond(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
    return Response(status.value, status.phrase, headers, body)


def _tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Server TLS: the stdlib's secure defaults, TLS 1.2 at least."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


def tune_process() -> None:
    """Process-wide settings for many light threads on few cores.

    Encoder and renderer threads release the GIL in native code and then wait
    for it again; the default 5 ms switch interval makes each such wait cost
    up to 5 ms while the event loop is busy. OpenCV's own thread pool would
    oversubscribe the cores that our worker threads already use.
    """
    import cv2

    sys.setswitchinterval(0.001)
    cv2.setNumThreads(1)


def warm_up(config: AgentConfig) -> int:
    """`python -m agent warm-up`: what a server start does before `/readyz` turns 200
    (models loaded, UNet compiled or its ahead-of-time artifacts built and stored, graphs
    captured, avatars prepared), then stop. On a loopback port picked by the system.
    Operators run it once where the caches are writable (docs/deploy.md), so that pods
    that mount them read-only start warm. 0 when ready; 1, saying why, when not."""
    from agent.logs import configure_logging

    configure_logging(config.logging)
    tune_process()
    config = config.with_overrides({"server.host": "127.0.0.1", "server.port": 0})

    async def run() -> int:
        started = time.perf_counter()
        server = AgentServer(config)
        try:
            await server.start()
            await server.wait_ready()
        except Exception as exc:  # the reason, not a traceback (warmup_failed logs that)
            print(f"avatar agent: warm-up failed: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            await server.close()
        print(f"avatar agent: warmed up in {time.perf_counter() - started:.1f} s"
              f" (renderer {server.renderer.capabilities.name})", flush=True)
        return 0

    return asyncio.run(run())


def run_server(config: AgentConfig, **kwargs: Any) -> int:
    """Run until SIGTERM (exit 0 after the drain) or the leak guard (its exit code)."""
    from agent.logs import configure_logging

    configure_logging(config.logging)
    tune_process()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    code: int = runner(AgentServer(config, **kwargs).serve_forever())
    return code
