"""Simulated conversations through the session timeline, against two baselines.

    .venv/bin/python -m bench.timeline_sim [--conversations 1000] [--workers 2]

Each conversation (1 to 60 turns) runs on one of six avatars: the default
avatar's clip metadata and five synthetic prepared avatars (clips of 4, 8, 16 and
32 s with gestures every 0.8-3 s, rest segments, runs of bad frames, style tags;
idle loop from `build_idle_loop`). Turn lengths are log-normal (median 3.5 s, 0.3
to 30 s). The length is known at the start (40 % of turns), estimated at the start
within 15 % and known at the end (20 %), or known 0.2-3 s before the end, as with
streamed TTS (40 %). 10 % of turns are interrupted (the client saw all but up to
16 of the planned frames), 30 % carry a style, 30 % follow a listening hint.

Systems, all driven through the same calls:
- timeline: `sessions.timeline.Timeline`;
- modulo loop: the longest clip from frame 0 each turn, index modulo its length,
  hard cut to idle (what we replace);
- length-matched restart: per turn the clip whose length is nearest the turn's
  (when known; else the longest), from frame 0, hard cut to idle.

Metrics, measured on what the viewer sees from the idle frame before a turn to
idle_loop[0] after it (the idle loop itself is not measured):
- repeats: speech frames whose source frame was shown within the last H shown
  frames, H = half the avatar's usable frames;
- neutral end: turns whose last frame is the neutral pose;
- err known / err late: for turns run to a length known at the start / 0.2-3 s
  before the end, source frames from the last speech frame to the nearest natural
  end of its clip (gesture end or clip end): mean, p95, share within 2 frames;
- cuts: consecutive pictures where more than 0.35 of the picture changes to
  unrelated material (another clip, or > 3 source frames away), per 1000 frames;
- bad fr: bad frames shown; us/fr: time in the system's calls per frame.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from agent.config import DefaultAvatarConfig, TimelineConfig
from bench.machine import describe
from media.avatar import ClipInfo
from media.types import FrameSpec, SourceRef
from sessions.idle_loop import build_idle_loop
from sessions.timeline import Timeline

FPS = 25
NEAR = 3
CUT = 0.35
STYLES = ("calm", "emphatic", "listening")

Avatar = tuple[str, tuple[ClipInfo, ...], SourceRef, tuple[FrameSpec, ...]]


# --- avatars -------------------------------------------------------------------


def synthetic_avatar(seed: int) -> Avatar:
    rng = random.Random(seed)
    clips = []
    for i, seconds in enumerate((4, 8, 16, 32)):
        n = seconds * FPS
        ends: list[int] = []
        f = rng.randint(20, 75)
        while f < n - 1:
            ends.append(f)
            f += rng.randint(20, 75)
        rest = [(0, rng.randint(25, 40))]
        for e in ends:
            lo, hi = e + 1, min(n, e + 1 + rng.randint(4, 30))
            if rng.random() < 0.5 and lo > rest[-1][1] and hi - lo >= 3:
                rest.append((lo, hi))
        bad: set[int] = set()
        for _ in range(rng.randint(0, n // 80)):
            start = rng.randint(rest[0][1] if i == 0 else 0, n - 1)
            bad.update(range(start, min(n, start + rng.choice((1, 1, 2, 3, 6, 12)))))
        tags = (STYLES[(i + seed) % 3],)
        clips.append(ClipInfo(f"c{i}", n, tags, tuple(rest), tuple(ends), frozenset(bad)))
    neutral = SourceRef(0, clips[0].rest_segments[0][1] // 2)
    idle = build_idle_loop(clips, neutral, FPS, 8.0)
    return f"synthetic-{seed}", tuple(clips), neutral, idle


def default_avatar() -> Avatar:
    from media.default_avatar import build_default_avatar

    data = build_default_avatar(DefaultAvatarConfig(), FPS)
    clips = tuple(c.info for c in data.clips)
    return "default", clips, data.neutral, data.idle_loop


def avatars() -> list[Avatar]:
    return [default_avatar(), *(synthetic_avatar(s) for s in range(5))]


# --- baselines -------------------------------------------------------------------


class ModuloLoop:
    """One clip looped with a modulo index, restarted every turn, cut hard to idle."""

    def __init__(
        self,
        clips: Sequence[ClipInfo],
        neutral: SourceRef,
        idle_loop: Sequence[FrameSpec],
        config: TimelineConfig,
        fps: int,
        seed: int = 0,
    ) -> None:
        self.clips = clips
        self.clip = 0
        self.k = 0

    def pick(self, duration: int | None) -> int:
        return max(range(len(self.clips)), key=lambda c: self.clips[c].num_frames)

    def start_turn(
        self, *, duration_frames: int | None = None, style: str | None = None, from_idle: int = 0
    ) -> None:
        self.clip, self.k = self.pick(duration_frames), 0

    def set_turn_length(self, speech_frames: int) -> None:
        pass

    def next_frames(self, count: int) -> list[FrameSpec]:
        n = self.clips[self.clip].num_frames
        out = [FrameSpec(SourceRef(self.clip, (self.k + i) % n), speech=True) for i in range(count)]
        self.k += count
        return out

    def end_turn(self) -> list[FrameSpec]:
        return []

    def interrupt(self, last_shown: FrameSpec | None) -> list[FrameSpec]:
        return []

    def listen(self, active: bool) -> None:
        pass


class LengthMatchedRestart(ModuloLoop):
    """The clip whose length is nearest the turn's, from its start, cut hard to idle."""

    def pick(self, duration: int | None) -> int:
        if duration is None:
            return super().pick(duration)
        return min(range(len(self.clips)), key=lambda c: abs(self.clips[c].num_frames - duration))


