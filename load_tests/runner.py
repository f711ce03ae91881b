"""A load run: spawns simulated users on one event loop and samples the client
and the server while they talk. Modes (`cli.py`) drive it: hold N users for
a duration, or add users step by step.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import signal
import time
import traceback
import urllib.error
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from load_tests.behaviour import spawn_offsets
from load_tests.config import LoadConfig
from load_tests.server_metrics import ServerSample, parse_metrics, scrape
from load_tests.speech import SpeechBank
from load_tests.stats import ClientSeries
from load_tests.user import SimulatedUser, UserContext

LAG_PERIOD_S = 0.1


def http_base(ws_url: str) -> str:
    """ws://host:port/v1/session -> http://host:port"""
    u = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme)
    if scheme is None or not u.netloc:
        raise ValueError(f"--url {ws_url!r} is not a ws:// or wss:// URL")
    return f"{scheme}://{u.netloc}"


async def wait_ready(ws_url: str, timeout_s: float) -> None:
    """Wait until the server's /readyz answers 200; ConnectionError after the timeout."""
    url = http_base(ws_url) + "/readyz"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            await asyncio.to_thread(scrape, url, 2.0)
            return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise ConnectionError(f"{url} is not ready after {timeout_s:.0f} s ({last}); "
                                  "is the server running (python -m agent serve)?")
        await asyncio.sleep(0.5)


def _cpu_seconds() -> float:
    """CPU of this process, every thread included (decoding too)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_cpu_seconds() -> float:
    """CPU seconds every process of this machine has used (Linux /proc/stat); NaN elsewhere.
    With the server on the same machine, the part that is neither client nor server is
    other work competing for the cores."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class LoadRun:
    def __init__(self, cfg: LoadConfig, bank: SpeechBank) -> None:
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.stop = asyncio.Event()  # users leave
        self.cut_short = asyncio.Event()  # Ctrl-C or SIGTERM: end the hold, keep the report
        pool = ThreadPoolExecutor(1, "decode") if cfg.decode != "none" else None
        self.ctx = UserContext(cfg, bank, self.t0, self.stop, pool)
        self.users: list[SimulatedUser] = []
        self.server: list[ServerSample] = []
        self.metrics_errors = 0
        self.series = ClientSeries()
        self._tasks: list[asyncio.Task[None]] = []
        self._monitors: list[asyncio.Task[None]] = []
        self._spawn_rng = np.random.default_rng([cfg.seed, 1 << 20])
        self._cpu_mark: tuple[float, float, float] | None = None  # monotonic, client, machine

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.cut_short.set)
        await self._sample_server()  # the baseline before any user
        self._sample_client()
        self._monitors = [asyncio.create_task(self._lag_monitor()),
                          asyncio.create_task(self._sampler())]

    def spawn(self, n: int) -> None:
        """Add `n` users, started at the run's spawn rate from now."""
        for offset in spawn_offsets(n, self.cfg.spawn_rate, self._spawn_rng):
            user = SimulatedUser(len(self.users), self.ctx)
            self.users.append(user)
            self._tasks.append(asyncio.create_task(self._start_user(user, offset)))

    async def _start_user(self, user: SimulatedUser, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
        if self.stop.is_set():
            return
        try:
            await user.run()
        except Exception:  # a bug in the load tester: visible, counted, the others go on
            traceback.print_exc()
            user.stats.error("load_tester_bug", self.now())

    async def hold(self, seconds: float) -> bool:
        """Let the users talk; False when the run was cut short (Ctrl-C)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.cut_short.wait(), seconds)
        return not self.cut_short.is_set()

    async def finish(self) -> None:
        """Stop every user (each says bye), bounded by the stop grace; final samples."""
        self.stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.cfg.stop_grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._monitors:
            task.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)
        self._sample_client()
        await self._sample_server()
        if self.ctx.decode_pool is not None:
            self.ctx.decode_pool.shutdown(wait=True, cancel_futures=True)

    # --- monitors ---------------------------------------------------------------------

    async def _lag_monitor(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_PERIOD_S)
            self.series.loop_lag.add(self.now(),
                                     max(0.0, loop.time() - before - LAG_PERIOD_S))

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sample_interval_s)
            self._sample_client()
            await self._sample_server()

    def _sample_client(self) -> None:
        now, cpu, machine = time.monotonic(), _cpu_seconds(), _machine_cpu_seconds()
        mark = self._cpu_mark
        s, t = self.series, now - self.t0
        if mark is not None and now > mark[0]:
            s.cpu.add(t, 100.0 * (cpu - mark[1]) / (now - mark[0]))
            s.machine_cpu.add(t, 100.0 * (machine - mark[2]) / (now - mark[0]))
        self._cpu_mark = (now, cpu, machine)
        s.connected.add(t, sum(u.connected for u in self.users))

    async def _sample_server(self) -> None:
        try:
            text = await asyncio.to_thread(scrape, self.cfg.metrics_url)
        except (OSError, ValueError):
            self.metrics_errors += 1
            return
        self.server.append(parse_metrics(text, self.now()))
