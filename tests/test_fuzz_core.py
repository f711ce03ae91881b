"""Fuzzing without sockets: the wire parsers and the session state machine.

Random sequences of valid and invalid messages and binary frames go through
the same steps as in `agent/connection.py` (limiter, parser, dispatch to the
real `SessionCore`), with playout and rendering in between (rendered frames
are the core's own source pictures). Invariants: the only exceptions are the
protocol's errors with documented codes, a fatal one ends the session, and
queued turns and their audio stay within the configured limits.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, DefaultAvatarConfig, LimitsConfig
from agent.errors import BadRequest, ProtocolError
from agent.limits import SessionLimiter
from agent.protocol import (
    HEADER_SIZE,
    Bye,
    Hello,
    Interrupt,
    ListenEnd,
    ListenStart,
    MediaKind,
    Ping,
    SpeakEnd,
    SpeakStart,
    parse_client_message,
    unpack_media,
)
from media.audio import pcm16_to_float
from media.avatar import Avatar
from media.default_avatar import ensure_default_avatar
from media.types import RENDER_SAMPLE_RATE
from sessions.session import SessionCore, SessionParams
from sessions.timeline import Timeline
from tests.fuzzutil import (
    WIRE_CODES,
    Action,
    actions,
    audio_frame,
    binary_frame,
    invalid_message,
)

pytestmark = pytest.mark.unit

FPS, RATE, MAX_TURN_S, MAX_QUEUED = 25, 16000, 2.0, 2
# Longer runs: AVATAR_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_core.py
EXAMPLES = int(os.environ.get("AVATAR_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    cfg = DefaultAvatarConfig(size=64, clip_seconds=(2.0, 4.0))
    return ensure_default_avatar(tmp_path_factory.mktemp("av"), cfg, FPS)


@given(st.one_of(st.text(max_size=200), invalid_message(), st.binary(max_size=200)))
@settings(max_examples=2 * EXAMPLES, deadline=None)
def test_message_parser_answers_or_refuses(raw: str | bytes) -> None:
    try:
        msg = parse_client_message(raw)
    except BadRequest as exc:
        assert exc.code == "bad_request" and not exc.fatal and len(exc.message) < 500
        return
    assert msg.type in ("hello", "speak.start", "speak.end", "interrupt", "listen.start",
                        "listen.end", "ping", "bye")


@given(st.one_of(binary_frame(), st.binary(max_size=64)))
@settings(max_examples=2 * EXAMPLES, deadline=None)
def test_binary_header_parses_or_refuses(data: bytes) -> None:
    try:
        header, payload = unpack_media(data)
    except BadRequest as exc:
        assert not exc.fatal
        return
    assert header.kind in (MediaKind.VIDEO, MediaKind.AUDIO) and 0 <= header.tier <= 3
    assert 0 <= header.seq < 2**32 and 0 <= header.pts_us < 2**64
    assert bytes(payload) == data[HEADER_SIZE:]
    assert header.pack()[:1] == data[:1] and header.pack()[4:] == data[4:HEADER_SIZE]


class Session:
    """The connection shell's input path, without sockets (see agent/connection.py)."""

    def __init__(self, avatar: Avatar, limits: LimitsConfig) -> None:
        tl = Timeline(avatar.clips, avatar.neutral, avatar.idle_loop, AgentConfig().timeline,
                      FPS)
        params = SessionParams("fuzz", FPS, RATE, 4, 0, limits.max_turn_s,
                               limits.max_queued_turns)
        self.core = SessionCore(avatar, tl, params)
        self.limiter = SessionLimiter(limits, FPS, 0.0)
        self.now = 0.0
        self.closed_with: int | None = None

    def feed(self, action: Action) -> None:
        kind, value = action
        try:
            try:
                if kind == "text":
                    self.limiter.control(self.now)
                    self._text(value)
                elif kind == "binary":
                    self._binary(value)
                else:
                    self._play(value)
            except ProtocolError as exc:
                if not exc.fatal:
                    self.limiter.refused(self.now)
                raise
        except ProtocolError as exc:
            assert exc.code in WIRE_CODES
            if exc.fatal:
                self.closed_with = int(exc.close_code)

    def _text(self, text: str) -> None:
        core = self.core
        match parse_client_message(text):
            case Hello():
                raise BadRequest("hello was already received")
            case SpeakStart() as m:
                core.on_speak_start(m.turn, m.text, m.duration_ms, m.style)
            case SpeakEnd() as m:
                core.on_speak_end(m.turn)
            case Interrupt():
                core.on_interrupt()
            case ListenStart():
                core.on_listen(True)
            case ListenEnd():
                core.on_listen(False)
            case Ping() | Bye():
                pass

    def _binary(self, data: bytes) -> None:
        header, payload = unpack_media(data)
        if header.kind != MediaKind.AUDIO:
            raise BadRequest("clients send audio frames only (kind 2)")
        if len(payload) % 2:
            raise BadRequest("odd payload")
        self.limiter.audio(len(payload) // 2, RATE, self.now)
        self.core.on_audio(pcm16_to_float(payload))

    def _play(self, seconds: float) -> None:
        """Wall time passes: render what is planned, play the frame slots that fall due."""
        for _ in range(round(seconds * FPS)):
            for chunk in self.core.poll_chunks():
                self.core.on_rendered(chunk.key, self.core.source_frames(chunk))
            self.core.next_slot()
        self.now += seconds


def turn_audio_bytes(core: SessionCore) -> int:
    return sum(t.audio16.view().nbytes + t.audio_out.view().nbytes for t in core._turns)


@FUZZ
@given(actions(max_size=60))
def test_session_state_machine_survives_hostile_input(avatar: Avatar,
                                                      script: list[Action]) -> None:
    limits = LimitsConfig(max_turn_s=MAX_TURN_S, max_queued_turns=MAX_QUEUED,
                          audio_realtime_factor=4.0, audio_burst_s=1.0, abuse_strikes=12,
                          control_message_burst=30)
    session = Session(avatar, limits)
    audio_cap = (MAX_QUEUED + 1) * MAX_TURN_S * (RATE + RENDER_SAMPLE_RATE) * 4
    for action in script:
        session.feed(action)
        if session.closed_with is not None:
            assert session.closed_with == 1008
            return
        core = session.core
        # Active + queued client turns, plus at most the core's own interrupt blend.
        assert len(core.pending_turn_ids()) <= MAX_QUEUED + 2
        assert turn_audio_bytes(core) <= audio_cap
    # Whatever came before, the session still plays and ends cleanly.
    session.feed(("text", '{"type":"interrupt"}'))
    session.feed(("wait", 1.0))
    assert session.closed_with is None or session.closed_with == 1008
    if session.closed_with is None:
        assert session.core.idle


@FUZZ
@given(st.lists(st.integers(0, 3200), min_size=1, max_size=80), st.floats(1.0, 8.0))
def test_audio_limit_holds_for_any_frame_sizes(avatar: Avatar, sizes: list[int],
                                               factor: float) -> None:
    limits = LimitsConfig(audio_realtime_factor=factor, audio_burst_s=0.5, abuse_strikes=1000)
    session = Session(avatar, limits)
    session.feed(("text", '{"type":"speak.start","turn":"t"}'))
    accepted = 0.0
    for i, n in enumerate(sizes):
        session.now = i * 0.02
        try:
            session.limiter.audio(n, RATE, session.now)
        except BadRequest:
            continue
        accepted += max(n / RATE, 0.01)
    # Never more than the head start plus factor x the time that passed (+ one frame).
    assert accepted <= 0.5 + factor * session.now + 3200 / RATE + 1e-6


def test_a_loud_turn_is_still_bounded(avatar: Avatar) -> None:
    """Audio past max_turn_s is refused, not stored."""
    session = Session(avatar, LimitsConfig(max_turn_s=1.0, audio_burst_s=60.0))
    session.feed(("text", '{"type":"speak.start","turn":"t"}'))
    frame = audio_frame(np.zeros(1600, "<i2").tobytes())  # 0.1 s
    refused = 0
    for _ in range(15):
        before = turn_audio_bytes(session.core)
        session.feed(("binary", frame))
        refused += turn_audio_bytes(session.core) == before
    assert refused == 5 and session.closed_with is None
