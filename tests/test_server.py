"""The real server on 127.0.0.1 port 0, talked to with the real websockets client."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from agent.client import SessionClient, SessionRecord, SessionRefused
from agent.protocol import FrameFlags, MediaKind
from agent.server import AgentServer
from media.audio import pcm16_to_float
from media.decode import VideoDecoder
from media.types import Frame
from tests.conftest import timeout
from tests.serverutil import running_server, small_config, speech_like

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture
async def server(avatar_dir: Path) -> AsyncIterator[AgentServer]:
    async with running_server(small_config(avatar_dir)) as srv:
        yield srv


def http_get(server: AgentServer, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


async def get(server: AgentServer, path: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, server, path)


def speech_frames(rec: SessionRecord) -> list[int]:
    return [v.header.seq for v in rec.video if v.header.flags & FrameFlags.SPEECH]


async def test_http_endpoints(server: AgentServer) -> None:
    assert (await get(server, "/healthz"))[0] == 200
    assert (await get(server, "/readyz"))[0] == 200
    status, ctype, body = await get(server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "avatar_active_sessions 0.0" in body
    status, ctype, body = await get(server, "/v1/avatars")
    assert ctype == "application/json"
    (avatar,) = json.loads(body)["avatars"]
    assert (avatar["id"], avatar["width"], avatar["height"], avatar["fps"]) == (
        "default", 128, 128, 25)
    assert (await get(server, "/nope"))[0] == 404
    assert (await get(server, "/web/../agent/server.py"))[0] == 404


async def test_readyz_is_503_while_warming_up(avatar_dir: Path) -> None:
    server = AgentServer(small_config(avatar_dir))
    started = asyncio.Event()
    original = server.renderer.warmup

    def slow_warmup() -> None:
        started.set()
        import time

        time.sleep(0.5)
        original()

    server.renderer.warmup = slow_warmup  # type: ignore[method-assign]
    await server.start()
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert (await get(server, "/healthz"))[0] == 200
        assert (await get(server, "/readyz"))[0] == 503
        await server.wait_ready()
        assert (await get(server, "/readyz"))[0] == 200
    finally:
        await server.close()


async def test_hello_ready_and_idle_video(server: AgentServer) -> None:
    client = await SessionClient.open(server.url, hello={"avatar": "default"})
    ready = client.record.ready
    assert ready["video"] == {"codec": "h264", "fps": 25, "width": 128, "height": 128}
    assert ready["audio"] == {"rate": 16000} and ready["tier"] == 1
    assert ready["session"] and ready["resume_token"]
    await client.wait_for(lambda r: len(r.video) >= 30, timeout(5))
    rec = client.record
    await client.close()
    video, audio = rec.video[:30], rec.audio[:30]
    assert [v.header.seq for v in video] == list(range(30))
    assert [a.header.seq for a in audio] == list(range(30))
    pts = [v.header.pts_us for v in video]
    assert all(b - a == 40_000 for a, b in zip(pts, pts[1:], strict=False))
    assert video[0].header.flags & FrameFlags.KEYFRAME
    assert not any(v.header.flags & FrameFlags.SPEECH for v in video)
    # Silence while idle: 640 zero samples per frame at 16 kHz.
    assert all(a.payload == bytes(1280) for a in audio)
    # Paced in real time, never more than 0.5 s ahead of its pts.
    t0 = video[0].arrival - pts[0] / 1e6
    assert all(v.arrival - t0 >= v.header.pts_us / 1e6 - 0.5 - 0.02 for v in video)
    span = video[-1].arrival - video[0].arrival
    assert span == pytest.approx(29 * 0.04, abs=0.25)
    # The idle video is alive and decodes.
    decoder = VideoDecoder("h264")
    pictures = [p for v in video for p in decoder.decode(v.payload)]
    assert len(pictures) == 30
    assert pictures[0].shape == (128, 128, 3)
    assert max(float(np.abs(p.astype(int) - pictures[0]).mean()) for p in pictures) > 0.3


async def test_turn_streams_speech_with_its_audio(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    rate = 16000
    audio = speech_like(1.5, rate)
    await client.speak("t1", audio, rate, text="hello there")
    done = await client.wait_message("turn.done", timeout(10), turn="t1")
    started = client.messages("turn.started")[0]
    await client.wait_for(lambda r: any(v.header.seq > started["seq"] + done["frames"]
                                        for v in r.video), timeout(5))
    rec = client.record
    await client.close()
    assert started["turn"] == "t1" and not done["interrupted"]
    assert done["resume_token"]
    turn = [v for v in rec.video if started["seq"] <= v.header.seq < started["seq"]
            + done["frames"]]
    assert turn[0].header.pts_us == started["pts_us"]
    assert turn[0].header.flags & FrameFlags.KEYFRAME
    assert turn[-1].header.flags & FrameFlags.LAST_OF_TURN
    assert done["pts_us"] == turn[-1].header.pts_us + 40_000
    n_speech = sum(1 for v in turn if v.header.flags & FrameFlags.SPEECH)
    assert n_speech == int(np.ceil(len(audio) / 640))
    # Frames after the speech converge to neutral (not speech) within the turn.
    assert done["frames"] > n_speech
    # The same audio comes back, aligned with the speech frames' pts.
    by_pts = {a.header.pts_us: a for a in rec.audio}
    speech_video = [v for v in turn if v.header.flags & FrameFlags.SPEECH]
    echoed = np.concatenate([pcm16_to_float(by_pts[v.header.pts_us].payload)
                             for v in speech_video])
    assert np.abs(echoed[: len(audio)] - audio).max() < 2e-4
    assert all(by_pts[v.header.pts_us].header.flags & FrameFlags.SPEECH for v in speech_video)
    # Idle resumes after the turn with a keyframe.
    after = [v for v in rec.video if v.header.seq >= started["seq"] + done["frames"]]
    assert after and after[0].header.flags & FrameFlags.KEYFRAME
    assert not after[0].header.flags & FrameFlags.SPEECH
    # The whole stream decodes without error.
    decoder = VideoDecoder("h264")
    assert sum(len(decoder.decode(v.payload)) for v in rec.video) == len(rec.video)


async def test_first_speech_frame_comes_before_speak_end(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    audio = speech_like(3.0, 16000)
    speaking = asyncio.create_task(client.speak("t1", audio, 16000, end=False))
    await client.wait_for(lambda r: bool(speech_frames(r)), timeout(3))
    assert not speaking.done()  # still streaming: rendering started before the end
    await speaking
    await client.send({"type": "speak.end", "turn": "t1"})
    await client.wait_message("turn.done", timeout(10), turn="t1")
    await client.close()


async def test_interrupt_stops_current_and_queued_turns(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    audio = speech_like(4.0, 16000)
    await client.speak("t1", audio, 16000, realtime=0)
    await client.speak("t2", audio[:16000], 16000, realtime=0)
    await client.wait_for(lambda r: len(speech_frames(r)) >= 10, timeout(5))
    await client.send({"type": "interrupt"})
    d1 = await client.wait_message("turn.done", timeout(3), turn="t1")
    d2 = await client.wait_message("turn.done", timeout(3), turn="t2")
    assert d1["interrupted"] and d2["interrupted"] and d2["frames"] == 0
    assert 10 <= d1["frames"] < 100
    stop_pts = d1["pts_us"]
    await client.wait_for(
        lambda r: any(v.header.pts_us >= stop_pts + 600_000 for v in r.video), timeout(3))
    rec = client.record
    await client.close()
    later = [v for v in rec.video if v.header.pts_us >= stop_pts]
    # No speech after the interrupt point, and idle (neutral) within 0.5 s of video.
    assert not any(v.header.flags & FrameFlags.SPEECH for v in later)
    starts = client.messages("turn.started")
    assert [s["turn"] for s in starts] == ["t1"]
    decoder = VideoDecoder("h264")
    assert sum(len(decoder.decode(v.payload)) for v in rec.video) == len(rec.video)


async def test_queued_turns_play_in_order(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    a = speech_like(0.6, 16000, seed=1)
    await client.speak("a", a, 16000, realtime=0)
    await client.speak("b", a, 16000, realtime=0)
    await client.wait_message("turn.done", timeout(10), turn="b")
    starts = [m["turn"] for m in client.messages("turn.started")]
    dones = client.messages("turn.done")
    await client.close()
    assert starts == ["a", "b"]
    assert [d["turn"] for d in dones] == ["a", "b"]
    assert dones[0]["pts_us"] <= client.messages("turn.started")[1]["pts_us"]


async def test_ping_bye_and_close_code(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    await client.send({"type": "ping", "id": 7})
    assert (await client.wait_message("pong", timeout(2)))["id"] == 7
    await client.send({"type": "bye"})
    await client.wait_message("bye", timeout(5))
    await client._task
    assert client.record.close_code == 1000


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ('{"type":"dance"}', "bad_request"),
        ("not json", "bad_request"),
        ('{"type":"speak.end","turn":"zz"}', "bad_request"),
        ('{"type":"hello"}', "bad_request"),
    ],
)
async def test_bad_messages_get_errors_and_the_session_goes_on(
    server: AgentServer, message: str, code: str
) -> None:
    client = await SessionClient.open(server.url)
    await client.ws.send(message)
    err = await client.wait_message("error", timeout(2))
    assert err["code"] == code and err["fatal"] is False
    await client.send({"type": "ping", "id": 1})
    await client.wait_message("pong", timeout(2), id=1)
    await client.close()


async def test_audio_outside_a_turn_and_bad_binary(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    await client.send_audio(np.zeros(320, np.float32))
    err = await client.wait_message("error", timeout(2))
    assert "outside a turn" in err["message"]
    await client.ws.send(b"\x02\x00")
    await client.wait_for(lambda r: len(client.messages("error")) == 2, timeout(2))
    assert "16-byte header" in client.messages("error")[1]["message"]
    await client.send({"type": "speak.start", "turn": "t"})
    await client.ws.send(bytes([2, 0, 0, 0]) + bytes(12) + b"\x01")  # odd PCM byte count
    await client.wait_for(lambda r: len(client.messages("error")) == 3, timeout(2))
    await client.close()


async def test_first_message_must_be_hello(server: AgentServer) -> None:
    async with connect(server.url) as ws:
        await ws.send('{"type":"ping","id":1}')
        err = json.loads(await ws.recv())
        assert err["code"] == "bad_request" and err["fatal"]
        await ws.wait_closed()
        assert ws.close_code == 1008


async def test_message_too_big_closes_1009(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    await client.ws.send(bytes(2 << 20))
    await client._task
    assert client.record.close_code == 1009


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        ({"audio": {"rate": 8000}}, "unsupported"),
        ({"video": {"fps": 30}}, "unsupported"),
        ({"avatar": "nobody"}, "not_found"),
        ({"avatar": "../etc"}, "not_found"),
        ({"v": 2}, "unsupported"),
    ],
)
async def test_bad_hello_is_refused(server: AgentServer, hello: dict[str, object],
                                    code: str) -> None:
    with pytest.raises(SessionRefused) as info:
        await SessionClient.open(server.url, hello=hello)
    assert info.value.error["code"] == code
    assert info.value.close_code == 1008


async def test_max_sessions_refuses_with_1013(avatar_dir: Path) -> None:
    async with running_server(small_config(avatar_dir, **{"server.max_sessions": 1})) as srv:
        first = await SessionClient.open(srv.url)
        with pytest.raises(SessionRefused) as info:
            await SessionClient.open(srv.url)
        assert info.value.error["code"] == "overloaded"
        assert info.value.error["retry_after_ms"] > 0
        assert info.value.close_code == 1013
        await first.close()


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
async def test_other_audio_rates_round_trip(server: AgentServer, rate: int) -> None:
    client = await SessionClient.open(server.url, hello={"audio": {"rate": rate}})
    assert client.record.ready["audio"]["rate"] == rate
    audio = speech_like(0.8, rate)
    await client.speak("t1", audio, rate, realtime=0)
    done = await client.wait_message("turn.done", timeout(10), turn="t1")
    start = client.messages("turn.started")[0]
    await client.close()
    rec = client.record
    spf = rate // 25
    turn_audio = [a for a in rec.audio
                  if start["pts_us"] <= a.header.pts_us < done["pts_us"]]
    assert all(len(a.payload) == 2 * spf for a in turn_audio)
    echoed = np.concatenate([pcm16_to_float(a.payload) for a in turn_audio])
    assert np.abs(echoed[: len(audio)] - audio).max() < 2e-4


async def test_jpeg_codec(server: AgentServer) -> None:
    client = await SessionClient.open(server.url, hello={"video": {"codec": "jpeg"}})
    await client.wait_for(lambda r: len(r.video) >= 5, timeout(3))
    await client.close()
    decoder = VideoDecoder("jpeg")
    for v in client.record.video[:5]:
        assert v.payload[:2] == b"\xff\xd8"
        assert v.header.flags & FrameFlags.KEYFRAME
        (picture,) = decoder.decode(v.payload)
        assert picture.shape == (128, 128, 3)


async def test_resume_continues_the_session(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    await client.speak("t1", speech_like(0.5, 16000), 16000, realtime=0)
    done = await client.wait_message("turn.done", timeout(10), turn="t1")
    session = client.record.ready["session"]
    token = done["resume_token"]
    last_seq = client.record.video[-1].header.seq
    await client.ws.close()  # connection lost
    await client._task
    await asyncio.sleep(0.1)
    again = await SessionClient.open(
        server.url, hello={"resume": {"session": session, "token": token, "last_seq": last_seq}})
    ready = again.record.ready
    assert ready["session"] == session and ready["resumed"] is True
    assert ready["resume_token"] != token
    await again.wait_for(lambda r: len(r.video) >= 3, timeout(3))
    assert again.record.video[0].header.seq > last_seq
    assert again.record.video[0].header.flags & FrameFlags.KEYFRAME
    await again.speak("t2", speech_like(0.5, 16000), 16000, realtime=0)
    await again.wait_message("turn.done", timeout(10), turn="t2")
    await again.close()
    # A stale token is refused and a fresh session starts.
    fresh = await SessionClient.open(
        server.url, hello={"resume": {"session": session, "token": token}})
    assert fresh.messages("error")[0]["code"] == "resume_failed"
    assert fresh.record.ready["session"] != session
    await fresh.close()


async def test_metrics_move_after_a_turn(server: AgentServer) -> None:
    client = await SessionClient.open(server.url)
    await client.speak("t1", speech_like(0.5, 16000), 16000, realtime=0)
    await client.wait_message("turn.done", timeout(10), turn="t1")
    _, _, body = await get(server, "/metrics")
    await client.close()
    assert 'avatar_turns_total{outcome="completed"} 1.0' in body
    assert "avatar_time_to_first_frame_seconds_count 1.0" in body
    assert 'avatar_chunks_total{outcome="ok"}' in body
    frames_line = next(line for line in body.splitlines()
                       if line.startswith('avatar_frames_sent_total{tier="1"}'))
    assert float(frames_line.split()[-1]) > 10
    assert MediaKind.VIDEO == 1


async def test_shared_video_outlives_a_waiter_that_leaves(server: AgentServer) -> None:
    """The first session to need a video encodes it for every session; leaving while it
    encodes (its task cancelled) neither stops the encode nor loses it for the next one."""
    avatar = server.avatars.get("default")
    calls = 0

    def frames() -> list[Frame]:
        nonlocal calls
        calls += 1
        return [server.neutral_picture(avatar)] * 3

    key = ("test", avatar.id, "h264", 64, 64)
    leaver = asyncio.create_task(server._shared_video(key, frames, avatar.fps))
    await asyncio.sleep(0)  # the encode has started
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    packets = await server._shared_video(key, frames, avatar.fps)
    assert len(packets) == 3 and calls == 1  # the same encode, finished for the stayer
    assert await server._shared_video(key, frames, avatar.fps) is packets


async def test_a_failed_warmup_says_why_and_exits_non_zero(
    avatar_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A renderer that cannot warm up (a broken compiled artifact, say): /readyz says
    'failed', and `serve` prints the reason and exits 1 instead of waiting forever."""
    server = AgentServer(small_config(avatar_dir))

    def broken_warmup() -> None:
        raise RuntimeError("artifact.pt2: the loader fails on it")

    server.renderer.warmup = broken_warmup  # type: ignore[method-assign]
    code = await asyncio.wait_for(server.serve_forever(), 20)
    assert code == 1
    assert "start-up failed: artifact.pt2: the loader fails on it" in capsys.readouterr().err

    again = AgentServer(small_config(avatar_dir))
    again.renderer.warmup = broken_warmup  # type: ignore[method-assign]
    await again.start()
    try:
        with pytest.raises(RuntimeError, match="loader fails"):
            await again.wait_ready()
        status, _, body = await get(again, "/readyz")
        assert (status, body) == (503, "failed\n")
    finally:
        await again.close()
