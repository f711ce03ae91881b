"""Avatar preparation throughput, load time and memory of a prepared avatar, paste-back cost.

Run: .venv/bin/python -m bench.prepare [--seconds 6] [--sizes 512,720]

Input: the astronaut photo moving (tests/videoutil.py), 30 fps H.264, at
512 x 512 and on a 1280 x 720 canvas (face about 90 px and 125 px wide).

Rows per input size:
- `decode+resample`: PyAV decode and 30 -> 25 fps resampling alone (the
  baseline every other row includes).
- `track <analyzer>`: decode + face tracking with landmarks, per analyzer.
- `prepare <analyzer>`: the whole `prepare_avatar` (tracking, alignment, 256
  and 512 px crops, paste-back masks, motion analysis, atomic write), run in
  a fresh process whose peak RSS is shown.
Then for the prepared avatar: load time, RSS growth on load and after reading
every frame once (frames are memory-mapped: that growth is page cache that
the kernel may reclaim), size on disk; and the paste-back of one generated
crop into one frame (per output frame at run time).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe, proc_rss_bytes  # noqa: E402
from media.avatar_cache import load_avatar  # noqa: E402
from media.face import FaceModelUnavailable, FaceTracker, make_face_analyzer  # noqa: E402
from media.face_align import paste_back  # noqa: E402
from media.prepare import (  # noqa: E402
    FaceCache,
    PrepareOptions,
    prepare_avatar,
    read_frames,
)
from media.types import SourceRef  # noqa: E402
from tests.videoutil import astronaut, frame_at, write_video  # noqa: E402


def make_video(path: Path, seconds: float, size: int) -> Path:
    """The moving astronaut; size 720 puts the 512 px photo scaled to 720 high on 1280 x 720."""
    photo = astronaut(512)
    frames = []
    for i in range(round(seconds * 30)):
        picture = frame_at(photo, i / 30)
        if size != 512:
            scaled = cv2.resize(picture, (size, size), interpolation=cv2.INTER_CUBIC)
            canvas = np.full((size, size * 16 // 9 // 2 * 2, 3), 120, np.uint8)
            x = (canvas.shape[1] - size) // 2
            canvas[:, x : x + size] = scaled
            picture = canvas
        frames.append(np.ascontiguousarray(picture))
    return write_video(path, frames, 30, "mp4")


def _prepare_child(root: Path, video: Path, analyzer_name: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    analyzer = make_face_analyzer(analyzer_name)
    t0 = time.perf_counter()
    report = prepare_avatar(root, "bench", [video], analyzer, PrepareOptions())
    seconds = time.perf_counter() - t0
    out.put((report.frames, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def prepare_in_child(root: Path, video: Path, analyzer_name: str) -> tuple[int, float, float]:
    """(frames, seconds, peak RSS MB) of one prepare_avatar in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_prepare_child, args=(root, video, analyzer_name, queue))
    proc.start()
    result: tuple[int, float, float] = queue.get()
    proc.join()
    return result


def rate(frames: int, seconds: float) -> str:
    return f"{frames / seconds:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--sizes", default="512,720")
    args = parser.parse_args()
    print(f"machine: {describe()}, load avg {os.getloadavg()[0]:.2f} at start")
    analyzers = []
    for name in ("insightface", "dlib", "haar"):
        try:
            analyzers.append(make_face_analyzer(name))
        except FaceModelUnavailable as exc:
            print(f"({name} not available: {exc})")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        print(f"\n{'input':>10} {'stage':>20} {'frames/s':>9} {'ms/frame':>9}")
        prepared: dict[int, Path] = {}
        for size in (int(s) for s in args.sizes.split(",")):
            video = make_video(work / f"in_{size}.mp4", args.seconds, size)
            label = "512x512" if size == 512 else f"{size * 16 // 9 // 2 * 2}x{size}"
            t0 = time.perf_counter()
            n = sum(1 for _ in read_frames(video, 25))
            base = time.perf_counter() - t0
            print(f"{label:>10} {'decode+resample':>20} {rate(n, base)} {base / n * 1e3:9.2f}")
            for analyzer in analyzers:
                tracker = FaceTracker(analyzer)
                t0 = time.perf_counter()
                found = sum(tracker.update(p) is not None for p, _ in read_frames(video, 25))
                dt = time.perf_counter() - t0
                print(f"{label:>10} {'track ' + analyzer.name:>20} {rate(n, dt)} "
                      f"{dt / n * 1e3:9.2f}  ({found}/{n} with a face)")
            for analyzer in analyzers:
                root = work / f"cache_{size}_{analyzer.name}"
                frames, dt, peak = prepare_in_child(root, video, analyzer.name)
                print(f"{label:>10} {'prepare ' + analyzer.name:>20} {rate(frames, dt)} "
                      f"{dt / frames * 1e3:9.2f}  (peak RSS {peak:.0f} MB)")
                prepared[size] = root
        print(f"\n{'avatar':>10} {'load ms':>8} {'RSS +MB load':>13} {'+MB all frames':>15} "
              f"{'disk MB':>8} {'paste 256 ms':>13} {'paste 512 ms':>13}")
        for root in prepared.values():
            rss0 = proc_rss_bytes(os.getpid())
            t0 = time.perf_counter()
            avatar = load_avatar(root, "bench")
            load_ms = (time.perf_counter() - t0) * 1e3
            rss1 = proc_rss_bytes(os.getpid())
            n = avatar.clips[0].num_frames
            for f in range(n):  # read every frame once
                np.asarray(avatar.source.frame(SourceRef(0, f))).sum()
            rss2 = proc_rss_bytes(os.getpid())
            disk = sum(p.stat().st_size for p in (root / "bench").rglob("*") if p.is_file())
            faces = FaceCache(avatar)
            ref = SourceRef(0, 10)
            frame = avatar.source.frame(ref)
            out = np.empty_like(frame)
            costs = []
            for crop_size in (256, 512):
                face = faces.crop(ref, crop_size).copy()
                geometry = faces.paste(ref)
                t0 = time.perf_counter()
                for _ in range(200):
                    paste_back(frame, face, geometry, out=out)
                costs.append((time.perf_counter() - t0) / 200 * 1e3)
            print(f"{avatar.width}x{avatar.height:<4} {load_ms:8.1f} {(rss1 - rss0) / 1e6:13.1f} "
                  f"{(rss2 - rss0) / 1e6:15.1f} {disk / 1e6:8.1f} {costs[0]:13.2f} "
                  f"{costs[1]:13.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
