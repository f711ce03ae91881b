"""A protocol client: the CLI `client` verb, tests and the load tester all use it.

`SessionClient` opens a session, streams turns of audio like a TTS would,
records everything the server sends with arrival times, and can wait for a
message. `run_client` speaks one WAV file and writes what came back to MP4.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from agent.protocol import (
    FrameFlags,
    MediaHeader,
    MediaKind,
    pack_media,
    unpack_media,
)
from agent.retry import BackoffPolicy, Retry, after_close
from media.audio import float_to_pcm16


@dataclass(frozen=True, slots=True)
class Received:
    header: MediaHeader
    payload: bytes
    arrival: float  # client monotonic time


@dataclass
class SessionRecord:
    ready: dict[str, Any] = field(default_factory=dict)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    video: list[Received] = field(default_factory=list)
    audio: list[Received] = field(default_factory=list)
    close_code: int | None = None

    @property
    def resume_token(self) -> str | None:
        """The newest resume token received (ready, then turn.done or goaway)."""
        for _, m in reversed(self.messages):
            if m.get("type") in ("turn.done", "goaway") and m.get("resume_token"):
                return str(m["resume_token"])
        token = self.ready.get("resume_token")
        return str(token) if token else None

    def resume_hello(self) -> dict[str, Any]:
        """The `resume` object of a hello that continues this session."""
        resume: dict[str, Any] = {"session": self.ready["session"], "token": self.resume_token}
        if self.video:
            resume["last_seq"] = self.video[-1].header.seq
        return resume


class SessionClient:
    def __init__(self, ws: ClientConnection, record: SessionRecord,
                 hello: dict[str, Any] | None = None) -> None:
        self.ws = ws
        self.record = record
        self.hello = dict(hello or {})  # as sent, for reconnects
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._recv())
        self._audio_seq = 0

    @classmethod
    async def open(cls, url: str, *, hello: dict[str, Any] | None = None,
                   open_timeout: float = 10.0, **connect_kwargs: Any) -> SessionClient:
        """Connect, send hello and wait for ready (raises SessionRefused on an error)."""
        ws = await connect(url, compression=None, open_timeout=open_timeout,
                           max_size=None, **connect_kwargs)
        msg = {"type": "hello", "v": 1, **(hello or {})}
        await ws.send(json.dumps(msg))
        record = SessionRecord()
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                continue
            data = json.loads(raw)
            if data["type"] == "ready":
                record.ready = data
                break
            if data["type"] == "error" and data.get("fatal"):
                await ws.wait_closed()
                raise SessionRefused(data, ws.close_code)
            record.messages.append((time.monotonic(), data))
        return cls(ws, record, hello)

    @classmethod
    async def open_with_retry(cls, url: str, *, hello: dict[str, Any] | None = None,
                              policy: BackoffPolicy | None = None,
                              rng: random.Random | None = None,
                              **open_kwargs: Any) -> SessionClient:
        """`open`, trying again with exponential backoff and full jitter while the server
        is overloaded (1013, honouring `retry_after_ms`) or unreachable. Raises the last
        error once `policy.max_attempts` attempts failed, or at once for a refusal that
        retrying cannot fix (bad token, bad hello)."""
        policy = policy or BackoffPolicy()
        rng = rng or random.Random()
        attempt = 0
        while True:
            try:
                return await cls.open(url, hello=hello, **open_kwargs)
            except SessionRefused as exc:
                if after_close(exc.close_code) is Retry.NO:
                    raise
                error: BaseException = exc
                hint = int(exc.error.get("retry_after_ms") or 0)
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                error, hint = exc, 0
            attempt += 1
            if policy.gives_up(attempt):
                raise error
            await asyncio.sleep(policy.delay(attempt - 1, rng.random(), hint))

    async def reconnect(self, url: str, *, policy: BackoffPolicy | None = None,
                        rng: random.Random | None = None, **open_kwargs: Any
                        ) -> SessionClient:
        """After this connection ended: resume the session (on `url`, which may lead to
        another instance) as its close code says, with backoff and full jitter. Raises
        ConnectionError when the close code says not to come back."""
        code = self.record.close_code
        if after_close(code) is Retry.NO:
            raise ConnectionError(f"the session ended with close code {code}; not resuming")
        policy = policy or BackoffPolicy()
        rng = rng or random.Random()
        await asyncio.sleep(policy.delay(0, rng.random()))
        hello = {**self.hello, "resume": self.record.resume_hello()}
        return await SessionClient.open_with_retry(url, hello=hello, policy=policy, rng=rng,
                                                   **open_kwargs)

    async def _recv(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                if isinstance(raw, bytes):
                    header, payload = unpack_media(raw)
                    item = Received(header, bytes(payload), now)
                    (self.record.video if header.kind == MediaKind.VIDEO
                     else self.record.audio).append(item)
                else:
                    self.record.messages.append((now, json.loads(raw)))
                async with self._changed:
                    self._changed.notify_all()
        except Exception:  # the connection ended; the close code says how
            pass
        finally:
            self.record.close_code = self.ws.close_code
            async with self._changed:
                self._changed.notify_all()

    # A timeout argument is this helper's point (tests and the load tester wait on it).
    async def wait_for(self, predicate: Callable[[SessionRecord], bool],
                       timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: predicate(self.record) or self._task.done())
            if not predicate(self.record):
                raise ConnectionError(f"connection closed ({self.record.close_code}) "
                                      "before the condition held")

        await asyncio.wait_for(_wait(), timeout)

    async def wait_message(self, type_: str, timeout: float = 10.0,  # noqa: ASYNC109
                           **match: Any) -> dict[str, Any]:
        def find(rec: SessionRecord) -> dict[str, Any] | None:
            for _, m in rec.messages:
                if m.get("type") == type_ and all(m.get(k) == v for k, v in match.items()):
                    return m
            return None

        await self.wait_for(lambda r: find(r) is not None, timeout)
        found = find(self.record)
        assert found is not None
        return found

    def messages(self, type_: str) -> list[dict[str, Any]]:
        return [m for _, m in self.record.messages if m.get("type") == type_]

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def send_audio(self, samples: np.ndarray) -> None:
        header = MediaHeader(MediaKind.AUDIO, FrameFlags.NONE, 0, self._audio_seq, 0)
        self._audio_seq += 1
        await self.ws.send(pack_media(header, float_to_pcm16(samples.astype(np.float32))))

    async def speak(self, turn: str, samples: np.ndarray, rate: int, *, realtime: float = 1.0,
                    frame_ms: int = 20, end: bool = True, **start_fields: Any) -> float:
        """Stream one turn like a TTS: speak.start, audio every `frame_ms` (at `realtime`
        times real time; 0 sends at once), speak.end. Returns when the first audio went out."""
        await self.send({"type": "speak.start", "turn": turn, **start_fields})
        step = rate * frame_ms // 1000
        t0 = time.monotonic()
        first = t0
        for i, start in enumerate(range(0, len(samples), step)):
            if realtime > 0:
                due = t0 + i * frame_ms / 1000 / realtime
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.send_audio(samples[start : start + step])
        if end:
            await self.send({"type": "speak.end", "turn": turn})
        return first

    async def close(self) -> None:
        await self.ws.close()
        await self._task


class SessionRefused(Exception):
    def __init__(self, error: dict[str, Any], close_code: int | None) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')} (close {close_code})")
        self.error = error
        self.close_code = close_code


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of a 16-bit PCM WAV (stereo is averaged)."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM WAV is supported "
                                 f"(got {8 * w.getsampwidth()}-bit); convert it, e.g. "
                                 "`sox in.wav -b 16 out.wav`")
            raw = w.readframes(w.getnframes())
            channels, rate = w.getnchannels(), w.getframerate()
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a readable WAV file ({exc})") from None
    pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    return pcm, rate


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def speak_wav(url: str, wav: Path, out: Path | None, *, codec: str, token: str | None,
                    avatar: str | None, text: str | None) -> dict[str, float]:
    from media.audio import StreamResampler

    samples, rate = read_wav(wav)
    if rate not in (16000, 22050, 24000, 44100, 48000):
        rs = StreamResampler(rate, 16000)
        samples = np.concatenate([rs.push(samples), rs.flush()])
        rate = 16000
    hello: dict[str, Any] = {"video": {"codec": codec}, "audio": {"rate": rate}}
    if token:
        hello["token"] = token
    if avatar:
        hello["avatar"] = avatar
    client = await SessionClient.open_with_retry(url, hello=hello)
    rec = client.record
    await asyncio.sleep(0.3)  # a little idle video before speaking
    fields: dict[str, Any] = {"text": text} if text else {}
    first_audio = await client.speak("t1", samples, rate, **fields)
    done = await client.wait_message("turn.done", timeout=len(samples) / rate + 30, turn="t1")
    await asyncio.sleep(0.5)
    await client.send({"type": "bye"})
    await client.wait_message("bye", timeout=10)
    await client.close()
    speech = [v for v in rec.video if v.header.flags & FrameFlags.SPEECH]
    ttff = speech[0].arrival - first_audio if speech else float("nan")
    gaps = [b.arrival - a.arrival for a, b in zip(rec.video, rec.video[1:], strict=False)]
    if out is not None:
        write_recording(rec, out)
    return {
        "frames": float(len(rec.video)),
        "turn_frames": float(done["frames"]),
        "ttff_s": ttff,
        "gap_p50_s": percentile(gaps, 50),
        "gap_p95_s": percentile(gaps, 95),
        "gap_max_s": max(gaps) if gaps else float("nan"),
    }


def write_recording(rec: SessionRecord, out: Path) -> None:
    """Decode what was received and mux it into an MP4 a person can watch."""
    from media.decode import VideoDecoder
    from media.mux import Mp4Writer

    video = rec.ready["video"]
    rate = rec.ready["audio"]["rate"]
    decoder = VideoDecoder(video["codec"])
    writer = Mp4Writer(out, video["fps"], video["width"], video["height"], rate)
    try:
        first_pts = rec.video[0].header.pts_us if rec.video else 0
        for item in rec.video:
            for picture in decoder.decode(item.payload):
                writer.write_video(picture, pts_us=item.header.pts_us - first_pts)
        writer.write_audio(b"".join(a.payload for a in rec.audio))
    finally:
        writer.close()


def run_client(url: str, wav: Path, out: Path | None, *, codec: str, token: str | None,
               avatar: str | None, text: str | None) -> int:
    from websockets.exceptions import InvalidURI, WebSocketException

    try:
        stats = asyncio.run(speak_wav(url, wav, out, codec=codec, token=token, avatar=avatar,
                                      text=text))
    except ValueError as exc:
        print(f"client: {exc}")
        return 2
    except SessionRefused as exc:
        print(f"client: the server refused the session: {exc}")
        return 1
    except (OSError, InvalidURI, WebSocketException, TimeoutError, ConnectionError) as exc:
        print(f"client: cannot talk to {url}: {exc!r}. Is the server running "
              "(python -m agent serve)?")
        return 1
    print(f"received {int(stats['frames'])} video frames ({int(stats['turn_frames'])} in the turn)")
    print(f"time to first speech frame: {stats['ttff_s'] * 1000:.0f} ms")
    print(f"inter-frame gap p50 {stats['gap_p50_s'] * 1000:.1f} ms, "
          f"p95 {stats['gap_p95_s'] * 1000:.1f} ms, max {stats['gap_max_s'] * 1000:.1f} ms")
    if out is not None:
        print(f"wrote {out}")
    return 0
