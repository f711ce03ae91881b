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

from agent.avatars import AvatarRegistry
from agent.client import SessionClient
from agent.protocol import FrameFlags
from agent.server import AgentServer
from media.decode import VideoDecoder
from tests.conftest import REPO, timeout
from tests.latentsyncutil import tiny_renderer
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
    avatars = AvatarRegistry(config.avatars)  # the same cache folder as the server's
    renderer = tiny_renderer(avatars.get, max_batch=2)
    async with running_server(config, renderer=renderer) as server:
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
