"""The security options of `serve` and the `mint-ticket` verb."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.auth import Authenticator, authenticator_from_config
from agent.cli import build_parser, main, serve_config
from agent.errors import ConfigError, Unauthorized

pytestmark = pytest.mark.unit

KEY = b"0123456789abcdef0123456789abcdef"
TOKEN = "cli-token-0123456789abcdef"


def test_mint_ticket_from_a_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY + b"\n")
    rc = main(["mint-ticket", "--sub", "user-7", "--avatar", "default", "--ttl", "60",
               "--ticket-secret-file", str(key)])
    ticket = capsys.readouterr().out.strip()
    assert rc == 0
    principal = Authenticator(ticket_secret=KEY).authenticate(ticket, time.time())
    assert (principal.id, principal.avatar) == ("ticket:user-7", "default")
    assert principal.expires_at is not None and principal.expires_at <= time.time() + 60
    with pytest.raises(Unauthorized, match="expired"):
        Authenticator(ticket_secret=KEY).authenticate(ticket, time.time() + 61)


def test_mint_ticket_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AVATAR_TICKET_SECRET", KEY.decode())
    assert main(["mint-ticket", "--sub", "u"]) == 0
    ticket = capsys.readouterr().out.strip()
    assert Authenticator(ticket_secret=KEY).authenticate(ticket, time.time()).avatar == "*"
    assert main(["mint-ticket", "--sub", "has space"]) == 2
    assert "sub must be" in capsys.readouterr().err
    monkeypatch.delenv("AVATAR_TICKET_SECRET")
    assert main(["mint-ticket", "--sub", "u"]) == 2
    assert "AVATAR_TICKET_SECRET" in capsys.readouterr().err


def test_serve_options_reach_the_config(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    args = build_parser().parse_args([
        "serve", "--auth-token", TOKEN, "--ticket-secret-file", str(key),
        "--allowed-origin", "https://app.example.com", "--allowed-origin", "http://localhost:3000",
        "--tls-cert", "c.pem", "--tls-key", "k.pem", "--trusted-proxy-hops", "1",
        "--max-sessions-per-token", "3"])
    env = {"AVATAR_AUTH_TOKENS": "env-token-0123456789abc, env-token-two-0123456789"}
    cfg = serve_config(args, env)
    assert [t.get_secret_value() for t in cfg.auth.tokens] == [
        TOKEN, "env-token-0123456789abc", "env-token-two-0123456789"]
    assert cfg.auth.ticket_secret_file == key and cfg.auth.ticket_secret is None
    assert cfg.server.allowed_origins == ("https://app.example.com", "http://localhost:3000")
    assert (cfg.server.tls_cert, cfg.server.tls_key) == (Path("c.pem"), Path("k.pem"))
    assert cfg.server.trusted_proxy_hops == 1 and cfg.limits.max_sessions_per_token == 3
    auth = authenticator_from_config(cfg.auth)
    assert auth.authenticate("env-token-two-0123456789", time.time()).kind == "token"


def test_serve_takes_the_ticket_key_from_the_environment() -> None:
    args = build_parser().parse_args(["serve"])
    cfg = serve_config(args, {"AVATAR_TICKET_SECRET": KEY.decode()})
    assert cfg.auth.ticket_secret is not None
    assert authenticator_from_config(cfg.auth).accepts_tickets
    assert authenticator_from_config(serve_config(args, {}).auth).open


@pytest.mark.parametrize("argv", [
    ["serve", "--tls-cert", "c.pem"],
    ["serve", "--allowed-origin", "https://app.example.com/path"],
    ["serve", "--trusted-proxy-hops", "-1"],
])
def test_bad_serve_options_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        serve_config(build_parser().parse_args(argv), {})