SYSTEMS: dict[str, type[Timeline] | type[ModuloLoop]] = {
    "timeline": Timeline,
    "modulo loop": ModuloLoop,
    "length-matched restart": LengthMatchedRestart,
}


# --- measuring -------------------------------------------------------------------


def picture(spec: FrameSpec) -> dict[SourceRef, float]:
    if spec.blend_to is None or spec.blend_weight == 0.0:
        return {spec.source: 1.0}
    if spec.blend_weight == 1.0:
        return {spec.blend_to: 1.0}
    out = {spec.source: 1.0 - spec.blend_weight}
    out[spec.blend_to] = out.get(spec.blend_to, 0.0) + spec.blend_weight
    return out


def jump(p: dict[SourceRef, float], q: dict[SourceRef, float]) -> float:
    """Share of the picture that changes to unrelated material (1 - max flow over near pairs)."""
    a = list(p.items())
    cut = 1.0
    for mask in range(1 << len(a)):
        inside = [r for i, (r, _) in enumerate(a) if mask >> i & 1]
        outside = sum(w for i, (_, w) in enumerate(a) if not mask >> i & 1)
        reached = sum(
            w
            for r, w in q.items()
            if any(s.clip == r.clip and abs(s.frame - r.frame) <= NEAR for s in inside)
        )
        cut = min(cut, outside + reached)
    return 1.0 - cut


@dataclass
class Tally:
    speech: int = 0
    repeats_half: int = 0
    frames: int = 0
    cuts: int = 0
    bad: int = 0
    turns: int = 0
    neutral_endings: int = 0
    end_errors: list[int] = field(default_factory=list)  # length known at the start
    late_errors: list[int] = field(default_factory=list)  # known 0.2-3 s before the end
    plan_s: float = 0.0
    planned: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)


class Viewer:
    def __init__(self, clips: Sequence[ClipInfo], tally: Tally) -> None:
        self.clips, self.tally = clips, tally
        usable = sum(c.num_frames - len(c.bad_frames) for c in clips)
        self.half = usable // 2
        self.prev: FrameSpec | None = None
        self.shown = 0
        self.last_seen: dict[SourceRef, int] = {}

    def show(self, spec: FrameSpec, *, material: bool = True) -> None:
        t = self.tally
        t.frames += material
        if self.prev is not None and jump(picture(self.prev), picture(spec)) > CUT:
            t.cuts += 1
        self.prev = spec
        for ref in (spec.source, spec.blend_to):
            if ref is not None and ref.frame in self.clips[ref.clip].bad_frames:
                t.bad += 1
        if not material:
            return
        self.shown += 1
        if spec.speech:
            t.speech += 1
            seen = self.last_seen.get(spec.source)
            t.repeats_half += seen is not None and self.shown - seen <= self.half
        self.last_seen[spec.source] = self.shown


def natural_distance(clip: ClipInfo, frame: int) -> int:
    return min(abs(frame - e) for e in {*clip.gesture_ends, clip.num_frames - 1})


