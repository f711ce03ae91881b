"""The browser page (agent/web) in a real headless Chromium against the real server.

Debian's chromium driven by playwright's Python package (`executable_path`,
no browser download). The page connects, draws idle video, says a WAV file
set on its file input (H.264 through WebCodecs where this Chromium decodes
it, and JPEG), and the speech frames it draws open the mouth on the canvas
(checked by pixels), then idles; with Chromium's fake microphone playing a
WAV, the page's voice activity detection turns speech into a turn that
barges in on the avatar; a dropped connection is resumed; the page's wire
codec and VAD modules are checked in the browser against the server's
codec. Screenshots go to ARTIFACT_DIR (default test-artifacts/). Skips when
chromium or playwright is missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import CloseCode
from agent.protocol import FrameFlags, MediaHeader, MediaKind, pack_media
from agent.server import AgentServer
from media.audio import float_to_pcm16
from tests.conftest import REPO, timeout
from tests.serverutil import running_server, small_config, speech_like

pytestmark = pytest.mark.integration

CHROMIUM = Path(os.environ.get("AVATAR_CHROMIUM", "/usr/bin/chromium"))
ARTIFACT_DIR = Path(os.environ.get("ARTIFACT_DIR", REPO / "test-artifacts"))
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Headless has no user to click: let the AudioContext run without a gesture.
    "--autoplay-policy=no-user-gesture-required",
]
RATE = 16000
FPS = 25


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture
def playwright_api() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium "
                    "(scripts/install-test-deps.sh), or set AVATAR_CHROMIUM")
    return pytest.importorskip(
        "playwright.async_api",
        reason="playwright is not installed (pip install playwright; no browser download needed)")


@pytest.fixture
def artifact_dir() -> Path:
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACT_DIR


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@dataclass
class Browser:
    page: Any
    problems: list[str] = field(default_factory=list)  # console errors, page errors

    async def stats(self) -> dict[str, Any]:
        return dict(await self.page.evaluate("() => structuredClone(window.avatarStats)"))

    async def wait(self, condition: str, seconds: float) -> None:
        await self.page.wait_for_function(condition, timeout=timeout(seconds) * 1000)


@contextlib.asynccontextmanager
async def open_page(api: Any, server: AgentServer, query: str, extra_args: list[str] | None = None
                    ) -> AsyncIterator[Browser]:
    async with api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM),
                                           args=LAUNCH_ARGS + (extra_args or []))
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 780})
            b = Browser(page)
            page.on("console", lambda m: b.problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: b.problems.append(str(e)))
            await page.goto(f"http://127.0.0.1:{server.port}/?{query}")
            yield b
        finally:
            await browser.close()


def mouth_box(server: AgentServer, width: int, height: int) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 on the canvas around the neutral mouth, from the avatar's face points."""
    avatar = server.avatars.get("default")
    g = avatar.source.geometry(avatar.neutral)  # (8, 2) x, y at avatar resolution
    sx, sy = width / avatar.width, height / avatar.height
    left, right, upper, lower, chin = g[3], g[4], g[5], g[6], g[7]
    x0, x1 = (left[0] - 2) * sx, (right[0] + 2) * sx
    y0, y1 = (upper[1] - 2) * sy, ((lower[1] + chin[1]) / 2) * sy
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))


async def sample_mouth(b: Browser, box: tuple[int, int, int, int]
                       ) -> tuple[dict[str, Any] | None, np.ndarray]:
    """The last drawn frame's metadata and the mouth pixels it left on the canvas (one task)."""
    x0, y0, x1, y1 = box
    meta, data = await b.page.evaluate(
        """([x0, y0, w, h]) => {
             const c = document.getElementById('video').getContext('2d');
             return [window.avatarStats.lastDrawn, Array.from(c.getImageData(x0, y0, w, h).data)];
           }""", [x0, y0, x1 - x0, y1 - y0])
    pixels = np.asarray(data, dtype=np.float32).reshape(y1 - y0, x1 - x0, 4)[..., :3]
    return meta, pixels


