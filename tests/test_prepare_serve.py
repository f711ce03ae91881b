"""A prepared avatar is served by the next server with no further step."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.client import SessionClient
from agent.protocol import FrameFlags
from media.decode import VideoDecoder
from media.face import make_face_analyzer
from media.prepare import PrepareOptions, prepare_avatar
from tests.conftest import timeout
from tests.serverutil import running_server, small_config, speech_like
from tests.videoutil import person_video

pytestmark = pytest.mark.integration


def _avatars(port: int) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/avatars", timeout=5) as r:
        body: list[dict[str, object]] = json.loads(r.read())["avatars"]
        return body


async def test_prepared_avatar_is_listed_and_served(tmp_path: Path) -> None:
    video = person_video(tmp_path / "me.mp4", seconds=2.4, fps=30, size=256)
    cache = tmp_path / "avatars"
    prepare_avatar(cache, "me", [video], make_face_analyzer("auto"), PrepareOptions(idle_seconds=3))
    async with running_server(small_config(cache)) as server:
        listed = await asyncio.to_thread(_avatars, server.port)
        mine = next(a for a in listed if a["id"] == "me")
        assert (mine["width"], mine["height"], mine["fps"]) == (256, 256, 25)
        client = await SessionClient.open(server.url, hello={"avatar": "me"})
        assert client.record.ready["video"] == {"codec": "h264", "fps": 25,
                                                "width": 128, "height": 128}
        await client.wait_for(lambda r: len(r.video) >= 10, timeout(5))
        # A turn renders on the prepared frames and their face geometry.
        await client.speak("t1", speech_like(0.6, 16000), 16000, realtime=0)
        done = await client.wait_message("turn.done", timeout(10), turn="t1")
        await client.close()
    rec = client.record
    assert done["frames"] > 0
    assert any(v.header.flags & FrameFlags.SPEECH for v in rec.video)
    decoder = VideoDecoder("h264")
    pictures = [p for v in rec.video for p in decoder.decode(v.payload)]
    assert len(pictures) == len(rec.video) and pictures[0].shape == (128, 128, 3)
    assert float(np.mean(pictures[0])) > 40  # her picture, not a blank frame
