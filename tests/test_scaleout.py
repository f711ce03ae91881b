"""Several instances: a shared Redis store, SIGKILL and resume elsewhere, nginx affinity."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from agent.client import SessionClient
from tests.conftest import timeout
from tests.serverutil import free_port, server_process, speech_like

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), __import__("socket").create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


def small_args(avatar_dir: Path) -> list[str]:
    config = avatar_dir / "small.yaml"
    config.write_text(
        "avatars:\n  default_avatar:\n    size: 128\n    clip_seconds: [2.0, 4.0]\n"
        "video:\n  max_height: 128\nrenderer:\n  name: cpu\n"
        "server:\n  state_save_interval_s: 0.5\n")
    return ["--avatar-dir", str(avatar_dir), "--config", str(config)]


async def one_turn(client: SessionClient, turn: str) -> dict[str, object]:
    await client.speak(turn, speech_like(0.6, 16000), 16000, realtime=0)
    return await client.wait_message("turn.done", timeout(15), turn=turn)


async def test_session_resumes_on_another_instance_after_sigkill(
    redis_url: str, avatar_dir: Path
) -> None:
    args = [*small_args(avatar_dir), "--state-url", redis_url]
    with server_process(*args) as (proc_a, url_a), server_process(*args) as (_, url_b):
        client = await SessionClient.open(url_a)
        done = await one_turn(client, "t1")
        session = client.record.ready["session"]
        last_seq = client.record.video[-1].header.seq
        await asyncio.sleep(1.0)  # a periodic save between turns
        proc_a.kill()  # SIGKILL: no teardown, no goodbye
        proc_a.wait(10)
        await client._task
        resumed = await SessionClient.open(url_b, hello={
            "resume": {"session": session, "token": done["resume_token"], "last_seq": last_seq}})
        ready = resumed.record.ready
        assert ready["session"] == session and ready["resumed"] is True
        await resumed.wait_for(lambda r: len(r.video) >= 3, timeout(5))
        assert resumed.record.video[0].header.seq > last_seq
        done2 = await one_turn(resumed, "t2")
        assert done2["frames"] > 0
        await resumed.close()


def nginx_config(path: Path, port: int, upstreams: list[str]) -> Path:
    servers = "\n".join(f"    server {u};" for u in upstreams)
    conf = path / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {path}/nginx.pid;
error_log {path}/error.log;
daemon off;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {path}/body;
  proxy_temp_path {path}/proxy;
  fastcgi_temp_path {path}/fastcgi;
  uwsgi_temp_path {path}/uwsgi;
  scgi_temp_path {path}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream avatar {{
    hash $arg_session consistent;
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://avatar;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h;
    }}
  }}
}}
""")
    return conf


async def instance_of(url: str) -> str:
    async with connect(url) as ws:
        assert ws.response is not None
        return str(ws.response.headers["X-Avatar-Instance"])


async def test_nginx_routes_reconnects_to_the_same_instance(
    avatar_dir: Path, tmp_path: Path
) -> None:
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    args = small_args(avatar_dir)  # in-memory stores: resume works only on the same instance
    with server_process(*args) as (_, url_a), server_process(*args) as (_, url_b):
        port = free_port()
        hosts = [u.split("//")[1].split("/")[0] for u in (url_a, url_b)]
        conf = nginx_config(tmp_path, port, hosts)
        proc = await asyncio.to_thread(
            subprocess.Popen, [nginx, "-c", str(conf), "-e", str(tmp_path / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"ws://127.0.0.1:{port}/v1/session"
            for _ in range(100):
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(urllib.request.urlopen,
                                            f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                await asyncio.sleep(0.05)
            # The same key always lands on the same instance; keys spread over both.
            seen = {}
            for key in [f"k{i}" for i in range(12)]:
                first = await instance_of(f"{base}?session={key}")
                assert all([await instance_of(f"{base}?session={key}") == first
                            for _ in range(3)])
                seen[key] = first
            assert len(set(seen.values())) == 2
            # A conversation keyed by its session id resumes through the balancer.
            key = "conversation-42"
            client = await SessionClient.open(f"{base}?session={key}")
            done = await one_turn(client, "t1")
            session = client.record.ready["session"]
            await client.ws.close()
            await client._task
            again = await SessionClient.open(f"{base}?session={key}", hello={
                "resume": {"session": session, "token": done["resume_token"]}})
            assert again.record.ready["resumed"] is True
            assert not again.messages("error")
            await again.close()
        finally:
            proc.terminate()
            proc.wait(10)
