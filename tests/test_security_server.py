"""Authentication, Origin, limits, resume binding and TLS on the real server."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import json
import ssl
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from agent.auth import mint_ticket
from agent.client import SessionClient, SessionRefused
from agent.config import AgentConfig
from agent.server import AgentServer, _static_file
from tests.conftest import timeout
from tests.serverutil import running_server, small_config, speech_like

pytestmark = pytest.mark.integration

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-fedcba9876543210"
SECRET = "s" * 40


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


def secure_config(avatar_dir: Path, **overrides: Any) -> AgentConfig:
    return small_config(avatar_dir, **{"auth.tokens": (TOKEN_A, TOKEN_B), **overrides})


async def refusal(url: str, hello: dict[str, Any] | None = None, **kw: Any) -> SessionRefused:
    with pytest.raises(SessionRefused) as info:
        client = await SessionClient.open(url, hello=hello, **kw)
        await client.close()
    return info.value


async def first_reply(ws: ClientConnection) -> dict[str, Any]:
    """The server's first message on a connection, and wait for the close."""
    reply = json.loads(await asyncio.wait_for(ws.recv(), timeout(3)))
    await asyncio.wait_for(ws.wait_closed(), timeout(3))
    return dict(reply)


async def settled(server: AgentServer) -> None:
    """Wait until the server has finished with closed connections."""
    for _ in range(200):
        if not server.sessions and not server._pending and not server._awaiting_hello:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("server kept state of closed connections")


async def test_open_server_says_so(avatar_dir: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_server(small_config(avatar_dir)) as srv:
            client = await SessionClient.open(srv.url)
            await client.close()
    warnings = [e for e in logs if e["event"] == "auth_disabled"]
    assert warnings and warnings[0]["log_level"] == "warning"
    assert "NO AUTHENTICATION" in warnings[0]["message"]


async def test_token_in_hello_or_header(avatar_dir: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_server(secure_config(avatar_dir)) as srv:
            a = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
            b = await SessionClient.open(
                srv.url, additional_headers={"Authorization": f"Bearer {TOKEN_B}"})
            assert a.record.ready["session"] != b.record.ready["session"]
            await a.close()
            await b.close()
            for hello in ({}, {"token": "wrong-token-0123456789"}, {"token": TOKEN_A[:-1]}):
                err = await refusal(srv.url, hello)
                assert err.error["code"] == "unauthorized" and err.close_code == 1008
            err = await refusal(srv.url, additional_headers={"Authorization": "Basic abc"})
            assert err.error["code"] == "unauthorized"
    assert not any(e["event"] == "auth_disabled" for e in logs)
    assert all(TOKEN_A not in repr(e) and TOKEN_B not in repr(e) for e in logs)


async def test_nothing_is_allocated_before_authentication(avatar_dir: Path) -> None:
    cfg = secure_config(avatar_dir, **{"server.max_sessions": 1})
    async with running_server(cfg) as srv:
        loaded = set(srv.avatars._loaded)
        # Wrong token with a bad avatar and version: authentication answers first.
        err = await refusal(srv.url, {"token": "x" * 20, "avatar": "nobody", "v": 2})
        assert err.error["code"] == "unauthorized"
        await settled(srv)
        assert set(srv.avatars._loaded) == loaded
        assert srv.quota.held(srv.auth.authenticate(TOKEN_A, time.time())) == 0
        # Authenticated hellos that fail later give their slot back (max_sessions is 1).
        for hello in ({"avatar": "nobody"}, {"audio": {"rate": 8000}}, {"video": {"fps": 7}}):
            err = await refusal(srv.url, {"token": TOKEN_A, **hello})
            assert err.error["code"] in ("not_found", "unsupported")
        await settled(srv)
        client = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
        await client.close()
        _, _, body = await asyncio.to_thread(http_get, srv, "/metrics")
        assert 'avatar_chunks_total{outcome="ok"} 0.0' in body


async def test_hello_deadline(avatar_dir: Path) -> None:
    async with running_server(small_config(avatar_dir, **{"server.hello_timeout_s": 0.3})) as srv:
        async with connect(srv.url) as ws:
            reply = await first_reply(ws)
        assert reply["code"] == "timeout" and reply["fatal"]
        assert ws.close_code == 1008
        await settled(srv)


async def test_message_size_is_small_until_authenticated(avatar_dir: Path) -> None:
    async with running_server(secure_config(avatar_dir)) as srv:
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "x" * 4000, "pad": "y" * 20000}))
            await asyncio.wait_for(ws.wait_closed(), timeout(3))
        assert ws.close_code == 1009
        # After hello, messages up to limits.max_message_bytes are fine.
        client = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
        await client.send({"type": "speak.start", "turn": "t", "text": "z" * 60000})
        await client.send({"type": "ping", "id": 1})
        await client.wait_message("pong", timeout(3), id=1)
        assert not client.messages("error")
        await client.close()


