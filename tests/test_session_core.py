"""The session core, driven directly: turns, chunk planning, playout slots, interrupt."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import AgentConfig, DefaultAvatarConfig
from agent.errors import BadRequest
from media.avatar import Avatar
from media.default_avatar import ensure_default_avatar
from media.types import RenderChunk
from sessions.session import HoldSlot, IdleSlot, MediaSlot, SessionCore, SessionParams
from sessions.timeline import Timeline

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    cfg = DefaultAvatarConfig(size=64, clip_seconds=(2.0, 4.0))
    return ensure_default_avatar(tmp_path_factory.mktemp("av"), cfg, 25)


def make_core(avatar: Avatar, chunk: int = 4, lookahead_ms: int = 0, rate: int = 16000,
              max_queued: int = 2) -> SessionCore:
    tl = Timeline(avatar.clips, avatar.neutral, avatar.idle_loop, AgentConfig().timeline, 25)
    params = SessionParams("s1", 25, rate, chunk, lookahead_ms, 10.0, max_queued)
    return SessionCore(avatar, tl, params)


def render(core: SessionCore, chunks: list[RenderChunk]) -> None:
    for c in chunks:
        frames = np.full((len(c.frames), 8, 8, 3), c.key.index, np.uint8)
        core.on_rendered(c.key, frames)


def test_idle_slots_walk_the_idle_loop(avatar: Avatar) -> None:
    core = make_core(avatar)
    n = len(avatar.idle_loop)
    slots = [core.next_slot()[0] for _ in range(n + 2)]
    assert [s.index for s in slots if isinstance(s, IdleSlot)] == [*range(n), 0, 1]


def test_chunks_are_requested_as_audio_arrives(avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4)
    core.on_speak_start("t1", None, None, None)
    core.on_audio(np.zeros(640 * 3, np.float32))
    assert core.poll_chunks() == []  # 3 frames: not a whole chunk yet
    core.on_audio(np.zeros(640 * 2, np.float32))
    (c0,) = core.poll_chunks()
    assert (c0.key.turn, c0.key.index, c0.first_frame, len(c0.frames)) == ("t1", 0, 0, 4)
    assert all(f.speech for f in c0.frames)
    assert len(c0.audio) == 640 * 5  # everything that arrived, for look-ahead
    assert core.poll_chunks() == []  # never requested twice


def test_lookahead_delays_a_chunk(avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4, lookahead_ms=120)
    core.on_speak_start("t1", None, None, None)
    core.on_audio(np.zeros(640 * 4, np.float32))
    assert core.poll_chunks() == []
    core.on_audio(np.zeros(16 * 120, np.float32))
    assert len(core.poll_chunks()) == 1


def test_a_turn_plays_speech_then_tail_then_idle(avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4)
    for _ in range(3):
        core.next_slot()
    core.on_speak_start("t1", "hi", None, None)
    core.on_audio(np.full(640 * 6 + 100, 0.25, np.float32))
    core.on_speak_end("t1")
    chunks = core.poll_chunks()
    total = sum(len(c.frames) for c in chunks)
    speech = sum(f.speech for c in chunks for f in c.frames)
    assert speech == 7 and total > speech  # 6 frames + a partial one, then the tail
    render(core, chunks)
    slot, started, done = core.next_slot()
    assert started is not None and started.turn == "t1"
    assert isinstance(slot, MediaSlot) and slot.first_of_turn and slot.speech
    assert slot.audio.shape == (640,) and np.allclose(slot.audio, 0.25)
    outs = [slot]
    while done is None:
        slot, _, done = core.next_slot()
        outs.append(slot)
    assert done.frames == total and not done.interrupted
    assert all(isinstance(s, MediaSlot) for s in outs)
    assert [s.speech for s in outs] == [True] * 7 + [False] * (total - 7)  # type: ignore[union-attr]
    last_audio = outs[6].audio  # type: ignore[union-attr]
    assert np.allclose(last_audio[:100], 0.25) and np.allclose(last_audio[100:], 0.0)
    assert outs[-1].last_of_turn  # type: ignore[union-attr]
    assert core.next_slot()[0] == IdleSlot(0)  # idle resumes at neutral
    assert core.idle


def test_unrendered_frames_hold_the_last_picture(avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4)
    core.on_speak_start("t1", None, None, None)
    core.on_audio(np.zeros(640 * 8, np.float32))
    c0, c1 = core.poll_chunks()
    render(core, [c0])
    for _ in range(4):
        assert isinstance(core.next_slot()[0], MediaSlot)
    hold = core.next_slot()[0]
    assert isinstance(hold, HoldSlot) and hold.frame[0, 0, 0] == 0
    render(core, [c1])
    slot = core.next_slot()[0]
    assert isinstance(slot, MediaSlot) and slot.frame[0, 0, 0] == 1
    assert core.stats().underruns == 1


def test_early_frames_start_the_turn_and_the_whole_chunk_completes_them(
        avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4)
    core.on_speak_start("t1", None, None, None)
    core.on_audio(np.zeros(640 * 8, np.float32))
    c0, _ = core.poll_chunks()
    whole = np.arange(4, dtype=np.uint8)[:, None, None, None] + np.zeros((4, 8, 8, 3), np.uint8)
    assert core.on_rendered(c0.key, whole[:1], partial=True)
    slot, started, _ = core.next_slot()  # one frame is enough to start the turn
    assert started is not None and isinstance(slot, MediaSlot) and slot.frame[0, 0, 0] == 0
    hold = core.next_slot()[0]  # frame 1 is not there yet
    assert isinstance(hold, HoldSlot) and hold.frame[0, 0, 0] == 0
    core.on_rendered(c0.key, whole[:3], partial=True)
    core.on_rendered(c0.key, whole[:2], partial=True)  # never fewer frames than before
    assert [core.next_slot()[0].frame[0, 0, 0] for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
    assert isinstance(core.next_slot()[0], HoldSlot)
    assert core.stats().chunks_rendered == 0  # early frames are not a rendered chunk
    core.on_rendered(c0.key, whole)
    core.on_rendered(c0.key, whole[:2], partial=True)  # late early frames change nothing
    slot = core.next_slot()[0]
    assert isinstance(slot, MediaSlot) and slot.frame[0, 0, 0] == 3
    assert core.stats().chunks_rendered == 1 and core.stats().underruns == 2


def test_interrupt_reports_turns_and_blends_to_neutral(avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4)
    core.on_speak_start("t1", None, None, None)
    core.on_audio(np.zeros(640 * 20, np.float32))
    core.on_speak_start("t2", None, None, None)
    core.on_audio(np.zeros(640 * 4, np.float32))
    render(core, core.poll_chunks())
    for _ in range(6):
        core.next_slot()
    done = core.on_interrupt(unsent_frames=2)
    assert [(d.turn, d.frames, d.interrupted) for d in done if d] == [
        ("t1", 4, True), ("t2", 0, True)]
    blend = core.poll_chunks()
    assert blend and all(not f.speech for c in blend for f in c.frames)
    n = sum(len(c.frames) for c in blend)
    assert n <= 12  # converges within 0.5 s at 25 fps
    render(core, blend)
    kinds = [type(core.next_slot()[0]) for _ in range(n + 1)]
    assert kinds == [MediaSlot] * n + [IdleSlot]
    with pytest.raises(BadRequest, match="outside a turn"):
        core.on_audio(np.zeros(10, np.float32))


def test_out_of_order_and_limits(avatar: Avatar) -> None:
    core = make_core(avatar, max_queued=1)
    with pytest.raises(BadRequest, match="no turn is open"):
        core.on_speak_end("x")
    core.on_speak_start("a", None, None, None)
    with pytest.raises(BadRequest, match="open turn is 'a'"):
        core.on_speak_end("b")
    core.on_speak_start("b", None, None, None)
    with pytest.raises(BadRequest, match="too many queued"):
        core.on_speak_start("c", None, None, None)
    with pytest.raises(BadRequest, match="already used"):
        core.on_speak_start("a", None, None, None)
    with pytest.raises(BadRequest, match="longer than the limit"):
        core.on_audio(np.zeros(16000 * 11, np.float32))


def test_audio_at_44k_is_resampled_for_the_renderer(avatar: Avatar) -> None:
    core = make_core(avatar, chunk=4, rate=44100)
    core.on_speak_start("t1", None, None, None)
    core.on_audio(np.zeros(1764 * 10, np.float32))
    core.on_speak_end("t1")
    chunks = core.poll_chunks()
    assert sum(f.speech for c in chunks for f in c.frames) == 10
    assert abs(len(chunks[0].audio) - 6400) <= 2
    render(core, chunks)
    slot = core.next_slot()[0]
    assert isinstance(slot, MediaSlot) and slot.audio.shape == (1764,)
