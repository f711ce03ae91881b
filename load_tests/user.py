"""One simulated user: the asyncio shell around `SessionClient` and a `ConnectionProbe`.

A user connects (backoff with jitter), idles, then loops: speak a turn like a
TTS (paced or in bursts), maybe barge in, maybe lose the connection and
resume, think. Decisions come from `behaviour.plan_turn`; measurements from
the probe, fed every `PUMP_S` from what the client recorded (arrival times
are stamped by the client as frames arrive, so pumping late costs nothing).
Media the probe has seen is removed from the record to keep memory flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.exceptions import InvalidStatus, WebSocketException

from agent.client import Received, SessionClient, SessionRefused
from agent.protocol import FrameFlags
from load_tests.behaviour import TurnPlan, backoff_delay, initial_idle, plan_turn
from load_tests.config import LoadConfig
from load_tests.speech import SpeechBank
from load_tests.stats import ConnectionProbe, IdleCatalog, UserStats
from media.decode import VideoDecoder

PUMP_S = 0.1
# Refusals that retrying cannot fix: the run is misconfigured.
FATAL_REFUSALS = ("unauthorized", "unsupported", "not_found", "bad_request")
DECODE_BACKLOG = 32  # decode jobs queued at most; beyond it frames are skipped and counted


@dataclass
class UserContext:
    """What all users of a run share."""

    cfg: LoadConfig
    bank: SpeechBank
    t0: float  # run start, client monotonic seconds
    stop: asyncio.Event
    decode_pool: Executor | None
    catalog: IdleCatalog = field(default_factory=IdleCatalog)
    decode_pending: int = 0

    def hello(self) -> dict[str, Any]:
        cfg = self.cfg
        video: dict[str, Any] = {}
        if cfg.codec:
            video["codec"] = cfg.codec
        if cfg.max_height:
            video["max_height"] = cfg.max_height
        hello: dict[str, Any] = {"audio": {"rate": cfg.audio_rate}}
        if video:
            hello["video"] = video
        if cfg.avatar:
            hello["avatar"] = cfg.avatar
        if cfg.token:
            hello["token"] = cfg.token
        return hello


class SimulatedUser:
    def __init__(self, uid: int, ctx: UserContext) -> None:
        self.uid = uid
        self.ctx = ctx
        self.stats = UserStats(uid)
        self.rng = np.random.default_rng([ctx.cfg.seed, uid])
        self.client: SessionClient | None = None
        self.probe: ConnectionProbe | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._msg_index = 0
        self._decoder: VideoDecoder | None = None
        self._video_size = (0, 0, 3)  # (H, W, 3) the server says it sends now
        self._turn_open: str | None = None
        self._session: str | None = None
        self._resume_state: tuple[str, str, int | None] | None = None  # session, token, seq

    @property
    def connected(self) -> bool:
        return self.probe is not None

    def _rel(self, t: float | None = None) -> float:
        return (time.monotonic() if t is None else t) - self.ctx.t0

    # --- the conversation -----------------------------------------------------------

    async def run(self) -> None:
        persona = self.ctx.cfg.persona
        try:
            if not await self._connect(resume=False):
                return
            if await self._wait(initial_idle(self.rng, persona)) == "stop":
                return
            k = 0
            while not self.ctx.stop.is_set():
                k += 1
                plan = plan_turn(self.rng, persona)
                lost = await self._turn(f"u{self.uid}-t{k}", plan)
                if lost is None:
                    return  # stopped in the turn
                if lost or plan.drop == "think":
                    if not lost:
                        if await self._wait(plan.think_s * plan.drop_at) == "stop":
                            return
                        await self._drop()
                    if not await self._connect(resume=True):
                        return
                    think = plan.think_s * (1 - plan.drop_at)
                else:
                    think = plan.think_s
                if await self._think(think) == "stop":
                    return
        finally:
            await self._finish()

    async def _turn(self, turn: str, plan: TurnPlan) -> bool | None:
        """Speak one turn. True: the connection was lost (or dropped on purpose);
        None: the run stopped during the turn."""
        client, probe = self.client, self.probe
        assert client is not None and probe is not None
        utt = self.ctx.bank.utterance(self.rng, plan.seconds)
        rate = self.ctx.bank.rate
        seconds = len(utt.samples) / rate
        self._pump()
        probe.turn_sent(turn, time.monotonic())
        self._turn_open = turn
        speak = asyncio.create_task(client.speak(
            turn, utt.samples, rate, realtime=plan.realtime, text=utt.text,
            duration_ms=int(seconds * 1000)))
        body = asyncio.create_task(self._play(turn, plan, seconds, speak))
        stop = asyncio.create_task(self.ctx.stop.wait())
        try:
            await asyncio.wait({body, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not body.done():
                self.stats.counts["turns_cut_at_end"] += 1
                return None
            return body.result()
        except (ConnectionError, WebSocketException):
            self.stats.error("connection_lost", self._rel())
            await self._detach()
            self.client = None
            return True
        except TimeoutError:
            self.stats.error("turn_timeout", self._rel())
            return False
        finally:
            for task in (speak, body, stop):
                task.cancel()
            await asyncio.gather(speak, body, stop, return_exceptions=True)
            if turn in probe.done or client.record.close_code is not None:
                self._turn_open = None

    async def _play(self, turn: str, plan: TurnPlan, seconds: float,
                    speak: asyncio.Task[float]) -> bool:
        client, probe = self.client, self.probe
        assert client is not None and probe is not None
        share = plan.barge_in_at if plan.barge_in_at is not None else (
            plan.drop_at if plan.drop == "turn" else None)
        if share is not None:
            await client.wait_message("turn.started", timeout=10 + seconds, turn=turn)
            # Video plays in real time from its first frame: this is `share` of the turn.
            await asyncio.sleep(share * seconds)
            self._pump()
            if turn not in probe.done:
                speak.cancel()  # the TTS stops when the user barges in or the line drops
                if plan.barge_in_at is None:
                    await self._drop()
                    return True
                probe.interrupt_sent(time.monotonic())
                await client.send({"type": "interrupt"})
                await client.wait_message("turn.done", timeout=5, turn=turn)
                await self._until(lambda: probe.idle_after_interrupt, within=5,
                                  error="interrupt_idle_timeout")
                return False
        await speak
        await client.wait_message("turn.done", timeout=seconds + 10, turn=turn)
        return False

    async def _think(self, seconds: float) -> str:
        """The person talks to the bot: the avatar listens."""
        if seconds >= 0.5 and self.client is not None:
            with contextlib.suppress(WebSocketException):
                await self.client.send({"type": "listen.start"})
            outcome = await self._wait(seconds)
            if outcome == "time":
                with contextlib.suppress(WebSocketException):
                    await self.client.send({"type": "listen.end"})
            return outcome
        return await self._wait(seconds)

    # --- connections --------------------------------------------------------------

    async def _connect(self, *, resume: bool) -> bool:
        ctx = self.ctx
        attempt = 0
        while not ctx.stop.is_set():
            hello = ctx.hello()
            if resume and self._resume_state is not None:
                session, token, last_seq = self._resume_state
                hello["resume"] = {"session": session, "token": token}
                if last_seq is not None:
                    hello["resume"]["last_seq"] = last_seq
            hello["trace_id"] = f"load-u{self.uid}"
            started = time.monotonic()
            retry_after = 0.0
            try:
                client = await SessionClient.open(ctx.cfg.url, hello=hello, open_timeout=10)
            except SessionRefused as exc:
                code = str(exc.error.get("code"))
                self.stats.error(f"refused_{code}", self._rel())
                if code in FATAL_REFUSALS:
                    return False
                retry_after = float(exc.error.get("retry_after_ms", 0)) / 1000
            except InvalidStatus as exc:
                self.stats.error(f"http_{exc.response.status_code}", self._rel())
            except (OSError, TimeoutError):
                self.stats.error("connect_failed", self._rel())
            except WebSocketException:
                self.stats.error("closed_during_hello", self._rel())
            else:
                self._attach(client, started, resume)
                return True
            delay = backoff_delay(attempt, self.rng, retry_after_s=retry_after)
            attempt += 1
            if await self._wait(delay) == "stop":
                return False
        return False

    def _attach(self, client: SessionClient, started: float, resume: bool) -> None:
        now = time.monotonic()
        ready = client.record.ready
        s = self.stats
        s.counts["connections"] += 1
        if resume:
            s.resume_s.add(self._rel(started), now - started)
            s.counts["resumed" if ready.get("resumed") else "resume_refused"] += 1
        else:
            s.connect_s.add(self._rel(started), now - started)
        self.client = client
        self.probe = ConnectionProbe(s, ready, t0=self.ctx.t0, opened=now,
                                     catalog=self.ctx.catalog,
                                     playout_buffer_s=self.ctx.cfg.playout_buffer_s)
        self._session = ready["session"]
        self._msg_index = 0
        self._decoder = (VideoDecoder(ready["video"]["codec"])
                         if self.ctx.decode_pool is not None else None)
        # The picture size: ready's, then each `tier` message's that carries one.
        self._video_size = (ready["video"]["height"], ready["video"]["width"], 3)
        self._pump_task = asyncio.create_task(self._pump_loop())

    async def _detach(self) -> None:
        """Stop measuring this connection (before it is closed on purpose)."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
            self._pump_task = None
        if self.probe is not None and self.client is not None:
            self._pump()
            self._resume_state = (self._session or "", self.probe.resume_token,
                                  self.probe.last_video_seq)
            self.probe.closed(time.monotonic(), self.client.record.close_code)
        self.probe = None

    async def _drop(self) -> None:
        """Lose the connection abruptly (no close handshake), like a network failure."""
        client = self.client
        assert client is not None
        self.stats.counts["drops"] += 1
        await self._detach()
        client.ws.transport.abort()
        with contextlib.suppress(Exception):
            await client.close()
        self.client = None
        self._turn_open = None
        await self._wait(float(self.rng.uniform(0.2, 1.0)), stoppable=False)

    async def _finish(self) -> None:
        client = self.client
        if client is None:
            return
        await self._detach()
        self.client = None
        if client.record.close_code is not None:
            return
        try:
            if self._turn_open is not None:  # make bye quick: bye lets turns play out
                await client.send({"type": "interrupt"})
            await client.send({"type": "bye"})
            await client.wait_message("bye", timeout=5)
        except (TimeoutError, ConnectionError, WebSocketException):
            self.stats.counts["bye_failed"] += 1
        with contextlib.suppress(Exception):
            await client.close()

    # --- waiting and pumping --------------------------------------------------------

    async def _wait(self, seconds: float, *, stoppable: bool = True) -> str:
        """Sleep; "stop" when the run stops, "closed" when the connection ends
        (it then resumes), else "time"."""
        waits: dict[asyncio.Future[Any], str] = {}
        if stoppable:
            waits[asyncio.ensure_future(self.ctx.stop.wait())] = "stop"
        if self.client is not None:
            waits[asyncio.ensure_future(self.client.ws.wait_closed())] = "closed"
        if not waits:
            await asyncio.sleep(seconds)
            return "time"
        done, pending = await asyncio.wait(waits, timeout=max(0.0, seconds),
                                           return_when=asyncio.FIRST_COMPLETED)
        for fut in pending:
            fut.cancel()
        outcome = "time" if not done else waits[next(iter(done))]
        if outcome == "closed" and not self.ctx.stop.is_set():
            self.stats.error("connection_lost", self._rel())
            await self._detach()
            self.client = None
            if not await self._connect(resume=True):
                return "stop"
        return outcome

    async def _until(self, predicate: Callable[[], bool], *, within: float,
                     error: str) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                self.stats.error(error, self._rel())
                return
            await asyncio.sleep(PUMP_S / 2)
            self._pump()

    async def _pump_loop(self) -> None:
        while True:
            await asyncio.sleep(PUMP_S)
            self._pump()

    def _pump(self) -> None:
        """Feed the probe what arrived since the last pump, in arrival order."""
        client, probe = self.client, self.probe
        if client is None or probe is None:
            return
        rec = client.record
        messages = rec.messages[self._msg_index:]
        self._msg_index = len(rec.messages)
        # The client appends to whatever list the record holds: swap in fresh ones.
        video, rec.video = rec.video, []
        audio, rec.audio = rec.audio, []
        events: list[tuple[float, int, Any]] = [(t, 0, m) for t, m in messages]
        events += [(v.arrival, 1, v) for v in video]
        events += [(a.arrival, 2, a) for a in audio]
        events.sort(key=lambda e: (e[0], e[1]))
        for t, kind, item in events:
            if kind == 0:
                probe.on_message(item, t)
                if item.get("type") == "tier" and item.get("video"):
                    self._video_size = (item["video"]["height"], item["video"]["width"], 3)
            elif kind == 1:
                probe.on_video(item.header, item.payload, t)
                self._maybe_decode(item)
            else:
                probe.on_audio(item.header, t)

    def _maybe_decode(self, item: Received) -> None:
        ctx, decoder = self.ctx, self._decoder
        if ctx.decode_pool is None or decoder is None:
            return
        if ctx.cfg.decode == "keyframes" and not item.header.flags & FrameFlags.KEYFRAME:
            return
        if ctx.decode_pending >= DECODE_BACKLOG:
            self.stats.counts["decode_skipped"] += 1
            return
        ctx.decode_pending += 1
        fut = asyncio.get_running_loop().run_in_executor(
            ctx.decode_pool, _decode, decoder, item.payload, self._video_size)
        fut.add_done_callback(self._decoded)

    def _decoded(self, fut: asyncio.Future[str | None]) -> None:
        self.ctx.decode_pending -= 1
        if fut.cancelled():
            return
        error = "decode_failed" if fut.exception() is not None else fut.result()
        if error is None:
            self.stats.counts["decoded"] += 1
        else:
            self.stats.error(error, self._rel())


def _decode(decoder: VideoDecoder, payload: bytes, size: tuple[int, int, int]) -> str | None:
    """Runs in the decode thread. None when the payload decodes to the announced size."""
    try:
        pictures = decoder.decode(payload)
    except ValueError:
        return "decode_error"
    if len(pictures) != 1 or pictures[0].shape != size:
        return "decode_bad_picture"
    return None