async def test_session_tickets(avatar_dir: Path) -> None:
    cfg = small_config(avatar_dir, **{"auth.ticket_secret": SECRET})
    key = SECRET.encode()
    async with running_server(cfg) as srv:
        ticket = mint_ticket(key, "user-1", "default", now=time.time(), ttl_s=60)
        client = await SessionClient.open(srv.url, hello={"token": ticket})
        assert client.record.ready["session"]
        await client.close()
        # No avatar in hello: a ticket for one avatar opens that one.
        other = mint_ticket(key, "user-1", "other", now=time.time(), ttl_s=60)
        err = await refusal(srv.url, {"token": other})
        assert err.error["code"] == "not_found" and "'other'" in err.error["message"]
        err = await refusal(srv.url, {"token": other, "avatar": "default"})
        assert err.error["code"] == "unauthorized" and "avatar" in err.error["message"]
        expired = mint_ticket(key, "user-1", now=time.time() - 120, ttl_s=60)
        err = await refusal(srv.url, {"token": expired})
        assert err.error["code"] == "unauthorized" and "expired" in err.error["message"]
        forged = mint_ticket(b"k" * 32, "user-1", now=time.time(), ttl_s=60)
        err = await refusal(srv.url, {"token": forged})
        assert err.error["code"] == "unauthorized"


async def test_allowed_origin(avatar_dir: Path) -> None:
    cfg = small_config(avatar_dir, **{"server.allowed_origins": ("https://app.example.com",)})
    async with running_server(cfg) as srv:
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.url, origin="https://evil.example.com"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
        for origin in ("https://app.example.com", None):
            client = await SessionClient.open(srv.url, origin=origin)
            await client.close()
        # Plain HTTP endpoints are not WebSocket handshakes and stay reachable.
        assert (await asyncio.to_thread(http_get, srv, "/healthz"))[0] == 200


async def test_sessions_per_token(avatar_dir: Path) -> None:
    async with running_server(secure_config(avatar_dir, **{
            "limits.max_sessions_per_token": 1})) as srv:
        first = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
        err = await refusal(srv.url, {"token": TOKEN_A})
        assert err.error["code"] == "overloaded" and err.close_code == 1013
        assert err.error["retry_after_ms"] > 0
        other = await SessionClient.open(srv.url, hello={"token": TOKEN_B})
        await first.close()
        await other.close()
        await settled(srv)
        again = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
        await again.close()


async def test_connection_rate_per_address(avatar_dir: Path) -> None:
    cfg = small_config(avatar_dir, **{"limits.connections_per_s": 0.2,
                                      "limits.connection_burst": 2, "limits.abuse_strikes": 3})
    async with running_server(cfg) as srv:
        for _ in range(2):
            client = await SessionClient.open(srv.url)
            await client.close()
        codes = []
        for _ in range(3):
            async with connect(srv.url) as ws:
                reply = await first_reply(ws)
            codes.append((reply["code"], ws.close_code, reply["retry_after_ms"] > 0))
        assert codes[:2] == [("overloaded", 1013, True)] * 2
        assert codes[2] == ("unauthorized", 1008, True)  # kept trying while refused
        _, _, body = await asyncio.to_thread(http_get, srv, "/metrics")
        assert 'avatar_admission_rejections_total{reason="connection_rate"} 2.0' in body
        assert 'avatar_admission_rejections_total{reason="blocked"} 1.0' in body


