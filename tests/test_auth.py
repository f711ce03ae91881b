"""API tokens, session tickets, Origin and client address rules (agent/auth.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.auth import (
    ANONYMOUS,
    AVATAR_ID,
    Authenticator,
    authenticator_from_config,
    bearer_token,
    client_address,
    fingerprint,
    mint_ticket,
    origin_allowed,
)
from agent.config import AgentConfig
from agent.errors import ConfigError, Unauthorized

pytestmark = pytest.mark.unit

TOKEN_A = "tok-A-0123456789abcdef"
TOKEN_B = "tok-B-fedcba9876543210"
SECRET = b"k" * 32
NOW = 1_800_000_000.0


def sign(body: dict[str, object], secret: bytes = SECRET) -> str:
    """A ticket made by hand, the way a backend in another language would."""
    b = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    sig = hmac.new(secret, b.encode(), hashlib.sha256).digest()
    return b + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def test_open_without_credentials() -> None:
    auth = Authenticator()
    assert auth.open
    assert auth.authenticate(None, NOW) is ANONYMOUS
    assert auth.authenticate("anything", NOW) is ANONYMOUS


def test_api_tokens() -> None:
    auth = Authenticator([TOKEN_A, TOKEN_B])
    a = auth.authenticate(TOKEN_A, NOW)
    b = auth.authenticate(TOKEN_B, NOW)
    assert a.kind == b.kind == "token" and a.id != b.id
    assert a.id == "token:" + fingerprint(TOKEN_A)
    assert TOKEN_A not in a.id and TOKEN_A[:6] not in a.id  # the id is safe to log
    assert a.allows("default") and a.allows("other")
    for wrong in (None, "", TOKEN_A[:-1], TOKEN_A + "x", TOKEN_A.upper(), "é" * 20, "x" * 5000):
        with pytest.raises(Unauthorized) as info:
            auth.authenticate(wrong, NOW)
        assert info.value.fatal and info.value.code == "unauthorized"
        assert TOKEN_A not in info.value.message


@pytest.mark.parametrize("bad", ["short", "has space in it 0123", "x" * 5000, "tok\u00e9" * 8])
def test_weak_or_odd_tokens_are_refused_at_start(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        Authenticator([bad])
    assert bad not in str(info.value)


def test_short_ticket_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Authenticator(ticket_secret=b"short")


def test_ticket_round_trip_and_scope() -> None:
    auth = Authenticator(ticket_secret=SECRET)
    ticket = mint_ticket(SECRET, "user-42", "default", now=NOW, ttl_s=300)
    p = auth.authenticate(ticket, NOW + 10)
    assert (p.id, p.kind, p.avatar, p.expires_at) == ("ticket:user-42", "ticket", "default",
                                                      NOW + 300)
    assert p.allows("default") and not p.allows("other")
    anywhere = auth.authenticate(mint_ticket(SECRET, "u", now=NOW, ttl_s=60), NOW)
    assert anywhere.avatar == "*" and anywhere.allows("other")
    # Hand-made tickets in the documented format work too.
    by_hand = sign({"sub": "x", "avatar": "*", "exp": NOW + 5})
    assert auth.authenticate(by_hand, NOW).id == "ticket:x"


def test_ticket_expiry_and_lifetime() -> None:
    auth = Authenticator(ticket_secret=SECRET, ticket_max_ttl_s=600)
    ticket = mint_ticket(SECRET, "u", now=NOW, ttl_s=300)
    auth.authenticate(ticket, NOW + 299)
    with pytest.raises(Unauthorized, match="expired"):
        auth.authenticate(ticket, NOW + 300)
    too_long = mint_ticket(SECRET, "u", now=NOW, ttl_s=3600)
    with pytest.raises(Unauthorized, match="longer"):
        auth.authenticate(too_long, NOW)


@pytest.mark.parametrize(
    "ticket",
    [
        sign({"sub": "u", "avatar": "*", "exp": NOW + 60}, b"z" * 32),  # another key
        sign({"sub": "u", "avatar": "*", "exp": NOW + 60}) + "A",  # signature changed
        sign({"sub": "u", "avatar": "*", "exp": NOW + 60}).replace(".", "x."),  # body changed
        sign({"sub": "u", "avatar": "*", "exp": NOW + 60}).replace(".", ".!"),  # not base64url
        "a.b",
        ".",
    ],
)
def test_forged_tickets_are_refused(ticket: str) -> None:
    with pytest.raises(Unauthorized, match="invalid token"):
        Authenticator(ticket_secret=SECRET).authenticate(ticket, NOW)


@pytest.mark.parametrize(
    "body",
    [
        {"avatar": "*", "exp": NOW + 60},  # no sub
        {"sub": "", "avatar": "*", "exp": NOW + 60},
        {"sub": "has space", "avatar": "*", "exp": NOW + 60},
        {"sub": "u", "exp": NOW + 60},  # no avatar scope
        {"sub": "u", "avatar": "../etc", "exp": NOW + 60},
        {"sub": "u", "avatar": "*"},  # no exp
        {"sub": "u", "avatar": "*", "exp": "soon"},
        {"sub": "u", "avatar": "*", "exp": True},
        ["not", "an", "object"],
    ],
)
def test_signed_but_malformed_payloads_are_refused(body: object) -> None:
    b = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    sig = hmac.new(SECRET, b.encode(), hashlib.sha256).digest()
    ticket = b + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    with pytest.raises(Unauthorized, match="malformed"):
        Authenticator(ticket_secret=SECRET).authenticate(ticket, NOW)


def test_mint_checks_its_input() -> None:
    for kwargs in ({"sub": "a b"}, {"sub": "u", "avatar": "../x"}, {"sub": "u", "ttl_s": 0}):
        with pytest.raises(ValueError):
            mint_ticket(SECRET, now=NOW, **kwargs)
    with pytest.raises(ValueError):
        mint_ticket(b"short", "u", now=NOW)


def test_tokens_and_tickets_together() -> None:
    auth = Authenticator([TOKEN_A], SECRET)
    assert auth.authenticate(TOKEN_A, NOW).kind == "token"
    assert auth.authenticate(mint_ticket(SECRET, "u", now=NOW), NOW).kind == "ticket"
    # A ticket of a server without a key is just a wrong token.
    with pytest.raises(Unauthorized, match="invalid token"):
        Authenticator([TOKEN_A]).authenticate(mint_ticket(SECRET, "u", now=NOW), NOW)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=300),
                 st.from_regex(r"[A-Za-z0-9_-]{0,80}\.[A-Za-z0-9_-]{0,60}", fullmatch=True)))
def test_any_credential_is_a_principal_or_unauthorized(credential: str | None) -> None:
    auth = Authenticator([TOKEN_A], SECRET)
    try:
        principal = auth.authenticate(credential, NOW)
    except Unauthorized as exc:
        assert exc.fatal
        return
    assert principal.kind in ("token", "ticket")


def test_bearer_header() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_origin_rule() -> None:
    allowed = ("https://app.example.com",)
    assert origin_allowed("https://app.example.com", allowed)
    assert origin_allowed("HTTPS://App.Example.com/", allowed)
    assert not origin_allowed("https://evil.example.com", allowed)
    assert not origin_allowed("null", allowed)
    assert origin_allowed(None, allowed)  # not a browser
    assert origin_allowed("https://anything", ())


def test_client_address() -> None:
    assert client_address("10.0.0.1", "1.2.3.4", 0) == "10.0.0.1"  # header not trusted
    assert client_address("10.0.0.1", "6.6.6.6, 1.2.3.4", 1) == "1.2.3.4"
    assert client_address("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.9", 2) == "1.2.3.4"
    assert client_address("10.0.0.1", "1.2.3.4", 2) == "10.0.0.1"  # too few hops: the peer
    assert client_address("10.0.0.1", "not-an-ip", 1) == "10.0.0.1"
    assert client_address("2001:db8::1", None, 0) == client_address("2001:db8::ffff", None, 0)
    assert client_address("2001:db8::1", None, 0) == "2001:db8::/64"
    assert client_address("::ffff:1.2.3.4", None, 0) == "1.2.3.4"


def test_from_config_reads_files(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# backend tokens\n{TOKEN_A}\n\n  {TOKEN_B}  \n")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    cfg = AgentConfig().with_overrides({"auth.token_file": str(tokens),
                                        "auth.ticket_secret_file": str(secret)})
    auth = authenticator_from_config(cfg.auth)
    assert auth.authenticate(TOKEN_B, NOW).kind == "token"
    assert auth.authenticate(mint_ticket(SECRET, "u", now=NOW), NOW).kind == "ticket"
    tokens.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        authenticator_from_config(cfg.auth)
    missing = AgentConfig().with_overrides({"auth.token_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="cannot read"):
        authenticator_from_config(missing.auth)


def test_config_hides_secrets() -> None:
    cfg = AgentConfig().with_overrides({"auth.tokens": (TOKEN_A,),
                                        "auth.ticket_secret": SECRET.decode()})
    assert TOKEN_A not in repr(cfg) and SECRET.decode() not in repr(cfg)
    assert authenticator_from_config(cfg.auth).authenticate(TOKEN_A, NOW).kind == "token"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=70), st.from_regex(r"[a-z0-9_.-]{0,70}", fullmatch=True)))
def test_ticket_avatar_rule_is_the_avatar_cache_rule(avatar_id: str) -> None:
    from media.avatar_cache import validate_avatar_id

    try:
        validate_avatar_id(avatar_id)
    except ValueError:
        assert not AVATAR_ID.fullmatch(avatar_id)
    else:
        assert AVATAR_ID.fullmatch(avatar_id)