def nearest(pixels: np.ndarray, references: list[np.ndarray]) -> float:
    """Mean absolute difference (0-255) to the most similar reference picture."""
    return min(float(np.abs(pixels - r).mean()) for r in references)


def dark_pixels(pixels: np.ndarray) -> int:
    """Pixels darker than any lip or skin: the inside of an open mouth."""
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    return int((luma < 60).sum())


async def h264_supported(b: Browser) -> bool:
    return bool(await b.page.evaluate(
        """async () => typeof VideoDecoder === 'function' &&
             (await VideoDecoder.isConfigSupported({codec: 'avc1.42E01F'})).supported"""))


@pytest.mark.parametrize("codec", ["auto", "jpeg"])
async def test_page_plays_a_wav_turn(playwright_api: Any, avatar_dir: Path, tmp_path: Path,
                                     artifact_dir: Path, codec: str) -> None:
    wav = write_wav(tmp_path / "turn.wav", speech_like(2.0, RATE, seed=3))
    async with running_server(small_config(avatar_dir)) as server, \
            open_page(playwright_api, server, f"codec={codec}") as b:
        await b.wait("window.avatarStats.framesDrawn >= 12", 15)
        stats = await b.stats()
        expected = "h264" if codec == "auto" and await h264_supported(b) else "jpeg"
        assert (stats["state"], stats["codec"], stats["rate"]) == ("connected", expected, RATE)
        print(f"codec {codec}: page uses {stats['codec']} ({stats['codecReason']})")
        box = mouth_box(server, stats["width"], stats["height"])

        idle: list[np.ndarray] = []
        for _ in range(40):
            meta, pixels = await sample_mouth(b, box)
            assert meta is not None and not meta["speech"]
            idle.append(pixels)
            await asyncio.sleep(0.04)

        await b.page.set_input_files("#wav-input", str(wav))
        speech: list[np.ndarray] = []
        shot = artifact_dir / f"browser-{codec}-speech.png"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout(15)
        while not any(d["turn"] == "wav-1" for d in (await b.stats())["turnsDone"]):
            assert loop.time() < deadline, "no turn.done for wav-1"
            meta, pixels = await sample_mouth(b, box)
            if meta is not None and meta["speech"]:
                speech.append(pixels)
                if len(speech) == 10:
                    await b.page.screenshot(path=str(shot))
            await asyncio.sleep(0.03)
        done_at = (await b.stats())["framesDrawn"]
        # Idle follows: a second more of pictures, none of them speech.
        await b.wait(f"window.avatarStats.framesDrawn >= {done_at + FPS}"
                     " && !window.avatarStats.lastDrawn.speech", 5)
        stats = await b.stats()

    (done,) = [d for d in stats["turnsDone"] if d["turn"] == "wav-1"]
    assert not done["interrupted"] and done["frames"] >= 2.0 * FPS
    assert stats["ttffMs"] is not None and stats["ttffMs"] > 0
    # Every speech frame of a 2 s turn should be drawn; the page draws on
    # animation frames, so a busy machine may supersede a few before drawing.
    assert stats["speechFramesDrawn"] >= 0.8 * 2.0 * FPS
    # Pixels: the idle head sways, so each picture is compared with the most
    # similar idle one. Idle pictures are all close to another idle picture;
    # speech pictures are far from every one, and show the dark inside of an
    # open mouth that the closed, smiling idle mouth never has.
    idle_nearest = max(nearest(p, idle[:i] + idle[i + 1:]) for i, p in enumerate(idle))
    speech_nearest = max(nearest(p, idle) for p in speech)
    idle_dark = max(dark_pixels(p) for p in idle)
    speech_dark = max(dark_pixels(p) for p in speech)
    print(f"mouth box {box}: nearest idle distance, idle {idle_nearest:.1f}, speech "
          f"{speech_nearest:.1f}; dark pixels idle {idle_dark}, speech {speech_dark} "
          f"({len(speech)} speech samples)")
    assert speech_nearest > 4 * idle_nearest + 5
    assert idle_dark == 0 and speech_dark >= 5
    assert stats["errors"] == [] and b.problems == []
    assert shot.is_file()