async def test_failed_authentication_blocks_the_address(avatar_dir: Path) -> None:
    async with running_server(secure_config(avatar_dir, **{"limits.abuse_strikes": 3})) as srv:
        for _ in range(3):
            err = await refusal(srv.url, {"token": "guess-0123456789abcdef"})
            assert err.error["code"] == "unauthorized"
        async with connect(srv.url) as ws:  # refused before any hello
            reply = await first_reply(ws)
        assert reply["code"] == "unauthorized" and ws.close_code == 1008
        assert "blocked" in reply["message"] and reply["retry_after_ms"] > 0


async def test_pending_hellos_are_capped(avatar_dir: Path) -> None:
    async with running_server(small_config(avatar_dir, **{
            "limits.max_pending_hellos": 2, "server.hello_timeout_s": 2.0})) as srv:
        async with connect(srv.url) as w1, connect(srv.url) as w2:
            await asyncio.sleep(0.05)
            async with connect(srv.url) as w3:
                reply = await first_reply(w3)
            assert reply["code"] == "overloaded" and w3.close_code == 1013
            await w1.close()
            await w2.close()
        await settled(srv)
        client = await SessionClient.open(srv.url)
        await client.close()


async def test_audio_faster_than_real_time(avatar_dir: Path) -> None:
    cfg = small_config(avatar_dir, **{"limits.audio_realtime_factor": 2.0,
                                      "limits.audio_burst_s": 0.5, "limits.abuse_strikes": 5})
    async with running_server(cfg) as srv:
        client = await SessionClient.open(srv.url)
        await client.send({"type": "speak.start", "turn": "t1"})
        audio = speech_like(2.0, 16000)
        for i in range(0, len(audio), 320):  # 20 ms frames, all at once
            await client.send_audio(audio[i : i + 320])
        await client._task
        errors = client.messages("error")
        assert errors[0]["code"] == "bad_request" and "faster than 2x" in errors[0]["message"]
        assert not errors[0]["fatal"] and errors[-1]["fatal"]
        assert len(errors) == 5 and client.record.close_code == 1008
        # The close does not wait for the flood to be read: the session is gone at once.
        await settled(srv)


async def test_audio_in_real_time_is_accepted(avatar_dir: Path) -> None:
    cfg = small_config(avatar_dir, **{"limits.audio_realtime_factor": 1.5,
                                      "limits.audio_burst_s": 0.2})
    async with running_server(cfg) as srv:
        client = await SessionClient.open(srv.url)
        await client.speak("t1", speech_like(1.0, 16000), 16000, realtime=1.0)
        await client.wait_message("turn.done", timeout(10), turn="t1")
        assert not client.messages("error")
        await client.close()


async def test_message_flood(avatar_dir: Path) -> None:
    cfg = small_config(avatar_dir, **{"limits.control_messages_per_s": 5.0,
                                      "limits.control_message_burst": 5,
                                      "limits.abuse_strikes": 3})
    async with running_server(cfg) as srv:
        client = await SessionClient.open(srv.url)
        for i in range(20):
            await client.send({"type": "ping", "id": i})
        await client._task
        assert len(client.messages("pong")) >= 5
        errors = client.messages("error")
        assert [e["fatal"] for e in errors] == [False, False, True]
        assert client.record.close_code == 1008
        await settled(srv)


async def test_resume_is_bound_to_its_principal(avatar_dir: Path) -> None:
    async with running_server(secure_config(avatar_dir)) as srv:
        a = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
        session, token = a.record.ready["session"], a.record.ready["resume_token"]
        await a.ws.close()
        await a._task
        await settled(srv)
        resume = {"session": session, "token": token}
        b = await SessionClient.open(srv.url, hello={"token": TOKEN_B, "resume": resume})
        err = b.messages("error")[0]
        assert err["code"] == "resume_failed" and b.record.ready["session"] != session
        await b.close()
        # The refused attempt did not use the token up: its owner still resumes.
        a2 = await SessionClient.open(srv.url, hello={"token": TOKEN_A, "resume": resume})
        assert a2.record.ready["resumed"] and a2.record.ready["session"] == session
        assert a2.record.ready["resume_token"] != token  # rotated
        await a2.close()


