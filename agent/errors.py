"""One small error tree; the class says who reacts.

- `ProtocolError`: the client broke the contract; the socket edge answers with
  the wire `code` and, when `fatal`, closes with `close_code`.
- `OverloadedError`: no capacity now; close 1013 with `retry_after_ms`.
- `RenderError`: a renderer failed a chunk; `retryable` says whether the same
  chunk may be tried again elsewhere (never after a timeout).
- `ConfigError`: bad config or CLI input; the CLI prints it and exits 2.
Anything else is a programmer error: logged, answered `internal`, close 1011.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    SERVICE_RESTART = 1012
    OVERLOADED = 1013


class AgentError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(AgentError):
    """Invalid configuration or command-line input."""


class ProtocolError(AgentError):
    code = "bad_request"
    close_code = CloseCode.POLICY

    def __init__(self, message: str, *, fatal: bool = False, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.fatal = fatal
        self.retry_after_ms = retry_after_ms


class BadRequest(ProtocolError):
    code = "bad_request"


class Unauthorized(ProtocolError):
    code = "unauthorized"

    def __init__(self, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message, fatal=True, retry_after_ms=retry_after_ms)


class Unsupported(ProtocolError):
    code = "unsupported"


class NotFound(ProtocolError):
    code = "not_found"


class ResumeFailed(ProtocolError):
    code = "resume_failed"


class Timeout(ProtocolError):
    """The client did not do something in time (hello, reading its stream)."""

    code = "timeout"


class MessageTooBig(ProtocolError):
    code = "bad_request"
    close_code = CloseCode.TOO_BIG

    def __init__(self, message: str) -> None:
        super().__init__(message, fatal=True)


class OverloadedError(AgentError):
    code = "overloaded"
    close_code = CloseCode.OVERLOADED

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class RenderError(AgentError):
    """A renderer could not produce a chunk."""

    kind = "model_error"

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class RenderTimeout(RenderError):
    kind = "model_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class GpuOutOfMemory(RenderError):
    kind = "gpu_oom"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)