async def test_voice_barges_in_and_becomes_a_turn(playwright_api: Any, avatar_dir: Path,
                                                  tmp_path: Path, artifact_dir: Path) -> None:
    # Chromium's fake microphone plays this once: silence (the noise floor),
    # 1.6 s of speech, then silence long enough to end the utterance.
    voice = np.concatenate([np.zeros(RATE, np.float32), speech_like(1.6, RATE, seed=5),
                            np.zeros(2 * RATE, np.float32)])
    mic_wav = write_wav(tmp_path / "mic.wav", voice)
    long_wav = write_wav(tmp_path / "long.wav", speech_like(6.0, RATE, seed=4))
    fake_mic = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic_wav}%noloop"]
    async with running_server(small_config(avatar_dir)) as server, \
            open_page(playwright_api, server, "", fake_mic) as b:
        await b.wait("window.avatarStats.framesDrawn >= 5", 15)
        await b.page.set_input_files("#wav-input", str(long_wav))
        await b.wait("window.avatarStats.turnsStarted.some(t => t.turn === 'wav-1')", 10)
        await b.page.click("#mic")
        await b.wait("window.avatarStats.turnsDone.some(t => t.turn === 'wav-1')", 10)
        speech_before = (await b.stats())["speechFramesDrawn"]
        await b.wait("window.avatarStats.turnsDone.some(t => t.turn === 'mic-2')", 15)
        await b.wait("window.avatarStats.lastDrawn && !window.avatarStats.lastDrawn.speech", 5)
        await b.page.screenshot(path=str(artifact_dir / "browser-barge-in.png"))
        stats = await b.stats()
        mic_on = await b.page.get_attribute("#mic", "aria-pressed")

    done = {d["turn"]: d for d in stats["turnsDone"]}
    # The voice interrupted the file well before its 6 s were played ...
    assert done["wav-1"]["interrupted"] and done["wav-1"]["frames"] < 5.0 * FPS
    # ... and became a turn of its own: at least the 1.6 s of voice.
    assert not done["mic-2"]["interrupted"] and done["mic-2"]["frames"] >= 1.6 * FPS
    assert stats["speechFramesDrawn"] - speech_before >= 0.8 * 1.6 * FPS
    assert mic_on == "true"
    assert stats["errors"] == [] and b.problems == []


async def test_page_resumes_after_a_lost_connection(playwright_api: Any, avatar_dir: Path
                                                    ) -> None:
    async with running_server(small_config(avatar_dir)) as server, \
            open_page(playwright_api, server, "codec=jpeg") as b:
        await b.wait("window.avatarStats.framesDrawn >= 5", 15)
        before = await b.stats()
        (conn,) = server.sessions.values()
        # What a client sees when an instance restarts: close 1012, then resume.
        await conn.close(CloseCode.SERVICE_RESTART, "restart")
        await b.wait("window.avatarStats.resumes === 1", 10)
        drawn = (await b.stats())["framesDrawn"]
        await b.wait(f"window.avatarStats.framesDrawn >= {drawn + 10}", 5)
        after = await b.stats()

    assert after["session"] == before["session"] and after["state"] == "connected"
    assert after["errors"] == [] and b.problems == []


