"""The timeline's view of an avatar's material: runs, cursors and how recently frames were shown.

Each clip is cut into *runs*: stretches without bad frames, where gaps of up to
MAX_STEP - 1 bad frames are stepped over (never shown). A cursor is (run, index,
direction). Natural ends are gesture ends and clip ends; *entries* are run starts,
rest-segment starts and the frames after gesture ends. Clips tagged IDLE_TAG (the
idle loop's own material, shown between turns anyway) are not speech material
unless every clip is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from media.avatar import ClipInfo
from media.types import SourceRef

MAX_STEP = 3  # largest source-frame step inside a run (steps over 1-2 bad frames)
LENGTH_TOLERANCE = 2  # frames: an exit this close to a natural end counts as natural
REPEAT_FLOOR = 0.3  # least penalty of a frame shown within the horizon: it is a repeat
IDLE_TAG = "idle"

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


def ease(t: float) -> float:
    """Smoothstep: 0 at 0, 1 at 1, flat at both ends; over n frames no step exceeds 1.5 / n."""
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True, slots=True)
class Cur:
    """A stream: the next frame it shows. dir +1/-1 plays on (holding at the run's end), 0 holds."""

    run: int
    idx: int
    dir: int


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    clip: int
    frames: Ints  # (N,) source frames, increasing, steps <= MAX_STEP
    ends: tuple[int, ...]  # indices of natural ends
    ends_array: Ints  # the same, as an array
    entries: tuple[int, ...]  # indices of entries
    calm_start: Bools  # (N,) an entry or inside a rest segment: a good place to start
    calm_exit: Bools  # (N,) inside a rest segment or near a natural end: a good place to leave
    speech: bool  # usable for speech (not idle material)


class Material:
    """Runs of an avatar's clips and the lookups planning needs."""

    def __init__(self, clips: Sequence[ClipInfo]) -> None:
        if not clips:
            raise ValueError("the timeline needs at least one clip")
        only_idle = all(IDLE_TAG in c.tags for c in clips)
        self.runs: list[Run] = []
        self.where: list[dict[int, tuple[int, int]]] = []  # per clip: frame -> (run, index)
        self.sizes = [c.num_frames for c in clips]
        for c, clip in enumerate(clips):
            _check_clip(c, clip)
            groups: list[list[int]] = []
            for f in range(clip.num_frames):
                if f in clip.bad_frames:
                    continue
                if groups and f - groups[-1][-1] <= MAX_STEP:
                    groups[-1].append(f)
                else:
                    groups.append([f])
            where: dict[int, tuple[int, int]] = {}
            for g in groups:
                r = len(self.runs)
                where.update((f, (r, i)) for i, f in enumerate(g))
                self.runs.append(_make_run(c, clip, g, only_idle or IDLE_TAG not in clip.tags))
            self.where.append(where)
        self.speech_runs = [r for r, run in enumerate(self.runs) if run.speech]
        if not self.speech_runs:
            raise ValueError("no clip has a usable frame")
        self.total = sum(len(self.runs[r].frames) for r in self.speech_runs)

    def ref(self, cur: Cur) -> SourceRef:
        run = self.runs[cur.run]
        return SourceRef(run.clip, int(run.frames[cur.idx]))

    def step(self, cur: Cur) -> Cur:
        j = cur.idx + cur.dir
        if cur.dir == 0 or not 0 <= j < len(self.runs[cur.run].frames):
            return cur
        return Cur(cur.run, j, cur.dir)

    def left(self, cur: Cur) -> int:
        """Frames from cur (included) to the end of its run in its direction."""
        if cur.dir < 0:
            return cur.idx + 1
        return len(self.runs[cur.run].frames) - cur.idx

    def cursor(self, ref: SourceRef, direction: int) -> Cur:
        if not 0 <= ref.clip < len(self.where):
            raise ValueError(f"clip {ref.clip} out of range")
        hit = self.where[ref.clip].get(ref.frame)
        if hit is None:
            raise ValueError(f"{ref} is out of range or a bad frame")
        return Cur(hit[0], hit[1], direction)

    def end_distance(self, ref: SourceRef) -> int:
        """Source frames from ref to the nearest natural end of its run (run length if none)."""
        r, _ = self.where[ref.clip][ref.frame]
        run = self.runs[r]
        return min((abs(int(run.frames[e]) - ref.frame) for e in run.ends), default=len(run.frames))


def _check_clip(c: int, clip: ClipInfo) -> None:
    n = clip.num_frames
    if n < 1:
        raise ValueError(f"clip {c} ({clip.name!r}) has no frames")
    for lo, hi in clip.rest_segments:
        if not 0 <= lo < hi <= n:
            raise ValueError(f"clip {c} rest segment {(lo, hi)} is not inside [0, {n})")
    for g in clip.gesture_ends:
        if not 0 <= g < n:
            raise ValueError(f"clip {c} gesture end {g} is not inside [0, {n})")


def _make_run(c: int, clip: ClipInfo, frames: list[int], speech: bool) -> Run:
    n = len(frames)
    index = {f: i for i, f in enumerate(frames)}
    ends = sorted(index[f] for f in {*clip.gesture_ends, clip.num_frames - 1} if f in index)
    rest = np.zeros(n, dtype=np.bool_)
    entries = {0}
    for lo, hi in clip.rest_segments:
        inside = [index[f] for f in range(lo, hi) if f in index]
        rest[inside] = True
        if inside:
            entries.add(inside[0])
    entries.update(index[g] + 1 for g in clip.gesture_ends if g in index and index[g] + 1 < n)
    calm_start = rest.copy()
    calm_start[sorted(entries)] = True
    calm_exit = rest.copy()
    for e in ends:
        calm_exit[max(e - LENGTH_TOLERANCE, 0) : e + LENGTH_TOLERANCE + 1] = True
    return Run(
        c,
        np.asarray(frames, dtype=np.int64),
        tuple(ends),
        np.asarray(ends, dtype=np.int64),
        tuple(sorted(entries)),
        calm_start,
        calm_exit,
        speech,
    )


class Recency:
    """How recently each frame was shown, as a penalty: 1 just now, falling linearly but
    not below REPEAT_FLOOR while within the horizon, 0 a horizon or more ago. A frame
    shown within the horizon is a repeat however long ago (the timeline's stats and its
    tests count it so): with a penalty falling to 0 at the horizon, material shown just
    inside it looked as good as fresh and lost to any crossfade or gesture cost.

    A visit [clip, first, last, t_end] played first..last and showed `last` at t_end,
    so frame f of it was shown at about t_end - |last - f|. Prefix sums per run
    (`prefix[run][i]` = penalty of indices < i) make any stretch an O(1) query.
    """

    def __init__(self, m: Material, visits: list[list[int]], now: int, horizon: int) -> None:
        stamps = [np.full(n, -1, dtype=np.int64) for n in m.sizes]
        for clip, first, last, t_end in visits:
            lo, hi = min(first, last), max(first, last)
            f = np.arange(lo, hi + 1)
            st = stamps[clip]
            st[lo : hi + 1] = np.maximum(st[lo : hi + 1], t_end - np.abs(last - f))
        self.prefix: list[Floats] = []
        for run in m.runs:
            st = stamps[run.clip][run.frames]
            age = now - st
            pen = np.where(
                (st >= 0) & (age < horizon),
                np.maximum(1.0 - age / max(horizon, 1), REPEAT_FLOOR),
                0.0,
            )
            self.prefix.append(np.concatenate(([0.0], np.cumsum(pen))))

    def cost(self, run: int, i0: int, i1: int) -> float:
        """Penalty of indices i0..i1 (either order, inclusive)."""
        lo, hi = min(i0, i1), max(i0, i1)
        return float(self.prefix[run][hi + 1] - self.prefix[run][lo])
