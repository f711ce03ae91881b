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


def _clipped_share(pixels: npt.NDArray[np.uint8]) -> float:
    return float(np.count_nonzero((pixels <= 3) | (pixels >= 252))) / max(pixels.size, 1)


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
    view = frames[:, ::stride, ::stride]  # (F, H/s, W/s, 3)
    src_view = sources[:, ::stride, ::stride]
    floor_std = float(src_view.std(axis=(1, 2, 3)).min())
    stds = view.reshape(len(view), -1).std(axis=1)
    limit = min(config.blank_std, floor_std / 2)
    if float(stds.min()) < limit:
        i = int(stds.argmin())
        return Verdict(False, "blank", f"frame {i} has pixel spread {float(stds[i]):.2f}")
    src_clipped = max(_clipped_share(s) for s in src_view)
    for i, frame in enumerate(view):
        extra = _clipped_share(frame) - src_clipped
        if extra > config.saturated_share:
            return Verdict(False, "saturated", f"frame {i}: {extra:.0%} more pixels clipped "
                           "than in the source")
    n = len(frames)
    for j, (source, (x0, y0, x1, y1)) in enumerate(zip(sources, mouth, strict=True)):
        i = j * (n - 1) // max(len(sources) - 1, 1)
        diff = np.abs(frames[i, ::stride, ::stride].astype(np.int16)
                      - source[::stride, ::stride].astype(np.int16))  # (H/s, W/s, 3)
        keep = np.ones(diff.shape[:2], bool)
        keep[y0 // stride : -(-y1 // stride), x0 // stride : -(-x1 // stride)] = False
        if not keep.any():
            continue
        mean = float(diff[keep].mean())
        if mean > config.max_mean_diff:
            return Verdict(False, "incoherent", f"frame {i} differs from its source by "
                           f"{mean:.1f} on average outside the mouth")
    return OK
