"""Who may open a session: static API tokens and signed session tickets, sans I/O.

Two kinds of credential, both sent in `hello.token` or an `Authorization:
Bearer` header:

- API tokens: long random strings a backend keeps (`serve --auth-token`).
  The principal is `token:` plus a fingerprint (a hash prefix), so logs and
  the session store never hold the token itself.
- Session tickets: short-lived, signed by a backend for one browser.
  `base64url(payload JSON) "." base64url(HMAC-SHA256(key, first part))`,
  payload `{"sub": "...", "avatar": "<id>" or "*", "exp": <unix s>, "iat": ...}`.
  The principal is `ticket:` plus `sub`; `avatar` limits which avatar it opens.

Secrets are compared in constant time (digests of equal length, every token
tried). Time is a parameter. Reading token and key files happens in the
loaders at the bottom, called at start-up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.config import AuthConfig
from agent.errors import ConfigError, Unauthorized

ANY_AVATAR = "*"
MIN_TOKEN_CHARS = 16  # API tokens shorter than this are refused at start-up
MIN_SECRET_BYTES = 32  # HMAC keys shorter than this are refused at start-up
MAX_CREDENTIAL_CHARS = 4096  # the wire limit of hello.token
AVATAR_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # as media.avatar_cache.validate_avatar_id
SUBJECT = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces
_TOKEN = re.compile(r"[\x21-\x7e]+")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_INVALID = "invalid token"  # one message for every wrong credential: no oracle


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a session belongs to. `id` is stable across connections (a resume must
    come from the same id) and safe to log."""

    id: str
    kind: Literal["anonymous", "token", "ticket"]
    avatar: str = ANY_AVATAR  # the one avatar it may open, or "*"
    expires_at: float | None = None  # unix seconds; tickets only

    def allows(self, avatar_id: str) -> bool:
        return self.avatar in (ANY_AVATAR, avatar_id)


ANONYMOUS = Principal("anonymous", "anonymous")


def fingerprint(token: str) -> str:
    """A short, loggable name for an API token (not reversible for random tokens)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def check_token(token: str) -> None:
    """Start-up check of an API token; the message never repeats the token."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("an API token must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"an API token must have at least {MIN_TOKEN_CHARS} characters (token "
            f"{fingerprint(token)}); make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if len(token) > MAX_CREDENTIAL_CHARS:
        raise ValueError(f"an API token may have at most {MAX_CREDENTIAL_CHARS} characters")


class Authenticator:
    """Maps a credential to a `Principal`, or raises `Unauthorized`."""

    def __init__(self, tokens: Sequence[str] = (), ticket_secret: bytes | None = None, *,
                 ticket_max_ttl_s: float = 3600.0) -> None:
        for token in tokens:
            check_token(token)
        if ticket_secret is not None and len(ticket_secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the ticket secret must have at least {MIN_SECRET_BYTES} bytes; "
                             "make one with `openssl rand -hex 32`")
        # Digests, so every comparison is between 32-byte values: no length leak.
        self._tokens = tuple({_digest(t): fingerprint(t) for t in tokens}.items())
        self._secret = ticket_secret
        self._max_ttl_s = ticket_max_ttl_s

    @property
    def open(self) -> bool:
        """No credential configured: every client is `anonymous`."""
        return not self._tokens and self._secret is None

    @property
    def accepts_tickets(self) -> bool:
        return self._secret is not None

    def authenticate(self, credential: str | None, now: float) -> Principal:
        """The principal for a credential; `now` is unix seconds (ticket expiry)."""
        if self.open:
            return ANONYMOUS
        if not credential:
            raise Unauthorized("a token is required: send it in hello.token or an "
                               "Authorization: Bearer header")
        if len(credential) > MAX_CREDENTIAL_CHARS or not credential.isascii():
            raise Unauthorized(_INVALID)
        digest = _digest(credential)
        found = ""
        for candidate, name in self._tokens:  # all of them: time does not say which matched
            if hmac.compare_digest(candidate, digest):
                found = name
        if found:
            return Principal("token:" + found, "token")
        if self._secret is not None and credential.count(".") == 1:
            return self._ticket(credential, now)
        raise Unauthorized(_INVALID)

    def _ticket(self, ticket: str, now: float) -> Principal:
        assert self._secret is not None
        body, _, sig = ticket.partition(".")
        expected = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
        given = _b64decode(sig)
        if given is None or not hmac.compare_digest(given, expected):
            raise Unauthorized(_INVALID)
        # Signed by us from here on; still checked, as a key may be shared with a buggy minter.
        claims = _claims(_b64decode(body))
        if claims is None:
            raise Unauthorized("session ticket payload is malformed")
        sub, avatar, exp = claims
        if exp <= now:
            raise Unauthorized("session ticket expired; ask your backend for a new one")
        if exp - now > self._max_ttl_s:
            raise Unauthorized(f"session ticket lives longer than the server's limit of "
                               f"{self._max_ttl_s:g} s")
        return Principal("ticket:" + sub, "ticket", avatar, exp)


