"""Faults through the real server: chaos in the primary renderer, tiers, drain, admission,
slow clients, the leak guard and client reconnects. Real server on 127.0.0.1 port 0, real
websockets client, small avatar; short timeouts and stable periods keep it fast."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from agent.chaos import ChaosRenderer, ChaosSpec
from agent.client import SessionClient, SessionRecord, SessionRefused
from agent.config import AgentConfig
from agent.protocol import FrameFlags, MediaHeader, MediaKind, unpack_media
from agent.retry import BackoffPolicy
from agent.server import AgentServer
from media.cpu_renderer import CpuRenderer
from media.decode import VideoDecoder
from sessions.store import MemorySessionStore
from tests.conftest import timeout
from tests.serverutil import running_server, server_process, small_config, speech_like

pytestmark = pytest.mark.integration

RENDER_TIMEOUT_S = 1.0
CHUNK_S = 8 / 25  # the CPU renderer's chunk
FAST = {
    "engine.render_timeout_s": RENDER_TIMEOUT_S,
    "breaker.open_s": 0.3,
    "breaker.max_open_s": 0.6,
    "degradation.stable_s": 1.0,
}


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


def config(avatar_dir: Path, **overrides: Any) -> AgentConfig:
    return small_config(avatar_dir, **{**FAST, **overrides})


def gaps(rec: SessionRecord) -> np.ndarray:
    return np.diff([v.arrival for v in rec.video])


def tier_messages(client: SessionClient) -> list[tuple[float, dict[str, Any]]]:
    return [(t, m) for t, m in client.record.messages if m.get("type") == "tier"]


def metric(server: AgentServer, line_start: str) -> float:
    body = server.metrics.render().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines()
               if line.startswith(line_start))


@pytest.mark.parametrize(
    ("spec", "signal_metric"),
    [
        ("hang=1.0", 'avatar_errors_total{type="model_timeout"}'),
        ("error=1.0", 'avatar_errors_total{type="model_error"}'),
        ("oom=1.0", 'avatar_chunks_total{outcome="fallback"}'),
        ("corrupt=1.0", "avatar_frame_validation_failures_total"),
        ("delay_ms=900", "avatar_chunk_deadline_misses_total"),
    ],
    ids=["hang", "error", "oom", "corrupt", "delay"],
)
async def test_chaos_fault_never_stalls_drops_the_tier_and_recovers(
    avatar_dir: Path, spec: str, signal_metric: str
) -> None:
    # A slow renderer is slow, not broken: give it time to finish (no timeouts).
    slow = {"engine.render_timeout_s": 3.0} if spec.startswith("delay") else {}
    async with running_server(config(avatar_dir, **{"engine.chaos": spec, **slow})) as srv:
        assert srv.chaos is not None
        client = await SessionClient.open(srv.url)
        audio = speech_like(2.0, 16000, seed=1)
        first_audio = await client.speak("t1", audio, 16000, text="the weather is fine")
        await client.wait_message("turn.done", timeout(20), turn="t1")
        # The tier dropped, soon enough: within the render timeout plus one chunk of the
        # first chunk's audio being in (it needs one chunk of audio plus look-ahead).
        (at, drop), *_ = tier_messages(client)
        assert drop["tier"] == 2 and drop["reason"]
        assert drop["video"]["height"] == 64  # tier 2 halves the picture
        if not spec.startswith("delay"):
            budget = CHUNK_S + 0.02 + RENDER_TIMEOUT_S + CHUNK_S
            assert at - first_audio <= budget + timeout(0.5)
        assert metric(srv, signal_metric) >= 1
        # Lift the fault: the breaker's probe closes it and the session steps back up.
        # (A session at tier 2 renders on the fallback and may have stepped up already,
        # to meet the fault again: the ladder then waits longer before the next try.)
        srv.chaos.set_spec(ChaosSpec())

        def stepped_up(rec: SessionRecord) -> bool:
            return bool([m for _, m in rec.messages if m.get("type") == "tier"][-1]["tier"] == 1)

        await client.wait_for(stepped_up, timeout(12))
        assert tier_messages(client)[-1][1]["video"]["height"] == 128
        await client.speak("t2", speech_like(0.8, 16000, seed=2), 16000, realtime=0)
        done2 = await client.wait_message("turn.done", timeout(10), turn="t2")
        await client.close()
    rec = client.record
    # Never stalled: frames kept coming at the frame rate the whole time.
    g = gaps(rec)
    assert np.percentile(g, 95) < 0.1 and g.max() < 0.5
    # Every speech frame of the faulty turn was sent (rendered or stood in for).
    start1 = client.messages("turn.started")[0]
    speech1 = [v for v in rec.video if v.header.flags & FrameFlags.SPEECH
               and v.header.seq < start1["seq"] + 200 and v.header.pts_us < done2["pts_us"]]
    assert len(speech1) >= int(np.ceil(len(audio) / 640))
    # Frames carry their tier; the stream decodes across both size changes.
    tiers = {v.header.tier for v in rec.video}
    assert tiers == {1, 2}
    decoder = VideoDecoder("h264")
    sizes = {p.shape[:2] for v in rec.video for p in decoder.decode(v.payload)}
    assert sizes == {(128, 128), (64, 64)}
    # The second turn played at tier 1 from the primary renderer.
    start2 = client.messages("turn.started")[1]
    turn2 = [v for v in rec.video if start2["seq"] <= v.header.seq < start2["seq"] + 20]
    assert {v.header.tier for v in turn2} == {1}


async def test_no_renderer_at_all_gives_tier_3_static_image_and_text(avatar_dir: Path) -> None:
    cfg = config(avatar_dir, **{"engine.chaos": "error=1.0", "breaker.errors_to_open": 1})
    srv_avatars: dict[str, Any] = {}

    def lookup(avatar_id: str) -> Any:
        return srv_avatars["server"].avatars.get(avatar_id)

    broken = ChaosRenderer(CpuRenderer(lookup, cfg.renderer.cpu), ChaosSpec(error=1.0))
    async with running_server(cfg, fallback=broken) as srv:
        srv_avatars["server"] = srv
        client = await SessionClient.open(srv.url)
        # The primary fails (tier 2), then the fallback fails too (tier 3).
        await client.speak("t1", speech_like(1.0, 16000), 16000, realtime=0, text="hello")
        await client.wait_message("turn.done", timeout(10), turn="t1")
        await client.speak("t2", speech_like(1.0, 16000), 16000, realtime=0, text="again")
        await client.wait_message("tier", timeout(10), tier=3)
        text2 = await client.wait_message("text", timeout(5), turn="t2")
        # A turn in tier 3: its transcript as text, its audio, the static picture.
        await client.speak("t3", speech_like(1.2, 16000, seed=3), 16000, realtime=0,
                           text="sorry, video is unavailable")
        done = await client.wait_message("turn.done", timeout(10), turn="t3")
        text = await client.wait_message("text", timeout(2), turn="t3")
        await client.close()
    assert text2["text"] == "again" and not client.messages("text")[0]["turn"] == "t1"
    assert text["text"] == "sorry, video is unavailable"
    start = client.messages("turn.started")[-1]
    rec = client.record
    turn_video = [v for v in rec.video if start["seq"] <= v.header.seq < start["seq"]
                  + done["frames"]]
    assert turn_video and {v.header.tier for v in turn_video} == {3}
    # The static image: unchanged pictures cost a few bytes each.
    assert np.median([len(v.payload) for v in turn_video if not v.header.flags
                      & FrameFlags.KEYFRAME]) < 100
    turn_audio = [a for a in rec.audio if a.header.flags & FrameFlags.SPEECH]
    assert len(turn_audio) >= int(np.ceil(1.2 * 16000 / 640))
    assert np.percentile(gaps(rec), 95) < 0.1


async def test_drain_moves_sessions_with_goaway_and_resume_elsewhere(avatar_dir: Path) -> None:
    store = MemorySessionStore(time.monotonic)  # shared: "another instance" resumes it
    cfg = config(avatar_dir, **{"server.drain_timeout_s": 5.0})
    async with running_server(cfg, store=store) as old, \
            running_server(cfg, store=store) as new:
        idle = await SessionClient.open(old.url)
        busy = await SessionClient.open(old.url)
        await busy.speak("t1", speech_like(1.5, 16000), 16000, realtime=0)
        await busy.wait_message("turn.started", timeout(5), turn="t1")
        drain = asyncio.create_task(old.drain())
        await asyncio.sleep(0.05)
        status = await asyncio.to_thread(_http_status, old, "/readyz")
        assert status == 503
        with pytest.raises(SessionRefused) as refused:
            await SessionClient.open(old.url)
        assert refused.value.close_code == 1013 and refused.value.error["retry_after_ms"] > 0
        # The idle session moves at once, the busy one after its turn.
        goaway = await idle.wait_message("goaway", timeout(2))
        done = await busy.wait_message("turn.done", timeout(5), turn="t1")
        await busy.wait_message("goaway", timeout(3))
        await asyncio.wait_for(drain, timeout(6))
        await idle._task
        await busy._task
        assert idle.record.close_code == busy.record.close_code == 1012
        assert not done["interrupted"]
        assert goaway["resume_token"] == idle.record.resume_token
        moved = await idle.reconnect(new.url, policy=BackoffPolicy(base_s=0.05),
                                     rng=random.Random(1))
        assert moved.record.ready["resumed"] is True
        assert moved.record.ready["session"] == idle.record.ready["session"]
        await moved.wait_for(lambda r: len(r.video) > 2, timeout(3))
        assert moved.record.video[0].header.seq > idle.record.video[-1].header.seq
        await moved.close()


def _http_status(server: AgentServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_sigterm_drains_and_exits_0(avatar_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"avatars:\n  cache_dir: {avatar_dir}\n  default_avatar:\n    size: 128\n"
        "    clip_seconds: [2.0, 4.0, 6.0]\nvideo:\n  max_height: 128\n"
        "renderer:\n  name: cpu\nserver:\n  drain_timeout_s: 3.0\n")

    with server_process("--config", str(cfg)) as (proc, url):
        async def scenario() -> tuple[SessionRecord, int]:
            client = await SessionClient.open(url)
            await client.wait_for(lambda r: len(r.video) > 5, timeout(5))
            proc.send_signal(signal.SIGTERM)
            await client.wait_message("goaway", timeout(5))
            await client._task
            return client.record, client.record.close_code or 0

        rec, code = asyncio.run(scenario())
        assert code == 1012 and rec.resume_token
        assert proc.wait(timeout(15)) == 0


async def test_frame_budget_admission_and_client_backoff(avatar_dir: Path) -> None:
    # A primary renderer that takes 400 ms a chunk (a slow GPU): once measured, the
    # frame-time budget holds only a few sessions.
    # Planned speaking share 1.0: the measured share (an average that rises while the first
    # session speaks and then decays) can never exceed it, so the budget stays put while
    # the test waits (with 0.5 the decay freed a slot within the 0.3 s below).
    cfg = config(avatar_dir, **{"engine.chaos": "delay_ms=400", "admission.retry_after_ms": 50,
                                "engine.render_timeout_s": 5.0, "admission.speaking_share": 1.0})
    async with running_server(cfg) as srv:
        first = await SessionClient.open(srv.url)
        await first.speak("t1", speech_like(1.0, 16000), 16000, realtime=0)
        await first.wait_message("turn.done", timeout(15), turn="t1")
        cost = srv.engine.stats().primary_frame_cost_s
        # A call takes >= 0.4 s for at most 4 chunks of 8 frames (the start-up calibration,
        # fast, still weighs a little).
        assert cost is not None and cost >= 0.8 * 0.4 / 32
        clients = [first]
        with pytest.raises(SessionRefused) as refused:
            for _ in range(20):
                clients.append(await SessionClient.open(srv.url))
        err = refused.value.error
        assert refused.value.close_code == 1013 and err["code"] == "overloaded"
        assert "render budget" in err["message"] and err["retry_after_ms"] == 50
        admitted = len(clients)
        share, fps = cfg.admission.speaking_share, 25
        assert admitted * share * fps * cost <= 2 * cfg.admission.max_utilization + 1e-6
        assert metric(srv, 'avatar_admission_rejections_total{reason="frame_budget"}') == 1
        # A client that backs off (honouring retry_after_ms) gets in once one leaves.
        retrying = asyncio.create_task(SessionClient.open_with_retry(
            srv.url, policy=BackoffPolicy(base_s=0.05, cap_s=0.2, max_attempts=50)))
        await asyncio.sleep(0.3)
        assert not retrying.done()
        await clients.pop().close()
        late = await asyncio.wait_for(retrying, timeout(5))
        assert late.record.ready["session"]
        for c in [*clients, late]:
            await c.close()


async def test_congested_client_loses_video_not_audio_and_drops_to_tier_2(
    avatar_dir: Path
) -> None:
    cfg = config(avatar_dir, **{"video.send_buffer_frames": 6, "degradation.stable_s": 30.0})
    async with running_server(cfg) as srv:
        # A slow network: small socket buffers (accepted sockets inherit the listener's).
        assert srv._server is not None
        for listener in srv._server.sockets:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        async with connect(srv.url, sock=sock, max_queue=2, compression=None) as ws:
            await ws.send('{"type":"hello","v":1}')
            # Stop reading: the server's socket and send buffer fill up.
            for _ in range(100):
                if any(c.tier == 2 for c in srv.sessions.values()):
                    break
                await asyncio.sleep(0.1)
            (conn,) = srv.sessions.values()
            assert conn.tier == 2
            assert conn.sendbuf.video_queued <= cfg.video.send_buffer_frames
            # Read again: the tier message, every audio frame, video with gaps.
            video: list[MediaHeader] = []
            audio: list[MediaHeader] = []
            tiers: list[str] = []
            async with asyncio.timeout(timeout(10)):
                while not (tiers and len(audio) > 100):
                    msg = await ws.recv()
                    if isinstance(msg, str):
                        tiers += [msg] if '"type":"tier"' in msg else []
                        continue
                    header, _ = unpack_media(msg)
                    (video if header.kind == MediaKind.VIDEO else audio).append(header)
    assert "congested" in tiers[0]
    audio_pts = [h.pts_us for h in audio]
    assert np.all(np.diff(audio_pts) == 40_000)  # no audio lost
    assert [h.seq for h in video] == list(range(len(video)))  # seq counts what was sent
    assert len(video) < len(audio)  # video was dropped
    assert metric(srv, 'avatar_slow_consumer_events_total{action="tier_down"}') == 1


async def test_client_that_stops_reading_is_closed_by_keepalive(avatar_dir: Path) -> None:
    cfg = config(avatar_dir, **{"server.ping_interval_s": 0.3, "server.ping_timeout_s": 0.5})
    async with running_server(cfg) as srv:
        ws = await connect(srv.url, max_queue=1, compression=None, ping_interval=None)
        await ws.send('{"type":"hello","v":1}')
        started = time.monotonic()
        while srv.sessions or time.monotonic() - started < 0.2:
            assert time.monotonic() - started < timeout(8)
            await asyncio.sleep(0.1)
        ws.transport.abort()


async def test_leak_guard_drains_and_exits_with_its_code(avatar_dir: Path) -> None:
    cfg = config(avatar_dir, **{"leak_guard.threshold": 0.0001, "leak_guard.interval_s": 0.2,
                                "leak_guard.samples": 2, "server.drain_timeout_s": 1.0})
    server = AgentServer(cfg)
    code = await asyncio.wait_for(server.serve_forever(), timeout(20))
    assert code == cfg.leak_guard.exit_code == 75
