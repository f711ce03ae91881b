"""Hypothesis strategies for hostile client input: valid and invalid messages and frames.

Shared by the pure-core fuzz test (many examples) and the real-server fuzz
test (a handful). An action is ("text", str), ("binary", bytes) or
("wait", seconds).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import strategies as st

from agent.protocol import CLIENT_TYPES, HEADER

TURN_IDS = ("a", "b", "c", "d")
WIRE_CODES = frozenset({"unauthorized", "bad_request", "unsupported", "not_found",
                        "overloaded", "timeout", "resume_failed", "internal"})
# Close codes the protocol documents for a session that was admitted; 1011 (internal
# error) and 1013 (admission) must not come out of a running session's input.
SESSION_CLOSE_CODES = frozenset({1000, 1008, 1009})

Action = tuple[str, Any]
OVERSIZE = 1 << 17  # bytes of a frame bigger than the fuzzed server's message limit

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False), st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@st.composite
def valid_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["speak.start", "speak.start", "speak.end", "interrupt",
                                 "listen.start", "listen.end", "ping"]))
    msg: dict[str, Any] = {"type": kind}
    if kind.startswith("speak."):
        msg["turn"] = draw(st.sampled_from(TURN_IDS))
    if kind == "speak.start":
        if draw(st.booleans()):
            msg["text"] = draw(st.text(max_size=40))
        if draw(st.booleans()):
            msg["duration_ms"] = draw(st.integers(0, 3000))
        if draw(st.booleans()):
            msg["style"] = draw(st.sampled_from(["calm", "emphatic", "x" * 64]))
    if kind == "ping":
        msg["id"] = draw(st.one_of(st.integers(0, 1000), st.text(max_size=8)))
    return msg


@st.composite
def invalid_message(draw: st.DrawFn) -> str:
    choice = draw(st.integers(0, 5))
    if choice == 0:  # any text at all
        return draw(st.text(max_size=80))
    if choice == 1:  # JSON that is not an object, or an object without a known type
        return json.dumps(draw(_json))
    if choice == 2:  # a known type with wrong or extra fields
        fields = draw(st.dictionaries(st.sampled_from(["turn", "text", "duration_ms", "style",
                                                       "id", "v", "token", "resume"]),
                                      _json, max_size=3))
        return json.dumps({"type": draw(st.sampled_from(CLIENT_TYPES)), **fields})
    if choice == 3:  # out of order: a second hello, bye-less end of unknown turns
        return json.dumps(draw(st.sampled_from([
            {"type": "hello", "v": 1}, {"type": "speak.end", "turn": "zz"},
            {"type": "speak.start", "turn": ""}, {"type": "speak.start", "turn": "t" * 200},
            {"type": "speak.start", "turn": "a", "duration_ms": -1}])))
    if choice == 4:  # deeply nested JSON
        depth = draw(st.integers(50, 3000))
        return "[" * depth + "]" * depth
    return '{"type": "ping", "id": ' + "1" * draw(st.integers(1, 5000)) + "}"


def audio_frame(pcm: bytes, seq: int = 0) -> bytes:
    return HEADER.pack(2, 0, 0, 0, seq, 0) + pcm


@st.composite
def binary_frame(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 4))
    if choice <= 1:  # well-formed audio, 0-100 ms at 16 kHz
        n = draw(st.integers(0, 1600))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return audio_frame(rng.integers(-32768, 32767, n, dtype=np.int16).tobytes())
    if choice == 2:  # any header
        return draw(st.binary(min_size=16, max_size=16)) + draw(st.binary(max_size=64))
    if choice == 3:  # short or odd
        return draw(st.binary(max_size=17))
    return audio_frame(draw(st.binary(max_size=33)))  # odd byte counts among them


def actions(max_size: int = 40) -> st.SearchStrategy[list[Action]]:
    text = st.one_of(valid_message().map(json.dumps), invalid_message())
    return st.lists(st.one_of(
        st.tuples(st.just("text"), text),
        st.tuples(st.just("text"), text),
        st.tuples(st.just("binary"), binary_frame()),
        st.tuples(st.just("binary"), binary_frame()),
        st.tuples(st.just("wait"), st.floats(0.0, 0.2)),
        st.just(("text", '{"type":"bye"}')),
        st.just(("binary", audio_frame(bytes(OVERSIZE)))),
    ), max_size=max_size)
