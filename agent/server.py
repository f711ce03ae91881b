"""The server: shared resources, HTTP endpoints and the WebSocket entry on one port.

`AgentServer` owns what sessions share: avatars, the renderer and its engine,
pre-encoded idle video, the session store and metrics. It starts listening
at once (`/healthz` 200) and warms up in the background (`/readyz` 503 until
the default avatar is loaded and the renderer warmed). SIGTERM drains.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from agent.auth import (
    Principal,
    authenticator_from_config,
    bearer_token,
    client_address,
    origin_allowed,
    world_readable,
)
from agent.avatars import AvatarRegistry
from agent.config import AgentConfig
from agent.connection import SessionConnection, close_draining, error_reply
from agent.engine import ChunkOutcome, Engine
from agent.errors import AgentError, CloseCode, ConfigError, OverloadedError, Unauthorized
from agent.limits import ConnectionLimiter, SessionQuota
from agent.metrics import Metrics
from agent.protocol import dump
from agent.renderers import build_renderer
from agent.scheduler import ChunkScheduler
from media.avatar import Avatar
from media.encode import EncodedFrame, encode_loop
from media.idle_video import idle_frames
from media.types import Renderer
from sessions.store import MemorySessionStore, SessionStore

log = structlog.get_logger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"
SESSION_PATH = "/v1/session"


class AgentServer:
    def __init__(self, config: AgentConfig, *, renderer: Renderer | None = None,
                 store: SessionStore | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.auth = authenticator_from_config(config.auth)  # raises ConfigError
        self.connections = ConnectionLimiter.from_config(config.limits)
        self.quota = SessionQuota.from_config(config.limits)
        self._quota_held: dict[SessionConnection, Principal] = {}
        self._awaiting_hello: set[ServerConnection] = set()
        self.avatars = AvatarRegistry(config.avatars)
        self.renderer: Renderer = renderer or build_renderer(config, self.avatars)
        caps = self.renderer.capabilities
        workers = config.renderer.cpu.workers if caps.device == "cpu" else 1
        self.engine = Engine(
            self.renderer,
            ChunkScheduler(max_batch=caps.max_batch, max_queue=config.engine.max_queue),
            workers=workers,
            render_timeout_s=config.engine.render_timeout_s,
            on_outcome=self._on_chunk,
        )
        self.store: SessionStore = store or _make_store(config)
        self.encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self.sessions: dict[str, SessionConnection] = {}
        self._pending: set[SessionConnection] = set()
        self._idle_cache: dict[tuple[str, str, int, int], asyncio.Future[tuple[EncodedFrame, ...]]] = {}
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self.ready = False
        self.draining = False
        self._server: Server | None = None
        self._warm_task: asyncio.Task[None] | None = None
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
            await asyncio.to_thread(self.renderer.warmup)
            fmt = self.config.video
            from media.encode import fit_size

            w, h = fit_size(avatar.width, avatar.height, min(fmt.max_height, avatar.height))
            await self.idle_video(avatar, fmt.codec, w, h)
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

    async def drain(self) -> None:
        """SIGTERM: refuse new sessions, let turns finish up to a deadline, then close."""
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        log.info("draining", sessions=len(self.sessions))
        deadline = time.monotonic() + self.config.server.drain_timeout_s
        while time.monotonic() < deadline and any(
            s.core is not None and not s.core.idle for s in self.sessions.values()
        ):
            await asyncio.sleep(0.05)
        await asyncio.gather(
            *(s.close(CloseCode.SERVICE_RESTART, "server restarting; resume elsewhere")
              for s in list(self.sessions.values())),
            return_exceptions=True,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        await self.engine.close()
        self.encode_pool.shutdown(wait=False, cancel_futures=True)
        self.renderer.close()
        await self.store.close()
        self.stopped.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        http_scheme = "https" if self.config.server.tls_cert else "http"
        print(f"avatar agent listening on {self.url}  (health: {http_scheme}://"
              f"{self.config.server.host}:{self.port}/readyz)", flush=True)
        if self.auth.open:
            print("WARNING: authentication is OFF: anyone who can reach this port can open "
                  "sessions. Pass --auth-token/--auth-token-file or --ticket-secret-file "
                  "(see docs/security.md).", file=sys.stderr, flush=True)
        await stop.wait()
        await self.drain()
        await self.close()

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
        """Take a session slot (instance and principal); `unregister` gives it back."""
        if self.draining:
            self.metrics.admission_rejections.labels("draining").inc()
            raise OverloadedError("server is draining; connect to another instance", 1000)
        if len(self.sessions) + len(self._pending) >= self.config.server.max_sessions:
            self.metrics.admission_rejections.labels("max_sessions").inc()
            raise OverloadedError(
                f"session limit of {self.config.server.max_sessions} reached", 2000)
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
        if self.sessions.get(conn.session_id) is conn:
            del self.sessions[conn.session_id]
        self.metrics.active_sessions.set(len(self.sessions))

    async def idle_video(self, avatar: Avatar, codec: str, width: int, height: int
                         ) -> tuple[EncodedFrame, ...]:
        """The avatar's idle loop encoded once per format and shared by every session."""
        key = (avatar.id, codec, width, height)
        fut = self._idle_cache.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._idle_cache[key] = fut
            try:
                frames = await asyncio.to_thread(idle_frames, avatar, width, height)
                packets = await asyncio.to_thread(
                    encode_loop, frames, codec, width, height, avatar.fps,
                    self.config.video.idle_keyframe_interval_frames, self.config.video)
                fut.set_result(packets)
            except BaseException as exc:
                del self._idle_cache[key]
                fut.set_exception(exc)
                raise
        return await asyncio.shield(fut)

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

    def _on_chunk(self, outcome: ChunkOutcome) -> None:
        m = self.metrics
        m.chunks.labels(outcome.outcome).inc()
        prio = outcome.priority.name.lower()
        m.queue_wait.labels(prio).observe(outcome.queue_wait_s)
        m.stage_duration.labels("queue_wait").observe(outcome.queue_wait_s)
        for stage, seconds in outcome.stages.items():
            m.stage_duration.labels(stage).observe(seconds)
        for p, n in self.engine.queue_depth.items():
            m.queue_depth.labels(p.name.lower()).set(n)

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
            state = "ready" if ok else ("draining" if self.draining else "starting")
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


def run_server(config: AgentConfig, **kwargs: Any) -> None:
    from agent.logs import configure_logging

    configure_logging(config.logging)
    tune_process()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(AgentServer(config, **kwargs).serve_forever())
