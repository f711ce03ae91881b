"""Checks on a rendered chunk before anyone sees it, sans I/O.

A renderer may hand back garbage without raising: a diffusion step that
overflowed (NaN), a VAE that decoded black, a paste at the wrong place. Each
chunk is checked for its shape and dtype, non-finite values, blank and
saturated frames, and coherence with its source frames outside the mouth
region (only the mouth may differ from the source picture). Blank,
saturation and coherence are judged against the source frame, so an avatar
with a dark background is not "blank". The pixel checks read every
`stride`-th pixel: they look for gross failures, not for subtle ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import ValidationConfig

CHECKS = ("shape", "nonfinite", "blank", "saturated", "incoherent")
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    check: str | None = None  # the first check that failed, one of CHECKS
    detail: str = ""


OK = Verdict(True)


def _clipped_shares(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Per row of `pixels` (N, P): the share of values <= 3 or >= 252. Adding 4 wraps
    exactly those values (uint8 arithmetic) into 0..7, so one comparison finds them."""
    clipped = np.count_nonzero((pixels + np.uint8(4)) <= np.uint8(7), axis=1)
    shares: npt.NDArray[np.float64] = clipped / max(pixels.shape[1], 1)
    return shares


def _samples(pictures: npt.NDArray[np.uint8], stride: int) -> npt.NDArray[np.uint8]:
    """Every `stride`-th pixel of each picture (N, H, W, 3), one contiguous copy
    (N, H/s, W/s, 3): the statistics below then run over plain rows."""
    return np.ascontiguousarray(pictures[:, ::stride, ::stride])


def validate_chunk(
    frames: npt.NDArray[Any],
    expected_frames: int,
    sources: npt.NDArray[np.uint8],
    mouth: list[Box],
    config: ValidationConfig,
    stride: int = 2,
) -> Verdict:
    """Judge `frames` (F, H, W, 3), F == `expected_frames`.

    `sources` (F', H, W, 3) are the source pictures of F' <= F sampled frames
    (`sources[j]` belongs to `frames[j * (F - 1) // max(F' - 1, 1)]`) and
    `mouth[j]` is the box where that frame may differ from `sources[j]`.
    """
    want = (expected_frames, *sources.shape[1:])
    if frames.shape != want:
        return Verdict(False, "shape", f"frames {frames.shape}, expected {want}")
    if frames.dtype != np.uint8:
        if not np.issubdtype(frames.dtype, np.number):
            return Verdict(False, "shape", f"dtype {frames.dtype}")
        if not bool(np.isfinite(frames).all()):
            return Verdict(False, "nonfinite", "NaN or Inf in the frames")
        return Verdict(False, "shape", f"dtype {frames.dtype}, expected uint8")
    if len(sources) != len(mouth) or not 0 < len(sources) <= len(frames):
        raise ValueError(f"{len(sources)} sources and {len(mouth)} mouth boxes for "
                         f"{len(frames)} frames")
    view = _samples(frames, stride)  # (F, H/s, W/s, 3)
    src_view = _samples(sources, stride)
    rows, src_rows = view.reshape(len(view), -1), src_view.reshape(len(src_view), -1)
    # float32 sums are exact enough for 8-bit values, and faster than float64.
    floor_std = float(src_rows.std(axis=1, dtype=np.float32).min())
    stds = rows.std(axis=1, dtype=np.float32)
    limit = min(config.blank_std, floor_std / 2)
    if float(stds.min()) < limit:
        i = int(stds.argmin())
        return Verdict(False, "blank", f"frame {i} has pixel spread {float(stds[i]):.2f}")
    extra = _clipped_shares(rows) - float(_clipped_shares(src_rows).max())
    over = np.flatnonzero(extra > config.saturated_share)
    if over.size:
        i = int(over[0])
        return Verdict(False, "saturated", f"frame {i}: {extra[i]:.0%} more pixels clipped "
                       "than in the source")
    n = len(frames)
    for j, (x0, y0, x1, y1) in enumerate(mouth):
        i = j * (n - 1) // max(len(sources) - 1, 1)
        diff = np.abs(view[i].astype(np.int16) - src_view[j].astype(np.int16))  # (H/s, W/s, 3)
        # Outside the mouth box = everything minus the box (sampled on the same grid).
        box = diff[y0 // stride : -(-y1 // stride), x0 // stride : -(-x1 // stride)]
        outside = diff.size - box.size
        if outside == 0:
            continue
        mean = (float(diff.sum(dtype=np.int64)) - float(box.sum(dtype=np.int64))) / outside
        if mean > config.max_mean_diff:
            return Verdict(False, "incoherent", f"frame {i} differs from its source by "
                           f"{mean:.1f} on average outside the mouth")
    return OK
