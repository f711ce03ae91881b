"""The avatars a server offers: the prepared ones in the cache folder plus the default."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.config import AvatarConfig
from agent.errors import NotFound
from media.avatar import Avatar
from media.avatar_cache import AvatarNotFound, list_avatars, load_avatar, validate_avatar_id
from media.default_avatar import ensure_default_avatar


class AvatarRegistry:
    """Loads avatars on first use and keeps them (read-only, shared by sessions)."""

    def __init__(self, config: AvatarConfig) -> None:
        self.config = config
        self.root = Path(config.cache_dir).expanduser()
        self._loaded: dict[str, Avatar] = {}
        self._lock = threading.Lock()

    def warmup(self) -> Avatar:
        """Build (first run) or load the default avatar; called off the event loop."""
        self.root.mkdir(parents=True, exist_ok=True)
        avatar = ensure_default_avatar(self.root, self.config.default_avatar, self.config.fps)
        with self._lock:
            self._loaded[avatar.id] = avatar
        return avatar

    def loaded(self) -> list[str]:
        """The avatars in memory (loaded by `warmup` or a `get`), sorted."""
        with self._lock:
            return sorted(self._loaded)

    def ids(self) -> list[str]:
        found = set(list_avatars(self.root)) if self.root.is_dir() else set()
        return sorted(found | set(self._loaded))

    def get(self, avatar_id: str) -> Avatar:
        try:
            validate_avatar_id(avatar_id)
        except ValueError as exc:
            raise NotFound(str(exc), fatal=True) from None
        with self._lock:
            if avatar_id in self._loaded:
                return self._loaded[avatar_id]
        try:
            avatar = load_avatar(self.root, avatar_id)
        except AvatarNotFound:
            raise NotFound(f"no avatar {avatar_id!r}; see GET /v1/avatars", fatal=True) from None
        if avatar.fps != self.config.fps:
            raise NotFound(f"avatar {avatar_id!r} is {avatar.fps} fps; this server runs "
                           f"{self.config.fps} fps", fatal=True)
        with self._lock:
            self._loaded.setdefault(avatar_id, avatar)
            return self._loaded[avatar_id]

    def describe(self) -> list[dict[str, object]]:
        out = []
        for avatar_id in self.ids():
            try:
                out.append(self.get(avatar_id).describe())
            except NotFound:
                continue
        return out
