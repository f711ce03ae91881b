"""Build a prepared avatar's idle loop from its rest segments.

The loop is a cycle of *parts* (stretches of rest material without bad frames)
joined by crossfades of IDLE_BLEND_S: the first frames of each part are blended
with the last frames of the part before it, including across the wrap from the
loop's end to its start. The cycle is rotated so that frame 0 is the neutral pose
shown unblended, which is where turns end and idle video starts. When the neutral
pose lies inside a rest part with room for the blends on both sides, the loop
passes through it as ordinary motion; otherwise a short still of the neutral pose
is added as a part of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from media.avatar import ClipInfo
from media.types import FrameSpec, SourceRef
from sessions.timeline_material import ease

IDLE_BLEND_S = 0.4  # crossfade at each seam


def build_idle_loop(
    clips: Sequence[ClipInfo], neutral: SourceRef, fps: int, min_seconds: float
) -> tuple[FrameSpec, ...]:
    """A seamless loop of at least min_seconds, idle_loop[0] == FrameSpec(neutral)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= neutral.clip < len(clips):
        raise ValueError(f"neutral {neutral} is not a frame of the clips")
    clip = clips[neutral.clip]
    if not 0 <= neutral.frame < clip.num_frames or neutral.frame in clip.bad_frames:
        raise ValueError(f"neutral {neutral} is out of range or a bad frame")
    x = max(round(IDLE_BLEND_S * fps), 1)
    pieces = _rest_pieces(clips, 2 * x + 1)
    if not pieces:
        raise ValueError(f"no rest segment has {2 * x + 1} consecutive good frames for a loop")
    home = next(
        (i for i, p in enumerate(pieces) if neutral in p[x : len(p) - x]),
        None,
    )
    parts: list[list[SourceRef]]
    if home is not None:
        parts = [pieces[home]]
        others = pieces[home + 1 :] + pieces[:home]
    else:
        parts = [[neutral] * (2 * x + 1)]  # a still of the neutral pose, faded in and out
        others = pieces
    target = max(round(min_seconds * fps), 1)
    i = 0
    while sum(len(p) - x for p in parts) < target:
        parts.append(others[i % len(others)] if others else parts[0])
        i += 1
    frames = _join(parts, x)
    start = next(k for k, s in enumerate(frames) if s == FrameSpec(neutral))
    return tuple(frames[start:] + frames[:start])


def _rest_pieces(clips: Sequence[ClipInfo], min_len: int) -> list[list[SourceRef]]:
    """Consecutive good frames of every rest segment, min_len or longer, in clip order."""
    out: list[list[SourceRef]] = []
    for c, clip in enumerate(clips):
        for lo, hi in sorted(clip.rest_segments):
            if not 0 <= lo < hi <= clip.num_frames:
                raise ValueError(f"clip {c} rest segment {(lo, hi)} is not inside the clip")
            piece: list[SourceRef] = []
            for f in [*range(lo, hi), None]:
                if f is not None and f not in clip.bad_frames:
                    piece.append(SourceRef(c, f))
                    continue
                if len(piece) >= min_len:
                    out.append(piece)
                piece = []
    return out


def _join(parts: list[list[SourceRef]], x: int) -> list[FrameSpec]:
    """Each part's unblended middle, preceded by the seam from the part before (cyclic)."""
    out: list[FrameSpec] = []
    for i, part in enumerate(parts):
        prev = parts[i - 1]
        for j in range(x):
            w = 1.0 - ease((j + 1) / (x + 1))  # weight of the old part, strictly inside (0, 1)
            out.append(FrameSpec(part[j], prev[len(prev) - x + j], round(w, 4)))
        out.extend(FrameSpec(ref) for ref in part[x : len(part) - x])
    return out
