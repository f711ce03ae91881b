"""Where resumable session state lives between connections.

`SessionStore` is the interface; `MemorySessionStore` is the single-host
default. A shared store (Redis) implements the same three calls so that a
session can resume on any instance. Entries expire after their TTL; the clock
is injected.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StoredSession:
    """What a resume needs. `state` must be JSON-serialisable."""

    session_id: str
    resume_token: str
    principal: str
    avatar: str
    state: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(
            {
                "session_id": self.session_id,
                "resume_token": self.resume_token,
                "principal": self.principal,
                "avatar": self.avatar,
                "state": self.state,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredSession:
        d = json.loads(text)
        return cls(d["session_id"], d["resume_token"], d["principal"], d["avatar"], d["state"])


class SessionStore(Protocol):
    async def save(self, entry: StoredSession, ttl_s: float) -> None: ...

    async def load(self, session_id: str) -> StoredSession | None: ...

    async def delete(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class MemorySessionStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[float, str]] = {}

    async def save(self, entry: StoredSession, ttl_s: float) -> None:
        self._expire()
        # Stored serialised, as a shared store would: no aliasing of live state.
        self._entries[entry.session_id] = (self._clock() + ttl_s, entry.to_json())

    async def load(self, session_id: str) -> StoredSession | None:
        self._expire()
        item = self._entries.get(session_id)
        return None if item is None else StoredSession.from_json(copy.copy(item[1]))

    async def delete(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    async def close(self) -> None:
        self._entries.clear()

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (exp, _) in self._entries.items() if exp <= now]:
            del self._entries[key]
