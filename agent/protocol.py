"""Wire format of ../shared/PROTOCOL.md version 1: typed messages and the binary header.

Every JSON message is a pydantic model with a `type` literal. Client messages
are parsed through one discriminated union at the socket edge
(`parse_client_message`); internals never see raw dicts. The binary header
codec is pure code. Unknown fields are ignored (clients may use extensions).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from agent.errors import BadRequest

PROTOCOL_VERSION = 1
SUPPORTED_AUDIO_RATES = (16000, 22050, 24000, 44100, 48000)
HEADER = struct.Struct(">BBBBIQ")
HEADER_SIZE = HEADER.size  # 16
MAX_ID_LEN = 128


# --- binary frames -----------------------------------------------------------


class MediaKind(IntEnum):
    VIDEO = 1
    AUDIO = 2


class FrameFlags(IntFlag):
    NONE = 0
    KEYFRAME = 1
    SPEECH = 2
    LAST_OF_TURN = 4
    CONFIG_ONLY = 8


@dataclass(frozen=True, slots=True)
class MediaHeader:
    kind: MediaKind
    flags: FrameFlags
    tier: int
    seq: int
    pts_us: int

    def pack(self) -> bytes:
        return HEADER.pack(self.kind, self.flags, self.tier, 0, self.seq, self.pts_us)


def pack_media(header: MediaHeader, payload: bytes) -> bytes:
    return header.pack() + payload


def unpack_media(data: bytes) -> tuple[MediaHeader, memoryview]:
    """Split a binary frame; raises BadRequest on a malformed header."""
    if len(data) < HEADER_SIZE:
        raise BadRequest(f"binary frame of {len(data)} bytes is shorter than the 16-byte header")
    kind, flags, tier, reserved, seq, pts = HEADER.unpack_from(data)
    if kind not in (MediaKind.VIDEO, MediaKind.AUDIO):
        raise BadRequest(f"unknown media kind {kind} in binary header")
    if reserved != 0:
        raise BadRequest("reserved header byte must be 0")
    if tier > 3:
        raise BadRequest(f"tier {tier} out of range 0-3")
    header = MediaHeader(MediaKind(kind), FrameFlags(flags & 0x0F), tier, seq, pts)
    return header, memoryview(data)[HEADER_SIZE:]


# --- client -> server ----------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]


class VideoRequest(_Message):
    codec: Literal["h264", "jpeg"] | None = None
    fps: int | None = Field(None, ge=1, le=120)
    max_height: int | None = Field(None, ge=16, le=4320)


class AudioRequest(_Message):
    rate: int = 16000


class ResumeRequest(_Message):
    session: Id
    token: str = Field(max_length=512)
    last_seq: int | None = Field(None, ge=0)


class Hello(_Message):
    type: Literal["hello"]
    v: int = PROTOCOL_VERSION
    avatar: Id | None = None
    token: str | None = Field(None, max_length=4096)
    video: VideoRequest | None = None
    audio: AudioRequest | None = None
    resume: ResumeRequest | None = None
    trace_id: str | None = Field(None, max_length=MAX_ID_LEN)


class SpeakStart(_Message):
    type: Literal["speak.start"]
    turn: Id
    text: str | None = Field(None, max_length=65536)
    duration_ms: int | None = Field(None, ge=0)
    style: str | None = Field(None, max_length=64)


class SpeakEnd(_Message):
    type: Literal["speak.end"]
    turn: Id


class Interrupt(_Message):
    type: Literal["interrupt"]


class ListenStart(_Message):
    type: Literal["listen.start"]


class ListenEnd(_Message):
    type: Literal["listen.end"]


class Ping(_Message):
    type: Literal["ping"]
    id: int | str | None = None


class Bye(_Message):
    type: Literal["bye"]


ClientMessage = Annotated[
    Hello | SpeakStart | SpeakEnd | Interrupt | ListenStart | ListenEnd | Ping | Bye,
    Field(discriminator="type"),
]
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("hello", "speak.start", "speak.end", "interrupt", "listen.start",
                "listen.end", "ping", "bye")


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one JSON control message; raises BadRequest with a readable reason."""
    try:
        return _client_adapter.validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "union_tag_invalid":
            raise BadRequest(
                f"unknown message type; expected one of {', '.join(CLIENT_TYPES)}"
            ) from None
        if err["type"] == "union_tag_not_found":
            raise BadRequest('message has no "type" field') from None
        if err["type"] in ("json_invalid", "model_type", "model_attributes_type"):
            raise BadRequest("message is not a JSON object") from None
        raise BadRequest(f"invalid {loc or 'message'}: {err['msg']}") from None


# --- server -> client ----------------------------------------------------------


class VideoInfo(_Message):
    codec: Literal["h264", "jpeg"]
    fps: int
    width: int
    height: int


class AudioInfo(_Message):
    rate: int


class Ready(_Message):
    type: Literal["ready"] = "ready"
    session: str
    resume_token: str
    video: VideoInfo
    audio: AudioInfo
    tier: int
    resumed: bool = False


class TurnStarted(_Message):
    type: Literal["turn.started"] = "turn.started"
    turn: str
    seq: int
    pts_us: int


class TurnDone(_Message):
    type: Literal["turn.done"] = "turn.done"
    turn: str
    frames: int
    interrupted: bool
    pts_us: int
    resume_token: str | None = None


class TierChanged(_Message):
    type: Literal["tier"] = "tier"
    tier: int
    reason: str
    # Extension: the picture size from the next video frame on (a keyframe),
    # present when the tier change changes it.
    video: VideoInfo | None = None


class Text(_Message):
    type: Literal["text"] = "text"
    turn: str
    text: str


class Error(_Message):
    type: Literal["error"] = "error"
    code: Literal[
        "unauthorized", "bad_request", "unsupported", "not_found", "overloaded",
        "timeout", "resume_failed", "internal",
    ]
    message: str
    fatal: bool = False
    retry_after_ms: int = 0


class GoAway(_Message):
    """Extension: this instance is shutting down; resume elsewhere with this token.

    Sent just before the close with code 1012."""

    type: Literal["goaway"] = "goaway"
    session: str
    resume_token: str
    reason: str
    retry_after_ms: int = 0


class Pong(_Message):
    type: Literal["pong"] = "pong"
    id: int | str | None = None


class ByeReply(_Message):
    type: Literal["bye"] = "bye"


ServerMessage = (
    Ready | TurnStarted | TurnDone | TierChanged | Text | Error | GoAway | Pong | ByeReply
)


def dump(message: ServerMessage) -> str:
    """Serialise a server message; optional fields left at None are omitted."""
    data: dict[str, Any] = message.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, separators=(",", ":"))