# Samples travel as base64 float32: playwright serialises arrays element by element.
VAD_EVENTS_JS = """async ([b64, strict]) => {
  const { Vad } = await import('/web/vad.js');
  const samples = new Float32Array(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer);
  const vad = new Vad();
  const out = [];
  for (let i = 0; i * 320 < samples.length; i++) {
    const frame = samples.slice(i * 320, (i + 1) * 320);
    for (const ev of vad.push(frame, strict)) {
      if (ev.type !== 'audio') out.push([ev.type, i, ev.frames ? ev.frames.length : 0]);
    }
  }
  return out;
}"""


def b64(samples: np.ndarray) -> str:
    return base64.b64encode(samples.astype("<f4").tobytes()).decode()


async def test_page_modules_speak_the_wire_format_and_detect_voice(
        playwright_api: Any, avatar_dir: Path) -> None:
    rng = np.random.default_rng(9)
    frame = speech_like(0.02, RATE, seed=1)  # (320,) one 20 ms frame
    video = MediaHeader(MediaKind.VIDEO, FrameFlags.KEYFRAME | FrameFlags.SPEECH
                        | FrameFlags.LAST_OF_TURN, 2, 2**32 - 1, 2**40 + 5)
    second = RATE // 320 * 320  # 1 s in whole frames

    def quiet(n: int) -> np.ndarray:
        return rng.normal(0, 1e-3, n).astype(np.float32)  # about -60 dBFS

    talk = np.concatenate([quiet(second), speech_like(1.0, RATE, seed=2), quiet(second)])
    click = np.concatenate([quiet(second), speech_like(0.1, RATE, seed=2), quiet(second)])
    async with running_server(small_config(avatar_dir)) as server, \
            open_page(playwright_api, server, "autoconnect=0") as b:
        packed = await b.page.evaluate(
            """async (samples) => {
                 const p = await import('/web/protocol.js');
                 return Array.from(new Uint8Array(p.packAudio(7, Float32Array.from(samples))));
               }""", frame.tolist())
        header = await b.page.evaluate(
            """async (bytes) => {
                 const p = await import('/web/protocol.js');
                 const f = p.unpackMedia(new Uint8Array(bytes).buffer);
                 return [f.kind, f.keyframe, f.speech, f.lastOfTurn, f.configOnly, f.tier, f.seq,
                         f.ptsUs, f.payload.length];
               }""", list(pack_media(video, b"\x01\x02\x03")))
        talk_events = await b.page.evaluate(VAD_EVENTS_JS, [b64(talk), False])
        click_events = await b.page.evaluate(VAD_EVENTS_JS, [b64(click), False])
        strict_click = await b.page.evaluate(VAD_EVENTS_JS, [b64(click), True])
        strict_talk = await b.page.evaluate(VAD_EVENTS_JS, [b64(talk), True])

    expected = pack_media(MediaHeader(MediaKind.AUDIO, FrameFlags.NONE, 0, 7, 0),
                          float_to_pcm16(frame))
    assert bytes(packed[:16]) == expected[:16]
    # Python rounds halves to even, JavaScript up: at most one step apart.
    ours = np.frombuffer(bytes(packed[16:]), "<i2").astype(int)
    theirs = np.frombuffer(expected[16:], "<i2").astype(int)
    assert np.abs(ours - theirs).max() <= 1 and np.abs(theirs).max() > 1000
    assert header == [1, True, True, True, False, 2, 2**32 - 1, 2**40 + 5, 3]

    # Speech from frame 50 to 100 (its last syllable ends at frame 94): one
    # utterance, found within 60 ms with 400 ms of pre-roll, ended 600 ms
    # after the last syllable.
    (start, end) = talk_events
    assert start[0] == "start" and 50 <= start[1] <= 53 and start[2] == 20
    assert end[0] == "end" and 94 + 30 - 2 <= end[1] <= 94 + 30 + 2
    # A 100 ms sound starts speech normally, but not while the avatar speaks.
    assert [e[0] for e in click_events] == ["start", "end"]
    assert strict_click == []
    assert [e[0] for e in strict_talk] == ["start", "end"] and strict_talk[0][1] <= 50 + 20
