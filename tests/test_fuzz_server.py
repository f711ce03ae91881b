"""Fuzzing the real server over real WebSockets: hostile sessions, one server for all.

Each example opens a session and plays a random script of valid and invalid
messages, binary frames and pauses (tests/fuzzutil.py). Invariants: the
server never crashes (it still answers /healthz and a fresh session's
ping), a session either goes on (answers ping) or was closed with a
documented code after a documented error, no asyncio task outlives its
connection, and the session's send buffer and turn audio stay bounded.
Examples are few so the test stays short; `AVATAR_FUZZ_EXAMPLES` runs more.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from websockets.exceptions import ConnectionClosed

from agent.client import SessionClient
from agent.connection import SessionConnection
from agent.server import AgentServer
from media.types import RENDER_SAMPLE_RATE
from tests.conftest import timeout
from tests.fuzzutil import OVERSIZE, SESSION_CLOSE_CODES, WIRE_CODES, Action, actions
from tests.serverutil import running_server, small_config

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("AVATAR_FUZZ_EXAMPLES", "20"))
MAX_TURN_S, MAX_QUEUED, RATE = 2.0, 2, 16000


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[AgentServer]:
    cfg = small_config(tmp_path, **{
        "limits.max_turn_s": MAX_TURN_S, "limits.max_queued_turns": MAX_QUEUED,
        "limits.audio_burst_s": 1.0, "limits.audio_realtime_factor": 4.0,
        "limits.abuse_strikes": 4, "limits.max_message_bytes": OVERSIZE // 2,
        "limits.connection_burst": 1000, "server.drain_timeout_s": 1.0})
    async with running_server(cfg) as srv:
        yield srv


def healthz(server: AgentServer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        return int(r.status)


def check_bounds(conn: SessionConnection) -> None:
    """Memory the client controls stays within the configured limits."""
    assert len(conn.sendbuf) <= 2 * conn.cfg.video.send_buffer_frames + 64
    if conn.core is not None:
        audio = sum(t.audio16.view().nbytes + t.audio_out.view().nbytes
                    for t in conn.core._turns)
        assert audio <= (MAX_QUEUED + 1) * MAX_TURN_S * (RATE + RENDER_SAMPLE_RATE) * 4
        assert len(conn.core.pending_turn_ids()) <= MAX_QUEUED + 2


async def play(server: AgentServer, client: SessionClient, script: list[Action]) -> None:
    conn = server.sessions[client.record.ready["session"]]
    for kind, value in script:
        if client._task.done():
            return
        with contextlib.suppress(Exception):  # the server may have closed: checked below
            if kind == "wait":
                await asyncio.sleep(value)
            else:
                await client.ws.send(value)
        check_bounds(conn)
        await asyncio.sleep(0)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(script=actions(max_size=30))
async def test_hostile_sessions_do_not_break_the_server(server: AgentServer,
                                                         script: list[Action]) -> None:
    baseline = len(asyncio.all_tasks())
    client = await SessionClient.open(server.url)
    await play(server, client, script)
    answered = False
    if not client._task.done():
        # Still open: the session must go on, so it answers a ping (a closing one
        # raises ConnectionError; a hung one times out and fails the test).
        with contextlib.suppress(ConnectionError, ConnectionClosed):
            await client.send({"type": "ping", "id": "alive"})
            await client.wait_message("pong", timeout(5), id="alive")
            answered = True
    await client.ws.close()
    await asyncio.wait_for(client._task, timeout(5))
    errors = client.messages("error")  # all of them: the connection is closed now
    event("session went on" if answered else f"closed {client.record.close_code}")
    event(f"errors: {'some' if errors else 'none'}")
    assert all(e["code"] in WIRE_CODES for e in errors)
    assert not any(e["code"] == "internal" for e in errors), errors
    if not answered:
        # Closed by the server: with a documented code, after a fatal error, bye or
        # an oversized message.
        assert client.record.close_code in SESSION_CLOSE_CODES, client.record.close_code
        assert (errors and errors[-1]["fatal"]) or client.messages("bye") or (
            client.record.close_code == 1009)
    # Nothing outlives the connection.
    for _ in range(int(timeout(5) / 0.01)):
        if not (server.sessions or server._pending or len(asyncio.all_tasks()) > baseline):
            break
        await asyncio.sleep(0.01)
    assert not server.sessions and not server._pending
    assert len(asyncio.all_tasks()) <= baseline, asyncio.all_tasks()
    assert await asyncio.to_thread(healthz, server) == 200
    fresh = await SessionClient.open(server.url)
    await fresh.send({"type": "ping", "id": 1})
    await fresh.wait_message("pong", timeout(3), id=1)
    await fresh.close()