def mint_ticket(secret: bytes, sub: str, avatar: str = ANY_AVATAR, *, now: float,
                ttl_s: float = 300.0) -> str:
    """A session ticket for `sub`, valid from `now` (unix seconds) for `ttl_s`."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the ticket secret must have at least {MIN_SECRET_BYTES} bytes")
    if not SUBJECT.fullmatch(sub):
        raise ValueError("sub must be 1-128 printable ASCII characters without spaces")
    if avatar != ANY_AVATAR and not AVATAR_ID.fullmatch(avatar):
        raise ValueError(f"avatar must be '*' or an avatar id ({AVATAR_ID.pattern})")
    if not ttl_s > 0:
        raise ValueError("ttl_s must be positive")
    claims = {"sub": sub, "avatar": avatar, "iat": int(now), "exp": int(now + ttl_s)}
    body = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    sig = _b64encode(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def bearer_token(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <token>` header, if that is its form."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket handshake's Origin may open a session.

    Browsers always send Origin; other clients usually do not and cannot be
    stopped by it (they could send any value), so a missing Origin passes:
    this check protects browsers from cross-site use, tokens protect the rest.
    `allowed` holds lower-case origins; empty allows any.
    """
    if not allowed or origin is None:
        return True
    return origin.strip().lower().rstrip("/") in allowed


def client_address(peer: str, forwarded_for: str | None, trusted_hops: int) -> str:
    """The address limits apply to: the peer, or with `trusted_hops` proxies in front
    the address the outermost trusted proxy saw (X-Forwarded-For, counted from the
    right, as each proxy appends). IPv6 clients are grouped by /64, as one host
    usually holds a whole /64."""
    address = peer
    if trusted_hops > 0 and forwarded_for:
        hops = [h.strip() for h in forwarded_for.split(",")]
        if len(hops) >= trusted_hops:
            address = hops[-trusted_hops]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# --- loaders (start-up I/O) --------------------------------------------------


def read_token_file(path: Path) -> tuple[str, ...]:
    """API tokens, one per line; blank lines and lines starting with # are skipped."""
    try:
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path} must be ASCII text") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def read_secret_file(path: Path) -> bytes:
    """A key file's bytes without surrounding whitespace (a trailing newline is common)."""
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read ticket secret file {path}: {exc.strerror}") from None


def world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o004)
    except OSError:
        return False


def authenticator_from_config(cfg: AuthConfig) -> Authenticator:
    """The authenticator the config asks for, reading token and key files now."""
    tokens = [t.get_secret_value() for t in cfg.tokens]
    if cfg.token_file is not None:
        tokens.extend(read_token_file(cfg.token_file))
    secret = cfg.ticket_secret.get_secret_value().encode() if cfg.ticket_secret else None
    if cfg.ticket_secret_file is not None:
        secret = read_secret_file(cfg.ticket_secret_file)
    try:
        return Authenticator(tokens, secret, ticket_max_ttl_s=cfg.ticket_max_ttl_s)
    except ValueError as exc:
        raise ConfigError(f"auth: {exc}") from None


# --- helpers -----------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes | None:
    """Strict unpadded base64url; None for anything else (the stdlib skips stray bytes)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _claims(raw: bytes | None) -> tuple[str, str, float] | None:
    """(sub, avatar, exp) of a ticket payload, or None when it is malformed."""
    if raw is None:
        return None
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    sub, avatar, exp = data.get("sub"), data.get("avatar"), data.get("exp")
    if not isinstance(sub, str) or not SUBJECT.fullmatch(sub):
        return None
    if not isinstance(avatar, str) or not (avatar == ANY_AVATAR or AVATAR_ID.fullmatch(avatar)):
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp != exp:
        return None
    return sub, avatar, float(exp)

