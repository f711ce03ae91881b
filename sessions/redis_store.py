"""A `SessionStore` in Redis: resumable state shared by every instance.

Each session is one string key `avatar:session:<id>` holding the
`StoredSession` JSON, written with a TTL (`SET ... PX`). Loading a session
for resume reads it; the resuming instance then deletes it. Instances save
live sessions periodically, so a session whose instance dies (SIGKILL) can
resume elsewhere from its last save.
"""

from __future__ import annotations

from urllib.parse import urlparse

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agent.errors import ConfigError
from sessions.store import StoredSession

PREFIX = "avatar:session:"


class RedisSessionStore:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ConfigError(f"--state-url must look like redis://HOST:PORT/DB, got {url!r}")
        self.url = url
        self._redis: Redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def ping(self) -> None:
        """Fail fast at start-up when the store is unreachable."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise ConfigError(f"cannot reach the session store at {self.url}: {exc}") from None

    async def save(self, entry: StoredSession, ttl_s: float) -> None:
        await self._redis.set(PREFIX + entry.session_id, entry.to_json(),
                              px=max(int(ttl_s * 1000), 1))

    async def load(self, session_id: str) -> StoredSession | None:
        raw = await self._redis.get(PREFIX + session_id)
        return None if raw is None else StoredSession.from_json(raw)

    async def delete(self, session_id: str) -> None:
        await self._redis.delete(PREFIX + session_id)

    async def close(self) -> None:
        await self._redis.aclose()