def conversation(system: str, avatar: Avatar, seed: int) -> Tally:
    _, clips, neutral, idle = avatar
    rng = random.Random(seed)
    tally = Tally()
    tl = SYSTEMS[system](clips, neutral, idle, TimelineConfig(), FPS, seed=seed)
    viewer = Viewer(clips, tally)
    idle_at = rng.randrange(len(idle))  # the idle frame on screen
    for _ in range(rng.randint(1, 60)):
        n = min(max(round(rng.lognormvariate(0.0, 0.7) * 3.5 * FPS), 8), 30 * FPS)
        mode = rng.choices(("known", "estimate", "late"), (0.4, 0.2, 0.4))[0]
        duration = {"known": n, "estimate": round(n * rng.uniform(0.85, 1.15))}.get(mode)
        # Streamed TTS: speak.end comes 0.2-3 s of speech before the end of the turn.
        known_at = max(n - rng.randint(5, 3 * FPS), 0) if mode == "late" else n
        style = rng.choice(STYLES) if rng.random() < 0.3 else None
        if rng.random() < 0.3:
            tl.listen(True)
            tl.listen(False)
        interrupt_at = rng.randint(1, n) if rng.random() < 0.1 else None
        for _ in range(rng.randint(0, 3 * FPS)):  # idle between turns
            idle_at = (idle_at + 1) % len(idle)
        viewer.prev = idle[idle_at]  # the idle loop itself is not measured
        t0 = time.perf_counter()
        tl.start_turn(duration_frames=duration, style=style, from_idle=idle_at)
        frames: list[FrameSpec] = []
        stop = n if interrupt_at is None else interrupt_at
        length_set = False
        while len(frames) < stop:
            if not length_set and len(frames) >= known_at:
                tl.set_turn_length(n)
                length_set = True
            frames += tl.next_frames(min(8, stop - len(frames)))
        if interrupt_at is None:
            if not length_set:
                tl.set_turn_length(n)
            tail = tl.end_turn()
            shown = frames
        else:
            shown = frames[: max(len(frames) - rng.randint(0, 16), 0)]
            tail = tl.interrupt(shown[-1] if shown else None)
        tally.plan_s += time.perf_counter() - t0
        tally.planned += len(frames) + len(tail)
        for spec in shown + tail:
            viewer.show(spec)
        viewer.show(idle[0], material=False)  # after a turn the session shows idle_loop[0]
        idle_at = 0
        tally.turns += 1
        last = (shown + tail)[-1] if shown + tail else None
        tally.neutral_endings += last is not None and picture(last) == {neutral: 1.0}
        if interrupt_at is None and mode != "estimate" and frames:
            ref = frames[-1].source
            err = natural_distance(clips[ref.clip], ref.frame)
            (tally.end_errors if mode == "known" else tally.late_errors).append(err)
    return tally


def run_chunk(args: tuple[str, list[int]]) -> Tally:
    system, seeds = args
    avs = avatars()
    total = Tally()
    for s in seeds:
        total.add(conversation(system, avs[s % len(avs)], s))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    seeds = list(range(args.conversations))
    chunks = [seeds[i :: args.workers] for i in range(args.workers)]
    print(f"machine: {describe()}")
    print(f"{args.conversations} conversations, avatars: {', '.join(a[0] for a in avatars())}")
    header = (
        f"{'system':<24}{'turns':>7}{'speech fr':>10}{'repeats':>8}{'neutral end':>12}"
        f"{'err known':>10}{'p95':>5}{'<=2':>7}{'err late':>9}{'p95':>5}{'<=2':>7}"
        f"{'cuts/1k':>8}{'bad fr':>7}{'us/fr':>7}"
    )
    print(header)
    print("-" * len(header))
    with ProcessPoolExecutor(args.workers) as pool:
        for system in SYSTEMS:
            t = Tally()
            for part in pool.map(run_chunk, [(system, c) for c in chunks]):
                t.add(part)
            print(
                f"{system:<24}{t.turns:>7}{t.speech:>10}{t.repeats_half / max(t.speech, 1):>8.1%}"
                f"{t.neutral_endings / max(t.turns, 1):>12.1%}"
                f"{errors(t.end_errors)}{errors(t.late_errors)}"
                f"{1000 * t.cuts / max(t.frames, 1):>8.2f}{t.bad:>7}"
                f"{1e6 * t.plan_s / max(t.planned, 1):>7.1f}"
            )


def errors(errs: list[int]) -> str:
    """Mean, p95 and share within 2 frames of the distance to a natural end."""
    if not errs:
        return f"{'-':>10}{'-':>5}{'-':>7}"
    errs = sorted(errs)
    p95 = errs[int(0.95 * (len(errs) - 1))]
    within = sum(e <= 2 for e in errs) / len(errs)
    return f"{statistics.fmean(errs):>10.1f}{p95:>5}{within:>7.1%}"


if __name__ == "__main__":
    main()