async def test_resume_answers_alike_for_every_failure(avatar_dir: Path) -> None:
    async with running_server(small_config(avatar_dir)) as srv:
        a = await SessionClient.open(srv.url)
        session = a.record.ready["session"]
        await a.ws.close()
        await a._task
        await settled(srv)
        messages = set()
        for resume in ({"session": "no-such-session", "token": "t"},
                       {"session": session, "token": "wrong"},
                       {"session": session, "token": "\u00e9t\u00e9"}):  # non-ASCII: no crash
            c = await SessionClient.open(srv.url, hello={"resume": resume})
            (err,) = c.messages("error")
            assert err["code"] == "resume_failed"
            messages.add(err["message"])
            await c.close()
        assert len(messages) == 1


async def test_resume_takes_over_a_live_session(avatar_dir: Path) -> None:
    async with running_server(small_config(avatar_dir)) as srv:
        a = await SessionClient.open(srv.url)
        await a.speak("t1", speech_like(0.4, 16000), 16000, realtime=0)
        done = await a.wait_message("turn.done", timeout(10), turn="t1")
        resume = {"session": a.record.ready["session"], "token": done["resume_token"]}
        b = await SessionClient.open(srv.url, hello={"resume": resume})
        assert b.record.ready["resumed"]
        await asyncio.wait_for(a._task, timeout(3))
        assert a.record.close_code == 1008
        await asyncio.sleep(0.05)
        assert list(srv.sessions) == [resume["session"]]  # b's, kept when a went
        await b.wait_for(lambda r: len(r.video) >= 3, timeout(3))
        await b.close()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls(avatar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path)
    cfg = secure_config(avatar_dir, **{"server.tls_cert": str(cert), "server.tls_key": str(key)})
    trust = ssl.create_default_context(cafile=str(cert))
    async with running_server(cfg) as srv:
        assert srv.url.startswith("wss://")
        client = await SessionClient.open(srv.url, hello={"token": TOKEN_A}, ssl=trust)
        await client.wait_for(lambda r: len(r.video) >= 2, timeout(3))
        await client.close()
        # A client that does not trust the certificate cannot connect.
        with pytest.raises(ssl.SSLCertVerificationError):
            await SessionClient.open(srv.url, ssl=ssl.create_default_context())


def http_get(server: AgentServer, path: str) -> tuple[int, dict[str, str], str]:
    """GET with the path sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


async def test_http_serves_only_what_it_names(avatar_dir: Path) -> None:
    async with running_server(small_config(avatar_dir)) as srv:
        for path in ("/web/../agent/server.py", "/web/%2e%2e/agent/server.py",
                     "/web/..%2fagent%2fserver.py", "/web/.env", "/web/a/b.js",
                     "/agent/server.py", "/v1/avatars/../metrics", "/web/server.py",
                     "//etc/passwd", "/healthz/", "/v1/avatars/default"):
            status, headers, _ = await asyncio.to_thread(http_get, srv, path)
            assert status == 404, path
            assert headers["X-Content-Type-Options"] == "nosniff"
        assert (await asyncio.to_thread(http_get, srv, "/healthz?x=../../"))[0] == 200


def test_static_files_stay_in_their_folder(tmp_path: Path) -> None:
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<p>hi</p>")
    (web / "app.min.js").write_text("1")
    (web / ".secret.js").write_text("2")
    (web / "notes.txt").write_text("3")
    (tmp_path / "outside.js").write_text("4")
    (web / "link.js").symlink_to(tmp_path / "outside.js")
    (web / "dir.js").mkdir()
    assert _static_file("/", web) == (b"<p>hi</p>", "text/html; charset=utf-8")
    assert _static_file("/web/app.min.js", web) is not None
    for path in ("/web/.secret.js", "/web/notes.txt", "/web/link.js", "/web/dir.js",
                 "/web/../outside.js", "/web/%2e%2e/outside.js", "/web/", "/index.html",
                 "/web/app..js", "/web/app.js\x00"):
        assert _static_file(path, web) is None, path


async def test_speech_still_works_with_every_limit_on(avatar_dir: Path) -> None:
    """The defaults do not get in a normal client's way (TTS bursts included)."""
    async with running_server(secure_config(avatar_dir)) as srv:
        client = await SessionClient.open(srv.url, hello={"token": TOKEN_A})
        await client.speak("t1", speech_like(3.0, 16000), 16000, realtime=0)
        await client.speak("t2", np.zeros(4000, np.float32), 16000, realtime=0)
        await client.wait_message("turn.done", timeout(15), turn="t2")
        assert not client.messages("error")
        await client.close()
