"""Wire format: the binary header codec and the JSON message union."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import BadRequest
from agent.protocol import (
    HEADER_SIZE,
    FrameFlags,
    MediaHeader,
    MediaKind,
    Pong,
    SpeakStart,
    TurnDone,
    dump,
    pack_media,
    parse_client_message,
    unpack_media,
)

pytestmark = pytest.mark.unit


def test_header_layout_is_big_endian_16_bytes() -> None:
    h = MediaHeader(MediaKind.VIDEO, FrameFlags.KEYFRAME | FrameFlags.SPEECH, 2, 258, 40_000)
    data = pack_media(h, b"xyz")
    assert len(data) == HEADER_SIZE + 3 == 19
    assert data[:16] == bytes([1, 3, 2, 0, 0, 0, 1, 2]) + (40_000).to_bytes(8, "big")


@given(
    kind=st.sampled_from(list(MediaKind)),
    flags=st.integers(0, 15),
    tier=st.integers(0, 3),
    seq=st.integers(0, 2**32 - 1),
    pts=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=64),
)
def test_header_round_trip(kind: MediaKind, flags: int, tier: int, seq: int, pts: int,
                           payload: bytes) -> None:
    h = MediaHeader(kind, FrameFlags(flags), tier, seq, pts)
    back, body = unpack_media(pack_media(h, payload))
    assert back == h
    assert bytes(body) == payload


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x02\x00", "shorter than the 16-byte header"),
        (bytes([9]) + bytes(15), "unknown media kind"),
        (bytes([2, 0, 0, 7]) + bytes(12), "reserved"),
        (bytes([2, 0, 4, 0]) + bytes(12), "tier 4"),
    ],
)
def test_bad_headers_are_bad_requests(data: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        unpack_media(data)


def test_parse_known_messages_and_ignore_extensions() -> None:
    msg = parse_client_message('{"type":"speak.start","turn":"t1","text":"hi","x-ext":1}')
    assert isinstance(msg, SpeakStart)
    assert (msg.turn, msg.text, msg.duration_ms) == ("t1", "hi", None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not a JSON object"),
        ("[1,2]", "Input should be an object"),
        ('{"turn":"t1"}', 'no "type" field'),
        ('{"type":"dance"}', "unknown message type"),
        ('{"type":"speak.start"}', "speak.start.turn"),
        ('{"type":"speak.start","turn":""}', "speak.start.turn"),
        ('{"type":"speak.start","turn":"t","duration_ms":-5}', "duration_ms"),
        ('{"type":"hello","audio":{"rate":"fast"}}', "hello.audio.rate"),
    ],
)
def test_malformed_messages_name_the_problem(text: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_client_message(text)


def test_dump_omits_unset_optionals() -> None:
    assert dump(Pong(id=7)) == '{"type":"pong","id":7}'
    done = TurnDone(turn="t1", frames=3, interrupted=False, pts_us=120_000)
    assert "resume_token" not in dump(done)
