"""The session timeline: which source frame each output frame of a conversation shows.

A sans-I/O core: no asyncio, no clock, no torch. The session calls `start_turn`,
`next_frames`, `end_turn` or `interrupt` and plays what comes back; randomness
comes from the seed only, so `state()` / `from_state` reproduce the same future.
The material model (runs, cursors, recency) is in `sessions.timeline_material`.

Position and history. The conversation keeps one cursor across turns: turn k
starts where turn k-1 stopped. Shown frames are recorded as visits; a frame's
penalty falls from 1 (just shown) towards REPEAT_FLOOR and drops to 0 once it was
shown a horizon ago (half as many frames as the avatar has speech material): within
the horizon a frame is a repeat. Planning picks the least penalised material.
Ping-pong (reversing) happens only when no other entry exists.

Length matching. With the turn length R known, the exact plans are: continue here if
a natural end lies within LENGTH_TOLERANCE of R frames ahead; at turn start, start R
frames before a natural end (the blend from idle hides the start); or play k more
frames here and crossfade into a piece whose natural end is R - k frames on. The
cheapest exact plan wins, and continuing is costed by recency like the others: it
gets CONTINUE_BONUS at turn start (and no SWITCH_COST mid-turn), but the position is
kept so that movements don't repeat, so it gives way where the frames ahead were
shown lately (the conversation came back to them from elsewhere). While R is unknown
the timeline streams on, crossfading into fresh material when a run runs out, and
plans the exit once R arrives (an estimate that runs short is dropped until the true
length comes).

Blends. Every change of picture is a blend of two streams: from the idle frame into
the material (blend_in_ms), between pieces (blend_out_ms), into the neutral pose
at the end of speech (blend_out_ms) and on interrupt (interrupt_blend_ms). Where a
third stream would be needed (speech ends inside a crossfade) the weaker stream is
first faded out in steps of at most SETTLE_STEP. `FrameSpec.source` is always the
stream that goes on; `blend_to` the one arriving or leaving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from agent.config import TimelineConfig
from media.avatar import ClipInfo
from media.types import FrameSpec, SourceRef
from sessions.timeline_material import LENGTH_TOLERANCE, MAX_STEP, Cur, Material, Recency, ease

SETTLE_STEP = 0.25  # largest weight step while fading out a third stream
MIN_FADE = 4  # frames: the shortest crossfade (an exit planned late); smoothstep step <= 0.35
LISTENING_TAG = "listening"
STATE_VERSION = 1
MAX_VISITS = 256  # bounds state size; older visits are forgotten first

# Planning costs, in frames. A frame's recency penalty (1 just shown, at least REPEAT_FLOOR
# within the horizon, 0 beyond) counts REPEAT_WEIGHT times: one stale frame outweighs
# several fresh ones.
REPEAT_WEIGHT = 4.0
SWITCH_COST = 25.0  # a crossfade between pieces during speech
MID_GESTURE_COST = 25.0  # ... leaving the old piece outside a rest segment / natural end
MID_START_COST = 5.0  # a piece starting away from an entry or rest segment
STYLE_COST = 100.0  # material without the requested style tag
LISTEN_COST = 30.0  # material without the listening tag after a listening hint
CONTINUE_BONUS = 50.0  # staying where the conversation left off
LENGTH_WEIGHT = 0.2  # per frame of a streamed piece, up to FRESH_CAP_S
START_CANDIDATES = 4  # starts tried with each exit at turn start
STALE_SHARE = 0.15  # exit plans staler than this (mean penalty) wait for a later switch
FRESH_CAP_S = 10.0  # fresh material beyond this much does not score higher
JITTER = 1.0  # random tie-break between equal candidates

_MASK = (1 << 64) - 1


def blend_frames(ms: int, fps: int) -> int:
    return round(ms * fps / 1000)


@dataclass(frozen=True, slots=True)
class TimelineStats:
    turns: int = 0
    interrupts: int = 0
    speech_frames: int = 0
    tail_frames: int = 0  # end_turn and interrupt frames
    repeated_frames: int = 0  # speech frames whose source frame a remembered visit showed
    switches: int = 0  # crossfades between pieces during speech
    reversals: int = 0  # ping-pong turns (last resort)
    timed_turns: int = 0  # turns that ran to a length known before their end
    natural_endings: int = 0  # timed turns ending within LENGTH_TOLERANCE of a natural end
    end_error_frames: int = 0  # sum over timed turns of the distance to the nearest natural end


class _Rng:
    """splitmix64: a one-integer state that round-trips through JSON."""

    def __init__(self, state: int) -> None:
        self.state = state & _MASK

    def random(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


# (a, b, w): a picture (1 - w) * a + w * b, cursors already at each stream's next frame.
_Mix = tuple[Cur, Cur | None, float]
# (src, dst, w): one planned frame; src None is the turn's material cursor.
_Blend = tuple[Cur | None, Cur | None, float]
# (cost, penalty, start, k): an exit plan; k frames here, then the piece from `start`.
_Plan = tuple[float, float, Cur, int]


@dataclass(slots=True)
class _Turn:
    mat: Cur  # the material cursor: next frame of the speech material
    last: _Mix  # the picture of the last frame (or the idle frame before the turn)
    from_idle: int
    tag: str | None
    listening: bool
    queue: list[_Blend] = field(default_factory=list)
    total: int | None = None  # speech frames, when known or expected
    length_set: bool = False  # set_turn_length was called: total is binding
    emitted: int = 0
    switch_left: int | None = None  # material frames before a planned crossfade
    switch_to: Cur | None = None
    final: bool = False  # speech ends in the current piece: no streaming switch
    last_speech: SourceRef | None = None
    t0: int = 0  # conversation time at the turn's start


class Timeline:
    """Where each output frame of a conversation comes from; see the module docstring."""

    def __init__(
        self,
        clips: Sequence[ClipInfo],
        neutral: SourceRef,
        idle_loop: Sequence[FrameSpec],
        config: TimelineConfig,
        fps: int,
        seed: int = 0,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self._clips = tuple(clips)
        self._m = Material(self._clips)
        self._neutral = neutral
        self._ncur = self._m.cursor(neutral, 0)
        if not idle_loop:
            raise ValueError("the idle loop is empty")
        for spec in idle_loop:
            for ref in (spec.source, spec.blend_to):
                if ref is not None:
                    self._m.cursor(ref, 0)  # raises on a bad or unknown frame
        if _picture(idle_loop[0]) != {neutral: 1.0}:
            raise ValueError(f"idle_loop[0] must be the neutral pose {neutral}, got {idle_loop[0]}")
        self._idle = tuple(idle_loop)
        self._n_in = blend_frames(config.blend_in_ms, fps)
        self._n_out = max(blend_frames(config.blend_out_ms, fps), 1)
        self._n_int = max(config.interrupt_blend_ms * fps // 1000, 1)  # within the limit
        self._cap = max(round(FRESH_CAP_S * fps), 1)
        self._horizon = max(self._m.total // 2, 1)
        self._tags = {t for c in self._clips for t in c.tags}
        self._rng = _Rng(seed ^ 0x5DEECE66D)
        self._t = 0  # frames emitted over the conversation
        self._visits: list[list[int]] = []  # [clip, first, last, t_end], see Recency
        self._cover = [[0] * c.num_frames for c in self._clips]  # visits covering each frame
        self._listening = False
        self._listened = False
        self._turn: _Turn | None = None
        self._counts = asdict(TimelineStats())  # field -> count; stats() freezes a copy
        entries = [Cur(r, i, 1) for r in self._m.speech_runs for i in self._m.runs[r].entries]
        self._pos = entries[int(self._rng.random() * len(entries))]

    # --- the session's calls ----------------------------------------------

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    @property
    def position(self) -> SourceRef:
        """The next material frame of the conversation."""
        return self._m.ref(self._turn.mat if self._turn else self._pos)

    def start_turn(
        self, *, duration_frames: int | None = None, style: str | None = None, from_idle: int = 0
    ) -> None:
        if self._turn is not None:
            raise RuntimeError("start_turn while a turn is active: end or interrupt it first")
        if not 0 <= from_idle < len(self._idle):
            raise ValueError(f"from_idle {from_idle} is outside the idle loop of {len(self._idle)}")
        if duration_frames is not None and duration_frames < 0:
            raise ValueError(f"duration_frames must be >= 0, got {duration_frames}")
        idle = self._idle[from_idle]
        prev = self._advance(self._mix_of(idle, 1))
        turn = _Turn(
            mat=self._pos,
            last=prev,
            from_idle=from_idle,
            tag=style,
            listening=self._listening or self._listened,
            total=duration_frames,
            t0=self._t,
        )
        self._listened = False
        turn.queue = self._blend_in(prev)
        self._turn = turn
        self._prune()
        self._bump(turns=1)
        self._plan_start(turn)

    def set_turn_length(self, speech_frames: int) -> None:
        turn = self._need_turn("set_turn_length")
        if turn.length_set:
            raise RuntimeError("set_turn_length was already called for this turn")
        if speech_frames < turn.emitted:
            raise ValueError(f"turn length {speech_frames} < {turn.emitted} frames already planned")
        turn.length_set = True
        if turn.total != speech_frames:
            turn.total = speech_frames
            self._plan_mid(turn)

    def next_frames(self, count: int) -> list[FrameSpec]:
        turn = self._need_turn("next_frames")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if turn.total is not None and turn.emitted + count > turn.total:
            if turn.length_set:
                raise ValueError(
                    f"{count} more frames would pass the turn length {turn.total} "
                    f"({turn.emitted} planned)"
                )
            turn.total = None  # the expected length was short: stream on until it is known
            turn.switch_left = turn.switch_to = None
            turn.final = False
        out: list[FrameSpec] = []
        for _ in range(count):
            self._before_speech_frame(turn)
            blend = turn.queue.pop(0) if turn.queue else None
            out.append(self._emit(turn, blend, speech=True))
            turn.emitted += 1
        return out

    def end_turn(self) -> list[FrameSpec]:
        """Tail frames (at least one) converging to neutral; the last one is the neutral pose."""
        turn = self._need_turn("end_turn")
        plan, rest = self._converge(turn.last, self._n_out, budget=None)
        timed = turn.total is not None and turn.emitted == turn.total and turn.total > 0
        if timed and turn.last_speech is not None:
            d = self._m.end_distance(turn.last_speech)
            self._bump(timed_turns=1, end_error_frames=d, natural_endings=d <= LENGTH_TOLERANCE)
        return self._finish(plan, rest or turn.mat)

    def interrupt(self, last_shown: FrameSpec | None) -> list[FrameSpec]:
        """Frames (at least one, at most interrupt_blend_ms) from last_shown to neutral.

        Ends the turn if one is active. Frames planned after last_shown were never
        shown: they leave the history, and the conversation goes on from the material
        last_shown showed. last_shown None: nothing of the turn was shown; the blend
        starts from the idle frame before it (outside a turn there is nothing to do).
        Outside a turn (its tail is playing) the blend starts from last_shown too.
        """
        turn = self._turn
        if last_shown is None:
            if turn is None:
                return []
            self._rewind(turn.t0)
            prev = self._advance(self._mix_of(self._idle[turn.from_idle], 1))
        else:
            direction = turn.mat.dir if turn is not None else 1
            prev = self._advance(self._mix_of(last_shown, direction or 1))
            shown_at = self._shown_at(last_shown.source)
            if shown_at is not None:
                self._rewind(shown_at)
        plan, rest = self._converge(prev, self._n_int, budget=self._n_int)
        self._bump(interrupts=1)
        # Nothing of the turn shown: the conversation stays where it was.
        return self._finish(plan, rest if last_shown is not None else None)

    def listen(self, active: bool) -> None:
        """The user is speaking: the next turn prefers material tagged 'listening'."""
        self._listening = active
        self._listened = self._listened or active

    def stats(self) -> TimelineStats:
        return TimelineStats(**self._counts)

    # --- state ------------------------------------------------------------

    def state(self, *, include_turn: bool = True) -> dict[str, object]:
        """JSON-serialisable state. include_turn=False drops a turn in progress (its
        frames planned so far count as shown) for a store that does not resume turns."""
        m = self._m

        def cur(c: Cur | None) -> list[int] | None:
            if c is None:
                return None
            ref = m.ref(c)
            return [ref.clip, ref.frame, c.dir]

        out: dict[str, Any] = {
            "v": STATE_VERSION,
            "rng": f"{self._rng.state:x}",
            "t": self._t,
            "pos": cur(self._turn.mat if self._turn and not include_turn else self._pos),
            "visits": [list(v) for v in self._visits],
            "listening": self._listening,
            "listened": self._listened,
            "stats": dict(self._counts),
            "turn": None,
        }
        t = self._turn
        if t is not None and include_turn:
            a, b, w = t.last
            out["turn"] = {
                "mat": cur(t.mat),
                "last": [cur(a), cur(b), w],
                "from_idle": t.from_idle,
                "tag": t.tag,
                "listening": t.listening,
                "queue": [[cur(s), cur(d), w] for s, d, w in t.queue],
                "total": t.total,
                "length_set": t.length_set,
                "emitted": t.emitted,
                "switch_left": t.switch_left,
                "switch_to": cur(t.switch_to),
                "final": t.final,
                "last_speech": None if t.last_speech is None else _pair(t.last_speech),
                "t0": t.t0,
            }
        return out

    @classmethod
    def from_state(
        cls,
        clips: Sequence[ClipInfo],
        neutral: SourceRef,
        idle_loop: Sequence[FrameSpec],
        config: TimelineConfig,
        fps: int,
        state: dict[str, Any],
    ) -> Timeline:
        self = cls(clips, neutral, idle_loop, config, fps)
        try:
            self._load(state)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"invalid timeline state: {exc!r}") from None
        return self

    def _load(self, s: dict[str, Any]) -> None:
        if s.get("v") != STATE_VERSION:
            raise ValueError(f"timeline state version {s.get('v')!r}, expected {STATE_VERSION}")

        def cur(v: list[int] | None) -> Cur | None:
            return None if v is None else self._m.cursor(SourceRef(v[0], v[1]), int(v[2]))

        def need(v: list[int]) -> Cur:
            c = cur(v)
            if c is None:
                raise ValueError("invalid timeline state: a cursor is missing")
            return c

        self._rng = _Rng(int(s["rng"], 16))
        self._t = int(s["t"])
        self._pos = need(s["pos"])
        self._visits = []
        self._cover = [[0] * c.num_frames for c in self._clips]
        for v in s["visits"]:
            clip, first, last, t_end = (int(x) for x in v)
            n = len(self._cover[clip]) if 0 <= clip < len(self._cover) else 0
            if not (0 <= first < n and 0 <= last < n):
                raise ValueError(f"invalid visit {v} in timeline state")
            self._visits.append([clip, first, last, t_end])
            for g in range(min(first, last), max(first, last) + 1):
                self._cover[clip][g] += 1
        self._listening = bool(s["listening"])
        self._listened = bool(s["listened"])
        self._counts = asdict(TimelineStats(**{k: int(v) for k, v in s["stats"].items()}))
        t = s["turn"]
        if t is None:
            self._turn = None
            return
        if not 0 <= int(t["from_idle"]) < len(self._idle):
            raise ValueError(f"invalid timeline state: from_idle {t['from_idle']}")
        a, b, w = t["last"]
        ls = t["last_speech"]
        self._turn = _Turn(
            mat=need(t["mat"]),
            last=(need(a), cur(b), float(w)),
            from_idle=int(t["from_idle"]),
            tag=t["tag"],
            listening=bool(t["listening"]),
            queue=[(cur(q[0]), cur(q[1]), float(q[2])) for q in t["queue"]],
            total=t["total"],
            length_set=bool(t["length_set"]),
            emitted=int(t["emitted"]),
            switch_left=t["switch_left"],
            switch_to=cur(t["switch_to"]),
            final=bool(t["final"]),
            last_speech=None if ls is None else SourceRef(int(ls[0]), int(ls[1])),
            t0=int(t["t0"]),
        )

    # --- emitting frames --------------------------------------------------

    def _need_turn(self, what: str) -> _Turn:
        if self._turn is None:
            raise RuntimeError(f"{what} outside a turn: call start_turn first")
        return self._turn

    def _spec(self, a: Cur, b: Cur | None, w: float, *, speech: bool) -> FrameSpec:
        ra = self._m.ref(a)
        w = round(w, 4)
        if b is None or w <= 0.0:
            return FrameSpec(ra, speech=speech)
        rb = self._m.ref(b)
        if w >= 1.0 or rb == ra:
            return FrameSpec(rb, speech=speech)
        return FrameSpec(ra, rb, w, speech=speech)

    def _emit(self, turn: _Turn, blend: _Blend | None, *, speech: bool) -> FrameSpec:
        src, dst, w = blend if blend is not None else (None, None, 0.0)
        a = turn.mat if src is None else src
        spec = self._spec(a, dst, w, speech=speech)
        self._see(self._m.ref(a), speech=speech)
        if src is None:
            turn.mat = self._m.step(turn.mat)
            turn.last_speech = self._m.ref(a) if speech else turn.last_speech
            if turn.switch_left is not None:
                turn.switch_left -= 1
        nxt = turn.mat if src is None else self._m.step(src)
        turn.last = (nxt, None if dst is None else self._m.step(dst), w)
        return spec

    def _see(self, ref: SourceRef, *, speech: bool) -> None:
        """Record a shown frame in the visits (and count it when it repeats a visit)."""
        self._t += 1
        cover = self._cover[ref.clip]
        if speech:
            self._bump(speech_frames=1, repeated_frames=cover[ref.frame] > 0)
        else:
            self._bump(tail_frames=1)
        if ref == self._neutral and not speech:
            return
        f = ref.frame
        v = self._visits[-1] if self._visits else None
        if v is not None and v[0] == ref.clip:
            d, span = f - v[2], v[2] - v[1]
            if d == 0 or (abs(d) <= MAX_STEP and d * span >= 0):  # goes on the same way
                lo, hi = min(v[1], v[2]), max(v[1], v[2])
                for g in (*range(f, lo), *range(hi + 1, f + 1)):
                    cover[g] += 1
                v[2], v[3] = f, self._t
                return
        self._visits.append([ref.clip, f, f, self._t])
        cover[f] += 1
        if len(self._visits) > MAX_VISITS:
            self._forget(self._visits.pop(0))

    def _forget(self, visit: list[int]) -> None:
        cover = self._cover[visit[0]]
        for g in range(min(visit[1], visit[2]), max(visit[1], visit[2]) + 1):
            cover[g] -= 1

    def _prune(self) -> None:
        """Forget visits older than the horizon (at turn starts)."""
        keep = []
        for v in self._visits:
            if v[3] >= self._t - self._horizon:
                keep.append(v)
            else:
                self._forget(v)
        self._visits = keep

    def _finish(self, plan: list[_Blend], rest: Cur | None) -> list[FrameSpec]:
        """Emit tail frames; the conversation goes on after the material they showed."""
        out = []
        for src, dst, w in plan:
            assert src is not None
            out.append(self._spec(src, dst, w, speech=False))
            self._see(self._m.ref(src), speech=False)
        if rest is not None and self._m.runs[rest.run].speech:
            self._pos = Cur(rest.run, rest.idx, rest.dir or 1)
        self._turn = None
        return out

    def _shown_at(self, ref: SourceRef) -> int | None:
        """When ref was last shown, from the newest visit that holds it."""
        for clip, first, last, t_end in reversed(self._visits):
            if clip == ref.clip and min(first, last) <= ref.frame <= max(first, last):
                return t_end - abs(last - ref.frame)
        return None

    def _rewind(self, t: int) -> None:
        """Forget what was shown after time t: those frames were planned but never shown."""
        while self._visits and self._visits[-1][3] > t:
            v = self._visits[-1]
            start = v[3] - abs(v[2] - v[1])
            if start > t:
                self._forget(self._visits.pop())
                continue
            self._forget(v)
            v[2] -= (v[3] - t) * (1 if v[2] >= v[1] else -1)
            v[3] = t
            cover = self._cover[v[0]]
            for g in range(min(v[1], v[2]), max(v[1], v[2]) + 1):
                cover[g] += 1
            break
        self._t = min(self._t, t)

    def _bump(self, **delta: int | bool) -> None:
        for k, v in delta.items():
            self._counts[k] += int(v)

    # --- blends -----------------------------------------------------------

    def _mix_of(self, spec: FrameSpec, direction: int) -> _Mix:
        """The streams of a shown frame; the neutral pose stays still (it is where tails go)."""

        def cur(ref: SourceRef) -> Cur:
            return self._ncur if ref == self._neutral else self._m.cursor(ref, direction)

        if spec.blend_to is None or spec.blend_weight == 0.0:
            return (cur(spec.source), None, 0.0)
        return (cur(spec.source), cur(spec.blend_to), spec.blend_weight)

    def _advance(self, mix: _Mix) -> _Mix:
        a, b, w = mix
        return (self._m.step(a), None if b is None else self._m.step(b), w)

    def _split(self, mix: _Mix) -> tuple[Cur, Cur | None, float]:
        """(major, minor, weight of minor) of a picture; minor None for a single stream."""
        a, b, w = mix
        if b is None or w <= 0.0 or self._m.ref(a) == self._m.ref(b):
            return a, None, 0.0
        if w >= 1.0:
            return b, None, 0.0
        return (b, a, 1.0 - w) if w > 0.5 else (a, b, w)

    def _settle(self, major: Cur, minor: Cur, m: float, p: int) -> tuple[list[_Blend], Cur]:
        """p frames fading the minor stream (weight m) out, linearly; the major goes on."""
        out: list[_Blend] = []
        for j in range(1, p + 1):
            out.append((major, minor, m * (1.0 - j / p)))
            major, minor = self._m.step(major), self._m.step(minor)
        return out, major

    def _blend_in(self, prev: _Mix) -> list[_Blend]:
        """From the idle frame before the turn into the material (src None)."""
        if self._n_in == 0:
            return []  # blend_in_ms 0: a cut, as configured
        major, minor, m = self._split(prev)
        out: list[_Blend] = []
        if minor is not None:
            out, major = self._settle(major, minor, m, math.ceil(m / SETTLE_STEP))
        for j in range(1, self._n_in + 1):
            out.append((None, major, 1.0 - ease(j / self._n_in)))
            major = self._m.step(major)
        return out

    def _crossfade(self, turn: _Turn, to: Cur, n: int) -> None:
        """Start a new piece at `to`; the old one plays on (or holds) under it for n frames."""
        assert not turn.queue
        old = turn.mat
        for j in range(1, n + 1):
            turn.queue.append((None, old, 1.0 - ease(j / n)))
            old = self._m.step(old)
        turn.mat = to
        self._bump(switches=1)

    def _converge(self, prev: _Mix, n: int, budget: int | None) -> tuple[list[_Blend], Cur | None]:
        """Frames from the picture `prev` to the neutral pose, and the material stream after them.

        With a budget (interrupt) everything fits in `budget` frames: the fade-out of a
        third stream gets at most a third of them (none for budgets under 3 frames).
        """
        major, minor, m = self._split(prev)
        is_n = self._is_neutral
        out: list[_Blend] = []
        w0 = 0.0
        if minor is not None and is_n(minor):
            w0 = m
        elif minor is not None and is_n(major):
            major, w0 = minor, 1.0 - m
        elif minor is None and is_n(major):
            return [(self._ncur, None, 0.0)], None
        elif minor is not None:
            p = math.ceil(m / SETTLE_STEP)
            if budget is not None:
                p = min(p, budget // 3)
            if p:
                out, major = self._settle(major, minor, m, p)
            if budget is not None:
                n = budget - p
        for j in range(1, n + 1):
            out.append((major, self._ncur, w0 + (1.0 - w0) * ease(j / n)))
            major = self._m.step(major)
        return out, major

    def _is_neutral(self, c: Cur) -> bool:
        return self._m.ref(c) == self._neutral

    # --- planning ---------------------------------------------------------

    def _before_speech_frame(self, turn: _Turn) -> None:
        if turn.switch_left is not None and turn.switch_left <= 0 and not turn.queue:
            assert turn.switch_to is not None
            # An exit planned late may have less than blend_out_ms to its natural end.
            d = self._remaining(turn) or 0
            self._crossfade(turn, turn.switch_to, max(min(self._n_out, d - 1), MIN_FADE))
            turn.switch_left = turn.switch_to = None
            turn.final = True
            return
        if turn.final or turn.switch_left is not None or turn.queue:
            return
        if self._m.left(turn.mat) > self._n_out:
            return
        # The run runs out: crossfade into a piece that ends the turn, or into fresh material.
        rec = self._recency()
        r = self._remaining(turn)
        if r is not None and r > self._n_out:
            trim = self._best_trimmed_start(turn, r, rec, avoid=turn.mat)
            if trim is not None and trim[1] <= STALE_SHARE * r:
                self._crossfade(turn, trim[2], self._n_out)
                turn.final = True
                return
        entry = max(self._freshest(turn, rec, avoid=turn.mat), default=None, key=lambda x: x[0])
        if entry is not None:
            self._crossfade(turn, entry[1], self._n_out)
            self._plan_mid(turn)
        elif self._m.left(turn.mat) == 1 and turn.mat.dir != 0:
            turn.mat = Cur(turn.mat.run, turn.mat.idx, -turn.mat.dir)  # ping-pong: last resort
            self._bump(reversals=1)

    def _remaining(self, turn: _Turn) -> int | None:
        """Material frames left to the end of speech (queued idle frames don't advance it)."""
        if turn.total is None:
            return None
        idle = sum(1 for s, _, _ in turn.queue if s is not None)
        return turn.total - turn.emitted - idle

    def _plan_start(self, turn: _Turn) -> None:
        r = self._remaining(turn)
        rec = self._recency()
        stay = None if r is None or r <= 0 else self._stay(turn, r, rec, check_tag=True)
        starts = self._starts(turn, rec)
        turn.mat = starts[0][1] if starts else self._pos
        if r is None:
            return
        if r <= 0:
            turn.final = True
            return
        # The exit is planned together with the start: the freshest start of each run
        # (and here) followed by a crossfade, or a start trimmed to end at a natural end.
        plans: list[tuple[_Plan, Cur]] = []
        if stay is not None:  # go on where the conversation left off, to a natural end
            extra = self._tag_cost(self._m.runs[stay[2].run].clip, turn) - CONTINUE_BONUS
            plans.append(((stay[0] + extra, *stay[1:]), stay[2]))
        trim = self._best_trimmed_start(turn, r, rec, avoid=None)
        if trim is not None:
            plans.append((trim, trim[2]))
        for _, start in starts[:START_CANDIDATES]:
            kmin = sum(1 for s, _, _ in turn.queue if s is None)
            switch = self._best_switch(turn, start, kmin, r, rec)
            if switch is not None:
                extra = self._tag_cost(self._m.runs[start.run].clip, turn)
                if start == self._pos:
                    extra -= CONTINUE_BONUS
                elif not self._m.runs[start.run].calm_start[start.idx]:
                    extra += MID_START_COST
                plans.append(((switch[0] + extra, *switch[1:]), start))
        if not plans:
            turn.final = r <= self._m.left(turn.mat)
            return
        (cost, pen, to, k), start = min(plans, key=lambda p: p[0][0])
        if pen > STALE_SHARE * r and r > self._m.left(start):
            return  # only stale exits: stream from the best start, plan again at the switch
        if k == 0 and to == start:
            turn.mat, turn.final = to, True
        else:
            turn.mat, turn.switch_left, turn.switch_to = start, k, to

    def _starts(self, turn: _Turn, rec: Recency) -> list[tuple[float, Cur]]:
        """Where a turn may start streaming, best first: here, and the freshest of each run."""
        out = self._freshest(turn, rec, avoid=None)
        here = self._pos
        if self._m.runs[here.run].speech and self._m.left(here) > 2 * self._n_out:
            tag = self._tag_cost(self._m.runs[here.run].clip, turn)
            out.append((self._stream_score(rec, here) + CONTINUE_BONUS - tag, here))
        return sorted(out, key=lambda x: -x[0])

    def _plan_mid(self, turn: _Turn) -> None:
        r = self._remaining(turn)
        turn.switch_left = turn.switch_to = None
        turn.final = False
        if r is None:
            return
        self._choose_exit(turn, r, self._recency())

    def _choose_exit(self, turn: _Turn, r: int, rec: Recency) -> None:
        """Mid-turn: playing on to a natural end r frames on, or the cheapest crossfade that
        ends speech at one, whichever shows fresher material (a crossfade costs SWITCH_COST).
        When every exit is stale and the run runs out first anyway, stream on: the next
        switch plans again."""
        if r <= 0:
            turn.final = True
            return
        stay = self._stay(turn, r, rec, check_tag=False)
        kmin = sum(1 for s, _, _ in turn.queue if s is None)  # no switch inside a blend
        plan = self._best_switch(turn, turn.mat, kmin, r, rec)
        if stay is not None and (plan is None or stay[0] <= plan[0]):
            turn.final = True
            return
        left = self._m.left(turn.mat)
        if plan is None or (plan[1] > STALE_SHARE * r and r > left):
            turn.final = r <= left  # no exit (or only stale ones): end inside this piece
            return
        turn.switch_left, turn.switch_to = plan[3], plan[2]

    def _stay(self, turn: _Turn, r: int, rec: Recency, *, check_tag: bool) -> _Plan | None:
        """Playing on here to the end of speech, r frames on, when a natural end lies there
        (k = 0), costed by how recently those frames were shown like any other plan: the
        position is kept so that movements don't repeat, not where they would."""
        if not self._fits_here(turn, r, check_tag=check_tag):
            return None
        c = turn.mat
        pen = rec.cost(c.run, c.idx, c.idx + r - 1)
        return (REPEAT_WEIGHT * pen, pen, c, 0)

    def _fits_here(self, turn: _Turn, r: int, *, check_tag: bool) -> bool:
        """Playing on, the r-th frame from here lies within LENGTH_TOLERANCE source frames
        of a natural end of this run."""
        c = turn.mat
        run = self._m.runs[c.run]
        last = c.idx + r - 1
        if c.dir != 1 or not run.speech or last >= len(run.frames):
            return False
        if check_tag and turn.tag in self._tags and turn.tag not in self._clips[run.clip].tags:
            return False  # the requested style wins over continuing here
        f = run.frames[last]
        return any(abs(run.frames[e] - f) <= LENGTH_TOLERANCE for e in run.ends if e >= c.idx)

    def _best_trimmed_start(
        self, turn: _Turn, r: int, rec: Recency, avoid: Cur | None
    ) -> _Plan | None:
        """The start r frames before a natural end, least recently shown (k = 0)."""
        best: _Plan | None = None
        for ri in self._m.speech_runs:
            run = self._m.runs[ri]
            tag = self._tag_cost(run.clip, turn)
            for e in run.ends:
                s = e - r + 1
                if s < 0 or self._near(avoid, ri, s):
                    continue
                pen = rec.cost(ri, s, e)
                cost = REPEAT_WEIGHT * pen + tag + self._rng.random() * JITTER
                cost += 0.0 if run.calm_start[s] else MID_START_COST
                if best is None or cost < best[0]:
                    best = (cost, pen, Cur(ri, s, 1), 0)
        return best

    def _best_switch(self, turn: _Turn, c: Cur, kmin: int, r: int, rec: Recency) -> _Plan | None:
        """k (>= kmin) more frames from c, then a crossfade into a piece whose natural end
        comes exactly at the end of speech, r frames on; the cheapest such plan."""
        old = self._m.runs[c.run]
        old_pre = rec.prefix[c.run]
        kmax = self._m.left(c)
        step = c.dir or 1
        best: _Plan | None = None
        for ri in self._m.speech_runs:
            run = self._m.runs[ri]
            # Every (end e, start s) with k = r - (e - s + 1) in [kmin, kmax] and a new
            # piece that outlasts its fade, as flat arrays.
            ends = run.ends_array
            lo = np.maximum(ends - r + 1 + kmin, 0)
            hi = np.minimum(ends - r + 1 + kmax, ends - MIN_FADE)
            count = np.maximum(hi - lo + 1, 0)
            n = int(count.sum())
            if n == 0:
                continue
            e = np.repeat(ends, count)
            s = np.repeat(lo, count) + np.arange(n) - np.repeat(np.cumsum(count) - count, count)
            k = r - (e - s + 1)
            exit_idx = c.idx + (k - 1) * step  # the old piece's last frame (k > 0)
            pre = rec.prefix[ri]
            pen = pre[e + 1] - pre[s]
            if step > 0:
                pen += old_pre[c.idx + k] - old_pre[c.idx]
            else:
                pen += old_pre[c.idx + 1] - old_pre[c.idx + 1 - k]
            calm = old.calm_exit[np.where(k > 0, exit_idx, c.idx)]
            cost = REPEAT_WEIGHT * pen + MID_START_COST * ~run.calm_start[s]
            cost += MID_GESTURE_COST * ((k > 0) & ~calm)
            if ri == c.run:  # no crossfade onto nearly the same or the coming frames
                first = np.minimum(c.idx, exit_idx) - self._n_out
                last = np.maximum(c.idx, exit_idx) + self._n_out
                cost[(s <= last) & (e >= first)] = np.inf
            i = int(np.argmin(cost))
            if not np.isfinite(cost[i]):
                continue
            total = float(cost[i]) + SWITCH_COST + self._tag_cost(run.clip, turn)
            total += self._rng.random() * JITTER
            if best is None or total < best[0]:
                best = (total, float(pen[i]), Cur(ri, int(s[i]), 1), int(k[i]))
        return best

    def _freshest(self, turn: _Turn, rec: Recency, avoid: Cur | None) -> list[tuple[float, Cur]]:
        """(score, start) of the freshest piece of each run with room for a crossfade,
        away from `avoid`."""
        out: list[tuple[float, Cur]] = []
        for ri in self._m.speech_runs:
            run = self._m.runs[ri]
            n = len(run.frames)
            if n <= self._n_out + 1:
                continue
            s = np.arange(n - self._n_out - 1)
            span = np.minimum(self._cap, n - s)
            pre = rec.prefix[ri]
            pen = (pre[s + span] - pre[s]) / span  # mean penalty of what streaming would show
            score = self._piece_score(span, pen) - MID_START_COST * ~run.calm_start[s]
            if avoid is not None and avoid.run == ri:
                score[np.abs(s - avoid.idx) <= 2 * self._n_out] = -np.inf  # see _near
            i = int(np.argmax(score))
            if not np.isfinite(score[i]):
                continue
            total = float(score[i]) - self._tag_cost(run.clip, turn) + self._rng.random() * JITTER
            out.append((total, Cur(ri, int(s[i]), 1)))
        return out

    def _stream_score(self, rec: Recency, cur: Cur) -> float:
        """What streaming on from cur is worth (see _piece_score)."""
        span = min(self._cap, self._m.left(cur))
        end = cur.idx + (span - 1) * (cur.dir or 1)
        return float(self._piece_score(np.asarray(span), rec.cost(cur.run, cur.idx, end) / span))

    def _piece_score(self, span: Any, mean_pen: Any) -> Any:
        """Streaming plays a piece until its run ends, so what counts is how stale its frames
        are on average; a longer piece (to the cap) means fewer crossfades."""
        return LENGTH_WEIGHT * span - REPEAT_WEIGHT * self._cap * mean_pen

    def _near(self, avoid: Cur | None, run: int, idx: int) -> bool:
        """A start this close to where we are would crossfade onto nearly the same frames."""
        return avoid is not None and avoid.run == run and abs(idx - avoid.idx) <= 2 * self._n_out

    def _tag_cost(self, clip: int, turn: _Turn) -> float:
        tags = self._clips[clip].tags
        cost = 0.0
        if turn.tag is not None and turn.tag in self._tags and turn.tag not in tags:
            cost += STYLE_COST
        if turn.listening and LISTENING_TAG in self._tags and LISTENING_TAG not in tags:
            cost += LISTEN_COST
        return cost

    def _recency(self) -> Recency:
        return Recency(self._m, self._visits, self._t, self._horizon)


def _picture(spec: FrameSpec) -> dict[SourceRef, float]:
    """A frame as weights per source frame (the same picture gives the same dict)."""
    if spec.blend_to is None or spec.blend_weight == 0.0:
        return {spec.source: 1.0}
    if spec.blend_weight == 1.0 or spec.blend_to == spec.source:
        return {spec.blend_to: 1.0}
    return {spec.source: 1.0 - spec.blend_weight, spec.blend_to: spec.blend_weight}


def _pair(ref: SourceRef) -> list[int]:
    return [ref.clip, ref.frame]
