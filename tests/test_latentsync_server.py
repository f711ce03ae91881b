"""The LatentSync renderer (tiny CPU models) behind the real server, and its CLI errors."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.avatars import AvatarRegistry
from agent.client import SessionClient
from agent.config import DefaultAvatarConfig
from agent.protocol import FrameFlags
from agent.server import AgentServer
from media.avatar_cache import write_procedural_avatar
from media.decode import VideoDecoder
from media.default_avatar import build_default_avatar
from tests.conftest import REPO, timeout
from tests.latentsyncutil import CountingCodec, counting_models, tiny_renderer, with_face
from tests.serverutil import running_server, small_config, speech_like

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("torch_one_thread")]

STAGES = ("audio_features", "face", "inference", "decode", "paste")


def stage_counts(server: AgentServer) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read().decode()
    pattern = r'avatar_stage_duration_seconds_count\{stage="(\w+)"\} ([0-9.e+]+)'
    return {stage: float(count) for stage, count in re.findall(pattern, body)}


async def test_a_turn_renders_through_every_stage(tmp_path: Path) -> None:
    config = small_config(
        tmp_path,
        # A CPU chunk of the tiny model takes seconds on a busy machine.
        **{"engine.render_timeout_s": timeout(60), "renderer.latentsync.max_batch": 2},
    )
    # An avatar in the cache that no one has named yet.
    write_procedural_avatar(tmp_path, "second", build_default_avatar(
        DefaultAvatarConfig(size=128, clip_seconds=(2.0,)), 25))
    avatars = AvatarRegistry(config.avatars)  # the same cache folder as the server's
    models = counting_models()
    codec = models.codec
    assert isinstance(codec, CountingCodec)
    renderer = tiny_renderer(avatars.get, models=models, max_batch=2)
    with capture_logs() as logs:
        async with running_server(config, renderer=renderer) as server:
            # Ready: every frame of the default avatar is encoded (the warmup's grey crop
            # is the one more picture), so the calibration chunks encoded nothing.
            default = with_face(avatars.get(config.avatars.default))
            assert codec.encoded == 1 + 2 * default
            # An avatar first named by a session is prepared before that session's ready.
            other = await SessionClient.open(server.url, hello={"avatar": "second"})
            second = with_face(avatars.get("second"))
            assert codec.encoded == 1 + 2 * (default + second)
            await other.close()

            client = await SessionClient.open(server.url)
            audio = speech_like(1.2, 16_000)
            await client.speak("t1", audio, 16_000)
            done = await client.wait_message("turn.done", timeout(90), turn="t1")
            started = client.messages("turn.started")[0]
            await client.wait_for(
                lambda r: any(v.header.pts_us > done["pts_us"] + 200_000 for v in r.video),
                timeout(10))
            rec = client.record
            await client.close()
            counts = await asyncio.to_thread(stage_counts, server)

    assert codec.encoded == 1 + 2 * (default + second)  # the turn's faces were all resident
    prepared = {e["avatar"]: e for e in logs if e["event"] == "avatar_prepared"}
    assert prepared.keys() == {config.avatars.default, "second"}
    assert prepared["second"]["frames"] == sum(c.num_frames for c in avatars.get("second").clips)
    assert prepared["second"]["seconds"] > 0 and prepared["second"]["lane"] == "primary-0"
    assert not done["interrupted"]
    # One frame every 40 ms, in order, through idle, the turn and idle again.
    assert [v.header.seq for v in rec.video] == list(range(len(rec.video)))
    assert all(b.header.pts_us - a.header.pts_us == 40_000
               for a, b in zip(rec.video, rec.video[1:], strict=False))
    turn = [v for v in rec.video if started["pts_us"] <= v.header.pts_us < done["pts_us"]]
    assert turn[0].header.seq == started["seq"]
    assert turn[0].header.flags & FrameFlags.KEYFRAME
    assert turn[-1].header.flags & FrameFlags.LAST_OF_TURN
    # The CPU model may fall behind real time; the stream then repeats the last picture
    # (unflagged "hold" frames) inside the turn, never drops or reorders frames.
    assert len(turn) >= done["frames"]
    speech = [v for v in turn if v.header.flags & FrameFlags.SPEECH]
    assert len(speech) == int(np.ceil(len(audio) / 640))
    assert done["frames"] > len(speech)  # then the blend back to neutral
    # Idle resumes with a keyframe after the turn.
    after = [v for v in rec.video if v.header.pts_us >= done["pts_us"]]
    assert after[0].header.flags & FrameFlags.KEYFRAME
    assert not any(v.header.flags & FrameFlags.SPEECH for v in after)
    decoder = VideoDecoder("h264")
    pictures = [p for v in rec.video for p in decoder.decode(v.payload)]
    assert len(pictures) == len(rec.video) and pictures[0].shape == (128, 128, 3)
    # Every stage ran for the turn's chunks (the warmup is not a chunk).
    chunks = int(np.ceil(done["frames"] / 16))
    assert all(counts[s] >= chunks for s in STAGES), counts


def test_serve_without_checkpoints_says_what_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--renderer", "latentsync", "--port", "0",
         "--avatar-dir", str(tmp_path / "avatars")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout(120),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "config: LatentSync checkpoints missing" in err and "--renderer cpu" in err
    for name in ("checkpoints/latentsync_unet.pt", "checkpoints/whisper/tiny.pt",
                 "checkpoints/sd-vae-ft-mse"):
        assert name in err, err
    assert "Traceback" not in err
