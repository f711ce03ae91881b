"""Encoder speed: ms per frame for h264 and jpeg at 512 and 256, and GIL scaling.

Run: .venv/bin/python bench/encode.py [--frames 200] [--repeats 5]

Columns:
- `1 thread ms`: one encoder, frames encoded back to back (the baseline).
- `2 threads x`: two encoders (two sessions) in two threads; throughput
  relative to the baseline. 2.0 means encoding holds the GIL for none of its
  time (needs two free cores); 1.0 means it is serialised.
- `2 procs x`: the same work in two processes (no shared GIL): the control.
  `2 threads x` near `2 procs x` means the GIL costs nothing; both well
  under 2.0 means the machine had no second free core.
- `busy-py ms`: one encoder while another thread spins pure Python (an event
  loop under load): ms per frame. Higher than the baseline means encode
  waits to get the GIL back after each C call (CPython's 5 ms switch interval).
- `@0.5ms sw`: the same with sys.setswitchinterval(0.0005).
- `rgb->yuv ms`: the RGB->I420 conversion alone (part of the h264 row).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media.encode import H264Encoder, JpegEncoder, VideoEncoder  # noqa: E402


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {cores} cores usable, load avg {load:.2f} at start"


def scene(size: int, n: int = 50, seed: int = 0) -> list[np.ndarray]:
    """A moving, textured, smooth scene: roughly talking-head statistics."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([xx / size * 180 + 40, yy / size * 160 + 50, (xx + yy) / size * 70 + 60], -1)
    texture = cv2.GaussianBlur(rng.normal(0, 14, (size, size, 3)).astype(np.float32), (0, 0), 1.5)
    frames = []
    for i in range(n):
        cx = size * (0.5 + 0.05 * np.sin(i / 7))
        cy = size * (0.5 + 0.03 * np.cos(i / 5))
        face = ((xx - cx) / 0.3) ** 2 + ((yy - cy) / 0.4) ** 2 < size**2 * 0.5
        mouth_open = 0.02 + 0.02 * abs(np.sin(i / 2))
        mouth = (np.abs(xx - cx) < size * 0.08) & (
            np.abs(yy - cy - size * 0.15) < size * mouth_open
        )
        img = base + texture
        img[face] = img[face] * 0.3 + np.array([210, 160, 130], np.float32) * 0.7
        img[mouth] = np.array([90, 30, 40], np.float32)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def make(codec: str, size: int, threads: int = 1) -> VideoEncoder:
    if codec == "h264":
        return H264Encoder(size, size, 25, keyframe_interval=50, threads=threads)
    return JpegEncoder(size, size, 85)


def run_encoder(enc: VideoEncoder, frames: list[np.ndarray], n: int) -> float:
    """Seconds to encode n frames (cycling the scene)."""
    t0 = time.perf_counter()
    for i in range(n):
        enc.encode(frames[i % len(frames)])
    return time.perf_counter() - t0


def one(codec: str, size: int, frames: list[np.ndarray], n: int, threads: int = 1) -> float:
    enc = make(codec, size, threads)
    run_encoder(enc, frames, 10)  # warm up
    return run_encoder(enc, frames, n) / n * 1e3


def two_threads(codec: str, size: int, frames: list[np.ndarray], n: int) -> float:
    """Frames per second of two encoders in two threads."""
    encs = [make(codec, size) for _ in range(2)]
    for e in encs:
        run_encoder(e, frames, 10)
    workers = [threading.Thread(target=run_encoder, args=(e, frames, n)) for e in encs]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return 2 * n / (time.perf_counter() - t0)


def _encode_in_process(codec: str, size: int, n: int, start: object, done: object) -> None:
    enc = make(codec, size)
    frames = scene(size)
    run_encoder(enc, frames, 10)
    start.wait()  # type: ignore[attr-defined]
    run_encoder(enc, frames, n)
    done.put(time.perf_counter())  # type: ignore[attr-defined]


def two_processes(codec: str, size: int, n: int) -> float:
    """Frames per second of two encoders in two processes: no shared GIL (the control)."""
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_encode_in_process, args=(codec, size, n, start, done)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # both warmed up and waiting
    t0 = time.perf_counter()
    start.set()
    end = max(done.get(), done.get())
    for p in procs:
        p.join()
    return 2 * n / (end - t0)


def with_busy_python(codec: str, size: int, frames: list[np.ndarray], n: int) -> float:
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    enc = make(codec, size)
    run_encoder(enc, frames, 10)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        return run_encoder(enc, frames, n) / n * 1e3
    finally:
        stop.set()
        spinner.join()


def convert_ms(frames: list[np.ndarray], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        cv2.cvtColor(frames[i % len(frames)], cv2.COLOR_RGB2YUV_I420)
    return (time.perf_counter() - t0) / n * 1e3


def row(codec: str, size: int, n512: int, reps: int) -> str:
    """One table row; the measurements are interleaved across repeats and the best
    of each kept, so that bursts of load from other users of a shared machine hit
    the compared columns alike."""
    n = n512 * (512 // size) ** 2  # about the same seconds per measurement at every size
    frames = scene(size)
    default_switch = sys.getswitchinterval()
    ms, threads_fps, procs_fps, busy, busy_fast = [], [], [], [], []
    for _ in range(reps):
        ms.append(one(codec, size, frames, n))
        threads_fps.append(two_threads(codec, size, frames, n))
        procs_fps.append(two_processes(codec, size, n))
        busy.append(with_busy_python(codec, size, frames, n // 2))
        sys.setswitchinterval(0.0005)
        try:
            busy_fast.append(with_busy_python(codec, size, frames, n // 2))
        finally:
            sys.setswitchinterval(default_switch)
    base = min(ms)
    enc = make(codec, size)
    nbytes = int(np.mean([len(enc.encode(f).data) for f in frames]))
    conv = f"{convert_ms(frames, n):12.2f}" if codec == "h264" else f"{'-':>12}"
    return (
        f"{codec:<6} {size:>5} {base:12.2f} {max(threads_fps) * base / 1e3:12.2f} "
        f"{max(procs_fps) * base / 1e3:10.2f} {min(busy):11.2f} {min(busy_fast):10.2f} "
        f"{conv} {nbytes:12d}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per measurement at 512")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    parser.add_argument(
        "--cv2-threads", type=int, default=1, help="cv2.setNumThreads (server: 1 per encode)"
    )
    args = parser.parse_args()
    n, reps = args.frames, args.repeats
    cv2.setNumThreads(args.cv2_threads)
    print(f"machine: {machine()}")
    print(f"python {platform.python_version()}, PyAV {av.__version__}, OpenCV {cv2.__version__}")
    print(
        f"cv2 threads {cv2.getNumThreads()}; h264: ultrafast, zerolatency, crf 23, "
        f"1 x264 thread; {n} frames at 512 (4x at 256), best of {reps}"
    )
    print()
    header = (
        f"{'codec':<6} {'size':>5} {'1 thread ms':>12} {'2 threads x':>12} {'2 procs x':>10} "
        f"{'busy-py ms':>11} {'@0.5ms sw':>10} {'rgb->yuv ms':>12} {'bytes/frame':>12}"
    )
    print(header)
    print("-" * len(header))
    for size in (512, 256):
        for codec in ("h264", "jpeg"):
            print(row(codec, size, n, reps), flush=True)
    print()
    frames = scene(512)
    for threads in (1, 2):
        ms = min(one("h264", 512, frames, n, threads) for _ in range(reps))
        print(f"h264 512 with x264 threads={threads} (sliced): {ms:.2f} ms/frame")


if __name__ == "__main__":
    main()
