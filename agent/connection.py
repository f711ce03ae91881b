"""The per-connection shell: socket I/O around a `SessionCore`.

Three tasks per session, owned by one TaskGroup: the reader feeds client
messages to the core (control is handled as it arrives, overtaking queued
media), the playout task asks the core what each frame slot shows at the
session's frame rate and queues encoded media, and the sender drains the send
buffer into the socket. Rendering happens in the engine's worker threads;
encoding in a thread pool. No policy lives here: the session's tier comes
from its `SessionHealth` core (`agent.sessiontiers`), what a tier sends from
`agent.videoout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
import time
from typing import TYPE_CHECKING, Any, assert_never

import numpy as np
import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from agent.auth import ANONYMOUS, Principal
from agent.engine import Rendered
from agent.errors import (
    AgentError,
    BadRequest,
    CloseCode,
    OverloadedError,
    ProtocolError,
    Timeout,
    Unauthorized,
    Unsupported,
)
from agent.limits import SessionLimiter
from agent.observe import SessionObserver
from agent.protocol import (
    SUPPORTED_AUDIO_RATES,
    AudioInfo,
    Bye,
    ByeReply,
    Error,
    FrameFlags,
    GoAway,
    Hello,
    Interrupt,
    ListenEnd,
    ListenStart,
    MediaKind,
    Ping,
    Pong,
    Ready,
    ServerMessage,
    SpeakEnd,
    SpeakStart,
    Text,
    TurnStarted,
    VideoInfo,
    dump,
    parse_client_message,
    unpack_media,
)
from agent.scheduler import Lane, Priority
from agent.sendbuffer import OutMedia, OutMessage, SendBuffer
from agent.sessiontiers import SessionTiers
from agent.tiers import ChunkReport, SessionHealth
from agent.videoout import OutputFormat, VideoOutput
from media.audio import float_to_pcm16, pcm16_to_float
from media.encode import fit_size
from media.types import ChunkKey, Frames, RenderChunk
from sessions.session import HoldSlot, IdleSlot, MediaSlot, SessionCore, SessionParams
from sessions.store import StoredSession
from sessions.timeline import Timeline

if TYPE_CHECKING:
    from agent.server import AgentServer

log = structlog.get_logger(__name__)


def error_reply(exc: BaseException) -> tuple[Error, CloseCode | None]:
    """The one table from error type to wire error and close code (None: go on)."""
    if isinstance(exc, ProtocolError):
        close = exc.close_code if exc.fatal else None
        return Error(code=exc.code, message=exc.message, fatal=exc.fatal,
                     retry_after_ms=exc.retry_after_ms), close
    if isinstance(exc, OverloadedError):
        return (
            Error(code="overloaded", message=exc.message, fatal=True,
                  retry_after_ms=exc.retry_after_ms),
            CloseCode.OVERLOADED,
        )
    return Error(code="internal", message="internal error", fatal=True), CloseCode.INTERNAL


async def close_draining(ws: ServerConnection, code: CloseCode, reason: str) -> None:
    """Close, reading and dropping what the client still sends meanwhile.

    websockets stops reading the socket while its incoming queue is full, so a
    client that flooded us would have its close frame stuck behind messages
    nobody takes, and the close would wait out `close_timeout` (10 s).
    """
    async with asyncio.TaskGroup() as tg:
        tg.create_task(ws.close(code, reason))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass



class SessionConnection:
    def __init__(self, server: AgentServer, ws: ServerConnection, address: str) -> None:
        self.server = server
        self.ws = ws
        self.cfg = server.config
        self.address = address  # the client address limits apply to
        self.session_id = ""
        self.resume_token = ""
        self.principal: Principal = ANONYMOUS
        self.limiter: SessionLimiter | None = None  # created once hello authenticates
        self.superseded = False  # a resume took this session over: do not save it
        self.tier = 1
        self.observer = SessionObserver("", "", None)  # replaced once the session opens
        self.core: SessionCore | None = None
        self.fmt: OutputFormat | None = None
        self.sendbuf = SendBuffer(self.cfg.video.send_buffer_frames)
        self._send_ready = asyncio.Event()
        self._progress = asyncio.Event()  # a slot was produced or the send buffer emptied
        self.tiers: SessionTiers | None = None
        self._silence = b""
        self._slot = 0
        self._t0 = 0.0  # loop time of slot 0
        self._started_wall = 0.0
        self._bye = False
        self._closing = False
        self._renders: set[asyncio.Future[Rendered]] = set()
        self._in_flight: dict[ChunkKey, RenderChunk] = {}  # submitted, not back
        self._held: dict[ChunkKey, float] = {}  # in flight while playout waited: since when
        self._turn_first_audio: dict[str, float] = {}
        self._turn_text: dict[str, str] = {}  # transcripts, sent as `text` in tier 3
        self._text_sent: set[str] = set()
        self._congestion_seen = 0
        self._last_video_sent: float | None = None

    # --- lifecycle --------------------------------------------------------

    async def run(self) -> None:
        opened = False
        try:
            hello = await self._await_hello()
            await self._open(hello)
            opened = True
        except TimeoutError:
            await self._fail(Timeout(f"no hello within {self.cfg.server.hello_timeout_s:g} s",
                                     fatal=True))
            return
        except AgentError as exc:
            await self._fail(exc)
            return
        except ConnectionClosed:
            self.server.unregister(self)
            return
        finally:
            if not opened:  # give back a slot taken before the failure
                self.server.unregister(self)
        structlog.contextvars.bind_contextvars(session_id=self.session_id)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader(), name="reader")
                tg.create_task(self._playout(), name="playout")
                tg.create_task(self._sender(), name="sender")
        except* ConnectionClosed:
            pass
        except* _SessionEnd:
            pass
        except* Exception as group:
            for err in group.exceptions:
                log.error("session_failed", error=repr(err), exc_info=err)
                self.server.metrics.errors.labels("internal").inc()
            with contextlib.suppress(ConnectionClosed):
                await self._fail(RuntimeError("internal"))
        finally:
            await self._teardown()

    async def _await_hello(self) -> Hello:
        first = await asyncio.wait_for(self.ws.recv(), self.cfg.server.hello_timeout_s)
        if isinstance(first, bytes):
            raise BadRequest("the first message must be hello", fatal=True)
        try:
            msg = parse_client_message(first) if first.lstrip().startswith("{") else None
        except BadRequest as exc:
            raise BadRequest(f"the first message must be a valid hello: {exc.message}",
                             fatal=True) from None
        if not isinstance(msg, Hello):
            raise BadRequest("the first message must be hello", fatal=True)
        return msg

    async def _open(self, hello: Hello) -> None:
        srv = self.server
        started = time.perf_counter()
        # Authentication comes first: nothing (slot, avatar, renderer or session
        # state) is allocated for a client that has not proven who it is.
        self.principal = srv.authenticate(hello.token, self.ws, self.address)
        self.ws.protocol.max_message_size = self.cfg.limits.max_message_bytes
        if hello.v != 1:
            raise Unsupported(f"protocol version {hello.v} is not supported (this server: 1)",
                              fatal=True)
        avatar_id = hello.avatar or self._default_avatar()
        if not self.principal.allows(avatar_id):
            raise Unauthorized(f"this credential does not grant avatar {avatar_id!r}")
        srv.admit(self)  # raises OverloadedError
        avatar = srv.avatars.get(avatar_id)
        self.fmt = self._negotiate(hello, avatar.fps, avatar.width, avatar.height)
        # On the render lanes; before a resumed session is claimed (a client that leaves
        # meanwhile can still resume) and before the session's clock starts.
        await srv.prepare_avatar(avatar.id)
        trace = hello.trace_id or secrets.token_hex(8)
        stored: StoredSession | None = None
        resume_failed: str | None = None
        if hello.resume is not None:
            stored, why = await self._claim(hello.resume.session, hello.resume.token, avatar.id)
            if stored is None:
                # One message for every cause: the answer must not tell a guesser
                # whether the session exists or whose it is. The log says why.
                resume_failed = ("cannot resume this session (unknown, expired, or opened "
                                 "with another credential or avatar); starting a new one")
                log.info("resume_refused", reason=why, principal=self.principal.id)
        if stored is not None:
            self.session_id = stored.session_id
        else:
            self.session_id = secrets.token_urlsafe(12)
        structlog.contextvars.bind_contextvars(session_id=self.session_id, trace_id=trace)
        srv.register(self)
        caps = srv.renderer.capabilities
        params = SessionParams(
            session_id=self.session_id,
            fps=avatar.fps,
            out_rate=self.fmt.rate,
            chunk_frames=caps.chunk_frames,
            lookahead_ms=caps.audio_lookahead_ms,
            max_turn_s=self.cfg.limits.max_turn_s,
            max_queued_turns=self.cfg.limits.max_queued_turns,
        )
        seed = int.from_bytes(self.session_id.encode()[:8].ljust(8, b"\0"), "little")
        args = (avatar.clips, avatar.neutral, avatar.idle_loop, self.cfg.timeline, avatar.fps)
        if stored is not None:
            timeline = Timeline.from_state(*args, state=stored.state["timeline"])
        else:
            timeline = Timeline(*args, seed=seed)
        self.core = SessionCore(avatar, timeline, params)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.limiter = SessionLimiter(self.cfg.limits, self.fmt.fps, now)
        if stored is not None:
            # The tier is not carried over: it described the old instance's health.
            self.core.restore(stored.state)
            self._started_wall = float(stored.state["started_wall"])
            self.sendbuf.set_next_seq(int(stored.state["video_seq"]),
                                      int(stored.state["audio_seq"]))
        else:
            self._started_wall = time.time()
        self._t0 = now - (time.time() - self._started_wall)
        self._slot = math.ceil((now - self._t0) * self.fmt.fps)
        fmt = self.fmt
        # A per-session share of extra stable time, so that sessions that dropped
        # together do not all return to the GPU at the same moment.
        stagger = int.from_bytes(self.session_id.encode()[-4:].ljust(4, b"\0"), "little")
        health = SessionHealth(self.cfg.degradation, srv.clock(),
                               stagger=(stagger % 1000) / 1000, gate=srv.watch.demotions)
        health.update(srv.clock(), srv.watch.tier, srv.watch.reason)  # start at the instance's
        self.observer = SessionObserver(self.session_id, trace, srv.sampler)
        encode_metric = srv.metrics.stage_duration.labels("encode").observe

        def observe_encode(seconds: float) -> None:
            encode_metric(seconds)
            if self.core is not None and self.core.active_turn is not None:
                self.observer.span(self.core.active_turn, "encode",
                                   srv.clock() - seconds, seconds)

        video = VideoOutput(
            avatar, fmt, srv.reduced_size(fmt.width, fmt.height), self.cfg.video,
            srv.encode_pool, srv.idle_video, srv.static_video, observe_encode)
        await video.start(health.tier)
        srv.prepare_tiers(avatar, fmt.codec, fmt.width, fmt.height)
        self.tiers = SessionTiers(health, video, srv.watch, srv.metrics, srv.clock,
                                  self._reroute)
        self.tier = health.tier
        current = video.current
        self._silence = bytes(2 * (self.fmt.rate // self.fmt.fps))
        self.resume_token = secrets.token_urlsafe(24)
        if resume_failed is not None:
            await self._send_now(Error(code="resume_failed", message=resume_failed))
        await self._send_now(
            Ready(
                session=self.session_id,
                resume_token=self.resume_token,
                video=VideoInfo(codec=current.codec, fps=current.fps,
                                width=current.width, height=current.height),
                audio=AudioInfo(rate=self.fmt.rate),
                tier=self.tier,
                resumed=stored is not None,
            )
        )
        srv.metrics.stage_duration.labels("admission").observe(time.perf_counter() - started)
        if stored is not None:
            srv.metrics.resume_duration.observe(time.perf_counter() - started)
        log.info("session_opened", avatar=avatar.id, codec=self.fmt.codec,
                 width=current.width, height=current.height, rate=self.fmt.rate,
                 resumed=stored is not None, principal=self.principal.id, tier=self.tier)

    def _default_avatar(self) -> str:
        """hello named no avatar: a ticket for one avatar means that one."""
        scope = self.principal.avatar
        return self.cfg.avatars.default if scope == "*" else scope

    async def _claim(self, session_id: str, token: str, avatar_id: str
                     ) -> tuple[StoredSession | None, str]:
        """Take a stored session over for a resume: right token (constant-time
        compare), same principal, same avatar. The stored entry is deleted, so
        the token cannot be used twice; a live connection still holding the
        session (its client lost it without the server noticing) is closed."""
        stored = await self.server.store.load(session_id)
        if stored is None:
            return None, "unknown or expired"
        given = token.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates
        if not secrets.compare_digest(stored.resume_token.encode(), given):
            return None, "wrong token"
        if stored.principal != self.principal.id:
            return None, "another principal"
        if stored.avatar != avatar_id:
            return None, "another avatar"
        await self.server.store.delete(session_id)
        live = self.server.sessions.get(session_id)
        if live is not None and live is not self:
            live.superseded = True
            try:
                await asyncio.wait_for(
                    live.close(CloseCode.POLICY, "session resumed on another connection"), 1.0)
            except TimeoutError:
                live.ws.transport.abort()  # a lost client never answers the close handshake
        return stored, "ok"

    def _negotiate(self, hello: Hello, fps: int, width: int, height: int) -> OutputFormat:
        v = self.cfg.video
        codec = (hello.video.codec if hello.video else None) or v.codec
        want_fps = hello.video.fps if hello.video else None
        if want_fps is not None and want_fps != fps:
            raise Unsupported(f"video.fps {want_fps} is not available; this avatar is {fps} fps",
                              fatal=True)
        max_h = (hello.video.max_height if hello.video else None) or v.max_height
        w, h = fit_size(width, height, min(max_h, height))
        rate = hello.audio.rate if hello.audio else 16000
        if rate not in SUPPORTED_AUDIO_RATES:
            raise Unsupported(
                f"audio.rate {rate} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_AUDIO_RATES))}",
                fatal=True,
            )
        return OutputFormat(codec=codec, width=w, height=h, fps=fps, rate=rate)

    async def _teardown(self) -> None:
        self._closing = True
        srv = self.server
        if self.core is not None:
            srv.engine.cancel(self.session_id)
            if not self._bye and not self.superseded:
                with contextlib.suppress(Exception):
                    await srv.store.save(self._stored(), self.cfg.limits.resume_window_s)
        for fut in self._renders:
            fut.cancel()
        if self.tiers is not None:
            self.tiers.close()
            self.tiers.video.close()
        srv.unregister(self)
        await self.observer.close()
        log.info("session_closed", bye=self._bye)
        structlog.contextvars.clear_contextvars()

    def _stored(self) -> StoredSession:
        assert self.core is not None
        state = self.core.snapshot()
        seq = self.sendbuf.next_seq
        state.update(
            started_wall=self._started_wall,
            video_seq=seq[MediaKind.VIDEO],
            audio_seq=seq[MediaKind.AUDIO],
            tier=self.tier,
        )
        return StoredSession(self.session_id, self.resume_token, self.principal.id,
                             self.core.avatar.id, state)

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close from outside."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, reason)

    async def close_for_restart(self) -> None:
        """Drain: store the session under a fresh resume token, tell the client where it
        stands (`goaway`) and close with 1012, so that it resumes on another instance."""
        if self.core is None:
            return
        self.resume_token = secrets.token_urlsafe(24)
        with contextlib.suppress(Exception):
            await self.server.store.save(self._stored(), self.cfg.limits.resume_window_s)
        with contextlib.suppress(ConnectionClosed):
            await self._send_now(GoAway(session=self.session_id, resume_token=self.resume_token,
                                        reason="server restarting; resume elsewhere"))
            await self.ws.close(CloseCode.SERVICE_RESTART, "server restarting; resume elsewhere")

    async def _fail(self, exc: BaseException) -> None:
        reply, close = error_reply(exc)
        if isinstance(exc, ProtocolError):
            self.server.metrics.errors.labels("auth" if exc.code == "unauthorized"
                                              else "protocol").inc()
        with contextlib.suppress(ConnectionClosed):
            await self._send_now(reply)
            await close_draining(self.ws, close or CloseCode.POLICY, reply.message[:120])

    async def _send_now(self, msg: ServerMessage) -> None:
        await self.ws.send(dump(msg))

    # --- reader -----------------------------------------------------------

    async def _reader(self) -> None:
        limiter = self.limiter
        assert limiter is not None
        loop = asyncio.get_running_loop()
        async for data in self.ws:
            try:
                try:
                    if isinstance(data, bytes):
                        self._on_binary(data, loop.time())
                    else:
                        limiter.control(loop.time())
                        await self._on_text(data)
                except ProtocolError as exc:
                    if not exc.fatal:
                        limiter.refused(loop.time())  # sustained refusals: fatal
                    raise
            except ProtocolError as exc:
                reply, close = error_reply(exc)
                self.server.metrics.errors.labels("protocol").inc()
                log.info("protocol_error", code=exc.code, message=exc.message, fatal=exc.fatal)
                await self._send_now(reply)
                if close is not None:
                    await close_draining(self.ws, close, exc.message[:120])
                    raise _SessionEnd() from None
            if self._bye:
                raise _SessionEnd()
        raise _SessionEnd()

    def _on_binary(self, data: bytes, now: float) -> None:
        assert self.core is not None and self.limiter is not None and self.fmt is not None
        header, payload = unpack_media(data)
        if header.kind != MediaKind.AUDIO:
            raise BadRequest("clients send audio frames only (kind 2)")
        if len(payload) % 2:
            raise BadRequest(f"audio payload of {len(payload)} bytes is not whole s16 samples")
        self.limiter.audio(len(payload) // 2, self.fmt.rate, now)
        samples = pcm16_to_float(payload)
        turn = self.core.open_turn
        self.core.on_audio(samples)
        if turn is not None and turn not in self._turn_first_audio:
            self._turn_first_audio[turn] = asyncio.get_running_loop().time()
        self._submit_chunks()

    async def _on_text(self, text: str) -> None:
        core = self.core
        assert core is not None
        msg = parse_client_message(text)
        match msg:
            case Hello():
                raise BadRequest("hello was already received")
            case SpeakStart():
                structlog.contextvars.bind_contextvars(turn_id=msg.turn)
                core.on_speak_start(msg.turn, msg.text, msg.duration_ms, msg.style)
                if msg.text:
                    self._turn_text[msg.turn] = msg.text
                self.observer.turn_queued(msg.turn, self.server.clock())
                log.info("turn_queued", turn_id=msg.turn, duration_ms=msg.duration_ms,
                         style=msg.style)
            case SpeakEnd():
                core.on_speak_end(msg.turn)
                self._submit_chunks()
            case Interrupt():
                await self._interrupt()
            case ListenStart():
                core.on_listen(True)
            case ListenEnd():
                core.on_listen(False)
            case Ping():
                await self._send_now(Pong(id=msg.id))
            case Bye():
                await self._finish_bye()
            case _:
                assert_never(msg)

    async def _interrupt(self) -> None:
        assert self.core is not None
        self.server.metrics.barge_ins.inc()
        dropped, flushed = self.sendbuf.flush_turn()
        self._slot -= dropped
        self.server.engine.cancel(self.session_id)
        for fut in self._renders:
            fut.cancel()
        self._in_flight.clear()
        self._held.clear()
        done = self.core.on_interrupt(unsent_frames=dropped)
        pts = self._pts(self._slot)
        for msg in flushed:
            if isinstance(msg, TurnStarted):
                self.sendbuf.push(OutMessage(msg))
        for d in done:
            assert d is not None
            self.sendbuf.push(OutMessage(d.model_copy(update={"pts_us": pts})))
            self._turn_text.pop(d.turn, None)
            self.server.metrics.turns.labels("interrupted").inc()
            self.observer.turn_finished(d.turn, "interrupted", None, 0, 0)
        self._send_ready.set()
        log.info("interrupted", turns=len(done), flushed_frames=dropped)
        self._submit_chunks()

    async def _finish_bye(self) -> None:
        """Finish: let queued turns play out (bounded), then answer bye."""
        assert self.core is not None
        core = self.core
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.server.drain_timeout_s):
                while not core.idle or len(self.sendbuf):
                    await self._progress.wait()  # set by the playout and sender tasks
                    self._progress.clear()
        self._bye = True
        await self.server.store.delete(self.session_id)
        await self._send_now(ByeReply())
        await self.ws.close(CloseCode.NORMAL, "bye")

    # --- rendering --------------------------------------------------------

    def _submit_chunks(self) -> None:
        core, tiers = self.core, self.tiers
        assert core is not None and tiers is not None
        now = self.server.clock()
        fps = core.params.fps
        tier = tiers.decided  # routes at once; the frames follow when it is applied
        for chunk in core.poll_chunks():
            if tier == 3:
                # The static tier renders nothing: the frames are never shown (the static
                # loop is), so a read-only view of the neutral picture stands in for them.
                neutral = self.server.neutral_picture(core.avatar)
                core.on_rendered(chunk.key, np.broadcast_to(
                    neutral, (len(chunk.frames), *neutral.shape)))  # (F, H, W, 3)
                continue
            ahead = max(core.frames_until(chunk), 0) / fps
            if core.is_playing(chunk.key.turn):
                prio = Priority.IN_TURN
            elif chunk.first_frame == 0:
                prio = Priority.TURN_START
                ahead = max(ahead, self.cfg.engine.turn_start_budget_s)
            else:
                prio = Priority.SPECULATIVE
            lane = Lane.PRIMARY if tier == 1 else Lane.FALLBACK
            fut = self.server.engine.submit(chunk, now + ahead, prio, lane,
                                            on_frames=functools.partial(self._on_early_frames,
                                                                        chunk.key))
            self._renders.add(fut)
            self._in_flight[chunk.key] = chunk
            fut.add_done_callback(functools.partial(self._on_render_done, chunk, lane))

    def _on_early_frames(self, key: ChunkKey, frames: Frames) -> None:
        """A chunk's first frames, checked, ahead of the rest (a streaming renderer's)."""
        if self.core is not None and not self._closing:
            self.core.on_rendered(key, frames, partial=True)

    def _on_render_done(self, chunk: RenderChunk, wanted: Lane,
                        fut: asyncio.Future[Rendered]) -> None:
        self._renders.discard(fut)
        self._in_flight.pop(chunk.key, None)
        held_since = self._held.pop(chunk.key, None)
        if fut.cancelled() or self.core is None or self.tiers is None or self._closing:
            return
        r = fut.result()
        # Late, for the ladder, means the viewer waited for it: playout repeated a picture
        # for longer than `late_tolerance_s` while it was rendering. Waiting for audio
        # that has not come (a TTS behind real time) is not the renderer's lateness.
        late = held_since is not None and (
            self.server.clock() - held_since > self.cfg.degradation.late_tolerance_s)
        self.tiers.on_chunk(ChunkReport(wanted.value, r.served_by.value, r.outcome, late,
                                        r.queue_wait_s))
        if r.outcome != "ok":
            # Never freeze: the engine handed the chunk's source pictures instead.
            log.warning("chunk_failed", turn_id=chunk.key.turn, chunk=chunk.key.index,
                        outcome=r.outcome, served_by=r.served_by.value, detail=r.detail)
        self.core.on_rendered(chunk.key, r.frames)

    # --- playout ----------------------------------------------------------

    def _pts(self, slot: int) -> int:
        assert self.fmt is not None
        return slot * 1_000_000 // self.fmt.fps

    async def _playout(self) -> None:
        assert self.fmt is not None and self.limiter is not None
        loop = asyncio.get_running_loop()
        lead = self.cfg.video.send_lead_s
        save_every = max(int(self.cfg.server.state_save_interval_s * self.fmt.fps), 1)
        while True:
            due = self._t0 + self._slot / self.fmt.fps - lead
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.ws.state is not State.OPEN:
                # Closing (keepalive timeout, close from either side): stop producing;
                # the library bounds the close itself (close_timeout).
                raise _SessionEnd()
            self._poll_tier()
            await self._produce_slot()
            self._slot += 1
            self._submit_chunks()
            if (self._slot % save_every == 0 and self.core is not None and self.core.idle
                    and not self.superseded):
                # Between turns: a crash of this instance can resume from here.
                await self.server.store.save(self._stored_light(),
                                             self.cfg.limits.resume_window_s)
            try:
                self.limiter.backlog(len(self.sendbuf))
            except Timeout as exc:
                # No error message: a client that reads nothing would not get it.
                log.warning("client_not_reading", queued=len(self.sendbuf))
                self.server.metrics.slow_consumer_events.labels("closed").inc()
                await self.ws.close(CloseCode.POLICY, exc.message[:120])
                raise _SessionEnd() from None

    def _poll_tier(self) -> None:
        tiers, core = self.tiers, self.core
        assert tiers is not None and core is not None
        seen = self.sendbuf.stats().congestion_events
        for _ in range(seen - self._congestion_seen):
            tiers.on_congestion()
            self.server.metrics.slow_consumer_events.labels("video_dropped").inc()
        self._congestion_seen = seen
        change = tiers.poll()
        if change is None:
            return
        self.tier = change.tier
        self.sendbuf.push(OutMessage(change))
        playing = core.active_turn
        if change.tier == 3 and playing is not None:
            self._send_text(playing)

    def _reroute(self, tier: int) -> None:
        lanes = {1: Lane.PRIMARY, 2: Lane.FALLBACK}
        self.server.engine.reroute(self.session_id, lanes.get(tier))

    def _send_text(self, turn: str) -> None:
        text = self._turn_text.get(turn)
        if text is not None and turn not in self._text_sent:
            self._text_sent.add(turn)
            self.sendbuf.push(OutMessage(Text(turn=turn, text=text)))

    async def _produce_slot(self) -> None:
        core, fmt, tiers = self.core, self.fmt, self.tiers
        assert core is not None and fmt is not None and tiers is not None
        video = tiers.video
        slot, started, done = core.next_slot()
        pts = self._pts(self._slot)
        buf = self.sendbuf
        if started is not None:
            buf.push(OutMessage(started.model_copy(update={"pts_us": pts})))
            first_audio = self._turn_first_audio.pop(started.turn, None)
            if first_audio is not None:
                # The frame goes out `lead` before its pts; count from then.
                sent_at = max(asyncio.get_running_loop().time(), self._t0 + pts / 1e6
                              - self.cfg.video.send_lead_s)
                self.server.metrics.time_to_first_frame.observe(sent_at - first_audio)
            if self.tier == 3:
                self._send_text(started.turn)
            log.info("turn_started", turn_id=started.turn, pts_us=pts)
        tier = self.tier
        static = tier == 3
        match slot:
            case IdleSlot(index=i):
                enc = (video.static_packet(buf.needs_keyframe) if static
                       else await video.idle_packet(i, buf.needs_keyframe))
                if enc is not None:
                    flags = FrameFlags.KEYFRAME if enc.keyframe else FrameFlags.NONE
                    buf.push(OutMedia(MediaKind.VIDEO, flags, tier, pts, enc.data))
                buf.push(OutMedia(MediaKind.AUDIO, FrameFlags.NONE, tier, pts, self._silence))
            case MediaSlot():
                if slot.client_turn:
                    self.observer.frame_shown(slot.turn, slot.frame)
                force = slot.first_of_turn or buf.needs_keyframe
                enc = (video.static_packet(buf.needs_keyframe) if static
                       else await video.encode(slot.frame, force=force))
                flags = FrameFlags.NONE
                if slot.speech:
                    flags |= FrameFlags.SPEECH
                if slot.last_of_turn and slot.client_turn:
                    flags |= FrameFlags.LAST_OF_TURN
                if enc is not None:
                    vflags = flags | (FrameFlags.KEYFRAME if enc.keyframe else FrameFlags.NONE)
                    buf.push(OutMedia(MediaKind.VIDEO, vflags, tier, pts, enc.data, slot.turn))
                buf.push(OutMedia(MediaKind.AUDIO, flags, tier, pts,
                                  float_to_pcm16(slot.audio), slot.turn))
            case HoldSlot():
                now = self.server.clock()
                for key, c in self._in_flight.items():
                    if key not in self._held and core.frames_until(c) <= 0:
                        self._held[key] = now
                enc = (video.static_packet(buf.needs_keyframe) if static
                       else await video.encode(slot.frame, force=buf.needs_keyframe))
                if enc is not None:
                    flags = FrameFlags.KEYFRAME if enc.keyframe else FrameFlags.NONE
                    buf.push(OutMedia(MediaKind.VIDEO, flags, tier, pts, enc.data, "~hold"))
                buf.push(OutMedia(MediaKind.AUDIO, FrameFlags.NONE, tier, pts, self._silence,
                                  "~hold"))
            case _:
                assert_never(slot)
        if done is not None:
            end = pts + 1_000_000 // fmt.fps
            self.resume_token = secrets.token_urlsafe(24)
            buf.push(OutMessage(done.model_copy(update={"pts_us": end,
                                                        "resume_token": self.resume_token})))
            self._turn_text.pop(done.turn, None)
            self._text_sent.discard(done.turn)
            self.server.metrics.turns.labels("completed").inc()
            self.server.metrics.turn_duration.observe(done.frames / fmt.fps)
            log.info("turn_done", turn_id=done.turn, frames=done.frames)
            self.observer.turn_finished(done.turn, "completed", core.last_turn_audio,
                                        fmt.rate, fmt.fps)
            if not self.superseded:
                await self.server.store.save(self._stored_light(),
                                             self.cfg.limits.resume_window_s)
            if core.idle:
                self.server.sessions_changed.set()  # a drain closes idle sessions first
        self._send_ready.set()
        self._progress.set()

    def _stored_light(self) -> StoredSession:
        """Snapshot between turns without touching the timeline's turn state."""
        assert self.core is not None
        seq = self.sendbuf.next_seq
        state: dict[str, Any] = {
            "timeline": self.core.timeline.state(include_turn=False),
            "idle_index": 0,
            "started_wall": self._started_wall,
            "video_seq": seq[MediaKind.VIDEO],
            "audio_seq": seq[MediaKind.AUDIO],
            "tier": self.tier,
        }
        return StoredSession(self.session_id, self.resume_token, self.principal.id,
                             self.core.avatar.id, state)

    # --- sender -----------------------------------------------------------

    async def _sender(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.server.metrics
        while True:
            await self._send_ready.wait()
            self._send_ready.clear()
            while (item := self.sendbuf.pop()) is not None:
                started = time.perf_counter()
                await self.ws.send(item)
                if isinstance(item, bytes) and item[0] == MediaKind.VIDEO:
                    now = loop.time()
                    if self._last_video_sent is not None:
                        m.inter_frame_interval.observe(now - self._last_video_sent)
                    self._last_video_sent = now
                    m.frames_sent.labels(str(item[2])).inc()
                    m.stage_duration.labels("send").observe(time.perf_counter() - started)
            self._progress.set()


class _SessionEnd(Exception):
    """The session ends normally (bye, fatal protocol error, client gone)."""
