"""The send buffer's slow-consumer policy."""

from __future__ import annotations

import json

import pytest

from agent.protocol import FrameFlags, MediaKind, TurnDone, TurnStarted, unpack_media
from agent.sendbuffer import OutMedia, OutMessage, SendBuffer

pytestmark = pytest.mark.unit


def video(pts: int, key: bool = False, turn: str | None = None) -> OutMedia:
    flags = FrameFlags.KEYFRAME if key else FrameFlags.NONE
    return OutMedia(MediaKind.VIDEO, flags, 1, pts, b"v%d" % pts, turn)


def audio(pts: int, turn: str | None = None) -> OutMedia:
    return OutMedia(MediaKind.AUDIO, FrameFlags.NONE, 1, pts, b"a%d" % pts, turn)


def drain(buf: SendBuffer) -> list[bytes | str]:
    out = []
    while (item := buf.pop()) is not None:
        out.append(item)
    return out


def test_seq_per_kind_from_zero_in_order() -> None:
    buf = SendBuffer(8)
    for i in range(3):
        buf.push(video(i, key=i == 0))
        buf.push(audio(i))
    items = [unpack_media(x)[0] for x in drain(buf) if isinstance(x, bytes)]
    assert [(h.kind, h.seq, h.pts_us) for h in items] == [
        (MediaKind.VIDEO, 0, 0), (MediaKind.AUDIO, 0, 0),
        (MediaKind.VIDEO, 1, 1), (MediaKind.AUDIO, 1, 1),
        (MediaKind.VIDEO, 2, 2), (MediaKind.AUDIO, 2, 2),
    ]


def test_congestion_drops_video_never_audio_or_keyframes() -> None:
    buf = SendBuffer(4)
    buf.push(video(0, key=True))
    for i in range(1, 10):
        buf.push(video(i))
        buf.push(audio(i))
    headers = [unpack_media(x)[0] for x in drain(buf) if isinstance(x, bytes)]
    audio_pts = [h.pts_us for h in headers if h.kind == MediaKind.AUDIO]
    video_pts = [h.pts_us for h in headers if h.kind == MediaKind.VIDEO]
    assert audio_pts == list(range(1, 10))  # every audio frame survives
    assert 0 in video_pts  # the keyframe survives
    assert len(video_pts) < 10
    assert buf.stats().video_dropped == 10 - len(video_pts)


def test_after_a_drop_only_a_keyframe_resumes_video() -> None:
    buf = SendBuffer(2)
    buf.push(video(0, key=True))
    buf.push(video(1))
    buf.push(video(2))  # over the bound: queued P-frames dropped
    assert buf.needs_keyframe
    assert not buf.push(video(3))  # would reference a dropped frame
    assert buf.push(video(4, key=True))
    assert not buf.needs_keyframe
    drain(buf)  # the client caught up
    assert buf.push(video(5))


def test_flush_turn_keeps_idle_and_returns_messages() -> None:
    buf = SendBuffer(16)
    buf.push(video(0, key=True))
    buf.push(OutMessage(TurnStarted(turn="t1", seq=0, pts_us=1)))
    buf.push(video(1, key=True, turn="t1"))
    buf.push(audio(1, turn="t1"))
    buf.push(video(2, turn="t1"))
    dropped, messages = buf.flush_turn()
    assert dropped == 2
    assert [type(m) for m in messages] == [TurnStarted]
    left = drain(buf)
    assert len(left) == 1 and unpack_media(left[0])[0].pts_us == 0  # type: ignore[arg-type]


def test_turn_started_gets_the_seq_of_the_next_video_frame() -> None:
    buf = SendBuffer(16)
    buf.push(video(0, key=True))
    buf.push(OutMessage(TurnStarted(turn="t1", seq=0, pts_us=40_000)))
    buf.push(video(1, key=True, turn="t1"))
    buf.push(OutMessage(TurnDone(turn="t1", frames=1, interrupted=False, pts_us=80_000)))
    out = drain(buf)
    started = json.loads(out[1])
    assert started == {"type": "turn.started", "turn": "t1", "seq": 1, "pts_us": 40_000}
    assert unpack_media(out[2])[0].seq == 1  # type: ignore[arg-type]
    assert json.loads(out[3])["type"] == "turn.done"
