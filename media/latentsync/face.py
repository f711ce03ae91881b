"""LatentSync's face inputs per avatar: alignment, crops, masks, cached latents, paste-back.

Alignment (facts in ../shared/manifests/README.md; `media.face_align` holds the
reference's template and smoothing): a similarity from three points (left
eyebrow centre, right eyebrow centre, nose centre) onto a fixed template in a
210 x 280 box (at 256 px), the box resized to the square crop; the translation
is smoothed over consecutive frames (0.2 previous + 0.8 current).

Where a clip's affines come from:
- a prepared avatar (`media.prepare`) carries `affine{r}_{clip}` (frame pixel ->
  crop pixel) and `crop{r}_{clip}` in `avatar.extras`, measured on the source
  video with a landmark model: used as they are (r = 256 or 512);
- otherwise the avatar's FACE_POINTS give the three points (`align_points`):
  eyebrow centres = eye centres moved up, perpendicular to the eye line, by
  0.3 eye distances; nose centre = 56% of the way from the eyes' midpoint to
  the nose tip. These are the proportions of the mean face `media.face` fits
  (eyebrows 0.3 above the eyes; nose centroid 0.32 and nose tip 0.571 eye
  distances below the eye line). Smoothing restarts after a frame without a face.

Paste-back (the reference's `restore_img`, rearranged): the generated crop goes
back through the inverse affine under a feathered box mask (eroded by about a
twentieth of the crop and blurred as wide). Only the regenerated lower face is
pasted (feather x (1 - mouth mask)); elsewhere the frame keeps its own pixels
where the reference pastes the crop's upper face, i.e. the frame resampled
twice. The feather is built once in crop space, so one `grid_sample` warps the
faces and alphas of a whole batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from media.avatar import FACE_POINTS, Avatar
from media.face_align import (
    BOX_256,
    CROP_SIZES,
    FILL_VALUE,
    AlignSmoother,
    mouth_mask,
    warp_crop,
)
from media.latentsync.vae import LatentCodec
from media.types import AvatarPrep, Frame, Frames, SourceRef

Affine = npt.NDArray[np.float64]  # (2, 3) or (N, 2, 3): frame pixel -> crop pixel

BROW_RAISE = 0.3  # eyebrow centre above the eye centre, in eye distances
NOSE_CENTRE = 0.32 / 0.571  # nose centre's share of the way from the eyes' midpoint to the tip
ENCODE_BATCH = 32  # crops per VAE encode call
_P = {name: i for i, name in enumerate(FACE_POINTS)}


def align_points(geometry: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """(3, 2) left eyebrow centre, right eyebrow centre, nose centre from FACE_POINTS."""
    g = np.asarray(geometry, np.float64)
    left, right, tip = g[_P["left_eye"]], g[_P["right_eye"]], g[_P["nose_tip"]]
    d = right - left
    down = np.array([-d[1], d[0]])  # d turned 90 degrees: down the face in image coordinates
    mid = (left + right) / 2
    return np.stack([left - BROW_RAISE * down, right - BROW_RAISE * down,
                     mid + NOSE_CENTRE * (tip - mid)])


def crop_affine(box_affine: Affine, resolution: int) -> Affine:
    """(2, 3) frame -> crop pixels for any crop size, from a 256 px box affine.

    The box (210 x 280 at 256 px) scales with the crop and is resized to a
    square; pixel centres map as x' + 0.5 = (x + 0.5) * s. Equals
    `media.face_align.crop_affine` at 256 and 512 px.
    """
    k = resolution / 256
    sx, sy = 256 / BOX_256[0], 256 / BOX_256[1]  # box -> square, the same at every size
    resize = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    box = np.vstack([np.asarray(box_affine, np.float64) * k, [0.0, 0.0, 1.0]])
    return np.asarray((resize @ box)[:2], np.float64)


def crop_picture(frame: Frame, box_affine: Affine, resolution: int) -> Frame:
    """(r, r, 3) aligned face. At 256/512 px exactly as the reference (box warp, then
    Lanczos); other sizes (tiny test models) warp straight to the square."""
    if resolution in CROP_SIZES:
        return warp_crop(frame, box_affine, resolution)
    warped = cv2.warpAffine(
        frame, crop_affine(box_affine, resolution), (resolution, resolution),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL_VALUE,) * 3,
    )
    return np.asarray(warped, np.uint8)


@dataclass(frozen=True, slots=True)
class CropMasks:
    """The fixed masks of one crop size, on the compute device."""

    pixel: torch.Tensor  # (r, r) float32: LatentSync's mask / 255, 0 over the lower face
    keep: torch.Tensor  # (r, r) bool: pixel > 0, the part of the face the masked input keeps
    latent: torch.Tensor  # (h, w) float32: `pixel` nearest-resized, the UNet's mask channel
    paste_alpha: torch.Tensor  # (r, r) float32: feather x (1 - pixel)


def crop_masks(resolution: int, downsample: int, device: torch.device) -> CropMasks:
    pixel = torch.from_numpy(mouth_mask(resolution).astype(np.float32) / 255.0)  # (r, r)
    side = resolution // downsample
    latent = F.interpolate(pixel[None, None], size=(side, side), mode="nearest")[0, 0]
    alpha = torch.from_numpy(_feather(resolution)) * (1.0 - pixel)
    return CropMasks(pixel.to(device), (pixel > 0).to(device), latent.to(device),
                     alpha.to(device))


def _feather(resolution: int) -> npt.NDArray[np.float32]:
    """(r, r) soft box in crop space: the reference's 2 px erosion, then an erosion of
    2 * edge and a Gaussian blur of 2 * edge + 1 with edge = sqrt(face area) / 20."""
    ones = np.ones((resolution, resolution), np.float32)
    edge = max(resolution // 20, 1)
    zero = cv2.BORDER_CONSTANT  # outside the crop counts as outside the face
    region = cv2.erode(ones, np.ones((2, 2), np.uint8), borderType=zero, borderValue=0)
    region = cv2.erode(region, np.ones((2 * edge, 2 * edge), np.uint8), borderType=zero,
                       borderValue=0)
    size = 2 * edge + 1
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    blurred = cv2.GaussianBlur(region, (size, size), sigma, borderType=cv2.BORDER_CONSTANT)
    return np.asarray(blurred, np.float32)


# --- per clip: affines and crops ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ClipTrack:
    """One clip's faces at one crop size."""

    crop_affines: Affine  # (n, 2, 3) frame -> crop pixels; zeros where there is no face
    has_face: npt.NDArray[np.bool_]  # (n,)
    box_affines: Affine | None  # (n, 2, 3) 256 px box affines, to warp crops from frames
    crops: npt.NDArray[np.uint8] | None  # (n, r, r, 3) prepared crops (memory-mapped)

    def crop(self, avatar: Avatar, ref: SourceRef, resolution: int) -> Frame:
        if self.crops is not None:
            return np.asarray(self.crops[ref.frame], np.uint8)
        assert self.box_affines is not None
        return crop_picture(avatar.source.frame(ref), self.box_affines[ref.frame], resolution)


def track_clip(avatar: Avatar, clip: int, resolution: int) -> ClipTrack:
    """Affines of every frame of a clip: the prepared ones, else from the face points."""
    info = avatar.clips[clip]
    n = info.num_frames
    bad = np.zeros(n, bool)
    bad[[f for f in info.bad_frames if 0 <= f < n]] = True
    affine_key, crop_key = f"affine{resolution}_{clip}", f"crop{resolution}_{clip}"
    if affine_key in avatar.extras and crop_key in avatar.extras:
        affines = np.asarray(avatar.extras[affine_key], np.float64)
        crops = avatar.extras[crop_key]
        if not isinstance(crops, np.ndarray) or crops.shape != (n, resolution, resolution, 3):
            shape = getattr(crops, "shape", type(crops).__name__)
            raise ValueError(f"avatar {avatar.id!r}: {crop_key} is {shape}, want "
                             f"{(n, resolution, resolution, 3)}")
        if affines.shape != (n, 2, 3):
            raise ValueError(f"avatar {avatar.id!r}: {affine_key} is {affines.shape}, want "
                             f"{(n, 2, 3)}")
        has_face = ~bad & np.isfinite(affines).all(axis=(1, 2)) & (affines != 0).any(axis=(1, 2))
        return ClipTrack(np.where(has_face[:, None, None], affines, 0.0), has_face, None, crops)

    smoother = AlignSmoother()
    boxes = np.zeros((n, 2, 3))
    has_face = np.zeros(n, bool)
    for f in range(n):
        points = align_points(avatar.source.geometry(SourceRef(clip, f)))
        if bad[f] or not np.isfinite(points).all():
            smoother.reset()
            continue
        try:
            boxes[f] = smoother.update(points)
        except ValueError:  # coinciding points: no usable face
            smoother.reset()
            continue
        has_face[f] = True
    crop_affines = np.stack([crop_affine(b, resolution) if ok else np.zeros((2, 3))
                             for b, ok in zip(boxes, has_face, strict=True)])
    return ClipTrack(crop_affines, has_face, boxes, None)


# --- per avatar: resident latents ------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaceInputs:
    """What the pipeline needs of N output frames' faces."""

    crop_affines: Affine  # (N, 2, 3)
    has_face: npt.NDArray[np.bool_]  # (N,)
    masked: torch.Tensor  # (N, C, h, w) scaled latents of the masked crops
    reference: torch.Tensor  # (N, C, h, w) scaled latents of the whole crops


class AvatarFaces:
    """One avatar's face inputs at one crop size, computed once and reused by every session.

    Affines are computed per clip (cheap: geometry only, in frame order for the
    smoothing). Latents are encoded per source frame and stay resident on the
    codec's device: `prepare` encodes them all ahead of time, `inputs` encodes
    whatever it meets that is still missing. Either way a frame's latents are
    the same (the noise is seeded per frame). Resident memory is two latents of
    (C, r/8, r/8) per source frame: 16 KiB in float16 at 256 px (C = 4), 64 KiB
    at 512 px, so 20,000 frames hold 320 MiB at 256 px. Not thread-safe: the
    renderer serialises calls.
    """

    def __init__(self, avatar: Avatar, resolution: int, codec: LatentCodec, masks: CropMasks,
                 seed: int) -> None:
        self.avatar = avatar
        self.resolution = resolution
        self._codec = codec
        self._masks = masks
        self._seed = seed
        self._side = resolution // codec.downsample
        self._tracks: dict[int, ClipTrack] = {}
        # Per clip: (masked, reference) latents (n, C, h, w) and which frames hold values.
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled: dict[int, npt.NDArray[np.bool_]] = {}
        self._encoded = 0  # frames filled, over all clips
        self._total = sum(c.num_frames for c in avatar.clips)
        # `prepare` has filled every frame before (clip, frame), in clip then frame order.
        self._cursor = (0, 0)

    def track(self, clip: int) -> ClipTrack:
        if clip not in self._tracks:
            self._tracks[clip] = track_clip(self.avatar, clip, self.resolution)
        return self._tracks[clip]

    @property
    def encoded_frames(self) -> int:
        """Source frames whose latents are resident (frames without a face count: their
        latents are zeros, never used)."""
        return self._encoded

    @property
    def total_frames(self) -> int:
        return self._total

    def prepare(self, max_frames: int | None = None) -> AvatarPrep:
        """Track every clip and encode every source frame not encoded yet, ENCODE_BATCH at a
        time in clip and frame order; at most `max_frames` frames per call (None: all).

        Idempotent, and linear in the avatar's frames over any sequence of calls: each
        call resumes where the last one stopped and skips frames `inputs` encoded since.
        """
        started = time.perf_counter()
        todo: list[SourceRef] = []
        clip, frame = self._cursor
        while clip < len(self.avatar.clips) and (max_frames is None or len(todo) < max_frames):
            self.track(clip)
            self._storage(clip)
            filled = self._filled[clip]
            while frame < len(filled) and (max_frames is None or len(todo) < max_frames):
                if not filled[frame]:
                    todo.append(SourceRef(clip, frame))
                frame += 1
            if frame == len(filled):
                clip, frame = clip + 1, 0
        for start in range(0, len(todo), ENCODE_BATCH):
            self._encode(todo[start : start + ENCODE_BATCH])
        self._cursor = (clip, frame)  # only now: a failed encode leaves its frames to do
        return AvatarPrep(self.avatar.id, len(todo), self._total - self._encoded,
                          time.perf_counter() - started)

    def inputs(self, refs: Sequence[SourceRef]) -> FaceInputs:
        """Affines, face flags and latents of the given source frames (encoding missing ones)."""
        self._encode_missing(refs)
        affines = np.stack([self.track(r.clip).crop_affines[r.frame] for r in refs])
        has_face = np.array([bool(self.track(r.clip).has_face[r.frame]) for r in refs])
        masked = torch.stack([self._latents[r.clip][0][r.frame] for r in refs])  # (N, C, h, w)
        reference = torch.stack([self._latents[r.clip][1][r.frame] for r in refs])
        return FaceInputs(affines, has_face, masked, reference)

    def _storage(self, clip: int) -> tuple[torch.Tensor, torch.Tensor]:
        if clip not in self._latents:
            n = self.avatar.clips[clip].num_frames
            shape = (n, self._codec.latent_channels, self._side, self._side)
            device, dtype = self._codec.device, self._codec.dtype
            self._latents[clip] = (torch.zeros(shape, device=device, dtype=dtype),
                                   torch.zeros(shape, device=device, dtype=dtype))
            self._filled[clip] = np.zeros(n, bool)
        return self._latents[clip]

    def _encode_missing(self, refs: Sequence[SourceRef]) -> None:
        todo: list[SourceRef] = []
        for ref in dict.fromkeys(refs):  # unique, in order
            self._storage(ref.clip)
            if not self._filled[ref.clip][ref.frame]:
                todo.append(ref)
        for start in range(0, len(todo), ENCODE_BATCH):
            self._encode(todo[start : start + ENCODE_BATCH])

    def _encode(self, refs: Sequence[SourceRef]) -> None:
        codec, masks = self._codec, self._masks
        with_face = [r for r in refs if self.track(r.clip).has_face[r.frame]]
        if with_face:
            crops = np.stack([self.track(r.clip).crop(self.avatar, r, self.resolution)
                              for r in with_face])  # (N, r, r, 3) uint8
            pictures = torch.from_numpy(crops).to(codec.device).permute(0, 3, 1, 2)
            pictures = pictures.float() / 127.5 - 1.0  # (N, 3, r, r) in [-1, 1]
            # Reference: the normalised face times the mask, i.e. mid-grey (0) over the mouth.
            masked_pictures = pictures * masks.keep  # (N, 3, r, r)
            noise = self._noise(with_face)  # (N, 2, C, h, w)
            masked = codec.encode(masked_pictures, noise[:, 0])
            reference = codec.encode(pictures, noise[:, 1])
            for i, r in enumerate(with_face):
                store_masked, store_ref = self._latents[r.clip]
                store_masked[r.frame] = masked[i]
                store_ref[r.frame] = reference[i]
        for r in refs:  # frames without a face keep zero latents; they are never pasted
            self._filled[r.clip][r.frame] = True
        self._encoded += len(refs)

    def _noise(self, refs: Sequence[SourceRef]) -> torch.Tensor:
        """(N, 2, C, h, w) standard normal noise seeded by (seed, clip, frame): the latents
        of a frame are the same whatever order frames are first used in."""
        shape = (2, self._codec.latent_channels, self._side, self._side)
        out = []
        for r in refs:
            entropy = [self._seed % 2**64, r.clip, r.frame]  # SeedSequence takes no negatives
            state = np.random.SeedSequence(entropy).generate_state(1)
            gen = torch.Generator().manual_seed(int(state[0]))
            out.append(torch.randn(shape, generator=gen))
        return torch.stack(out)


def blend_inputs(a: FaceInputs, b: FaceInputs, weights: npt.NDArray[np.float64]) -> FaceInputs:
    """(1 - w) * a + w * b per frame: latents, and affines (close poses: near-similarities).

    A frame has a face when every side with a nonzero weight has one.
    """
    w = weights.astype(np.float64)  # (N,)
    affines = (1.0 - w)[:, None, None] * a.crop_affines + w[:, None, None] * b.crop_affines
    has_face = (a.has_face | (w == 1.0)) & (b.has_face | (w == 0.0))
    wt = torch.from_numpy(w).to(a.masked.device, torch.float32)[:, None, None, None]
    masked = ((1.0 - wt) * a.masked.float() + wt * b.masked.float()).to(a.masked.dtype)
    reference = ((1.0 - wt) * a.reference.float() + wt * b.reference.float()).to(a.masked.dtype)
    return FaceInputs(affines, has_face, masked, reference)


# --- paste-back ------------------------------------------------------------------


def paste_faces(
    frames: Frames,
    faces: torch.Tensor,
    crop_affines: Affine,
    has_face: npt.NDArray[np.bool_],
    alpha: torch.Tensor,
) -> None:
    """Blend generated crops into `frames` in place, all frames in one `grid_sample`.

    frames (N, H, W, 3) uint8 on the CPU; faces (N, 3, r, r) in [-1, 1] on the
    compute device; crop_affines (N, 2, 3) frame -> crop pixels; alpha (r, r).
    Only a window around each face travels to the device and back. The same as
    `plan_paste`, `blend_faces` and `write_windows` in turn (the renderer runs the
    plan before the faces exist and the copy back asynchronously).
    """
    plan = plan_paste(frames, crop_affines, has_face, faces.shape[-1], faces.device)
    if plan is not None:
        write_windows(frames, plan, blend_faces(plan, faces, alpha).cpu().numpy())


@dataclass(frozen=True, slots=True)
class PastePlan:
    """Where the generated faces of N frames go, made before the faces exist: per pasted
    face its index among the N and its window's corner (one window size for all), and on
    the device each window's sampling grid in crop coordinates and its background."""

    index: list[int]  # which of the N frames have a face on screen
    rows: torch.Tensor  # (M,) int64 on the device: `index`, for gathering the faces
    corners: list[tuple[int, int]]  # (x, y) of each window in its frame
    grid: torch.Tensor  # (M, hh, ww, 2) float32: grid_sample's [-1, 1] crop coordinates
    background: torch.Tensor  # (M, 3, hh, ww) float32: the windows' pixels before the paste


def plan_paste(frames: Frames, crop_affines: Affine, has_face: npt.NDArray[np.bool_],
               r: int, device: torch.device) -> PastePlan | None:
    """The paste-back of crops of `r` px into `frames` (N, H, W, 3) uint8, whose pixels are
    the background; None when no face is on screen. On CUDA the host-to-device copies
    come from pinned memory without waiting for the device's queued work, so a plan made
    while the device runs the UNet does not wait for it."""
    n, height, width = frames.shape[:3]
    found = [(i, box) for i in range(n) if has_face[i]
             for box in [_face_box(crop_affines[i], r, width, height)] if box is not None]
    if not found:
        return None
    idx = [i for i, _ in found]
    hh = max(y1 - y0 for _, (_, y0, _, y1) in found)
    ww = max(x1 - x0 for _, (x0, _, x1, _) in found)
    # One window size for all: each window keeps its corner, moved back inside the frame.
    corners = [(min(x0, width - ww), min(y0, height - hh)) for _, (x0, y0, _, _) in found]
    windows = np.stack([frames[i, y : y + hh, x : x + ww]
                        for i, (x, y) in zip(idx, corners, strict=True)])  # (M, hh, ww, 3)
    origin = to_device(np.array(corners, np.float32), device)  # (M, 2) x, y
    affine = to_device(np.ascontiguousarray(crop_affines[idx], np.float32), device)  # (M, 2, 3)
    ys, xs = torch.meshgrid(torch.arange(hh, device=device, dtype=torch.float32),
                            torch.arange(ww, device=device, dtype=torch.float32), indexing="ij")
    # Homogeneous frame pixel centres of each window (M, hh, ww, 3) -> crop pixels (M, hh, ww, 2).
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)[None].repeat(len(idx), 1, 1, 1)
    points[..., :2] += origin[:, None, None, :]
    crop_xy = points @ affine.transpose(1, 2)[:, None]  # (M, hh, ww, 2)
    grid = (2 * crop_xy + 1) / r - 1  # grid_sample's [-1, 1] with align_corners=False
    background = to_device(windows, device).permute(0, 3, 1, 2).float()  # (M, 3, hh, ww)
    rows = to_device(np.array(idx, np.int64), device)  # (M,)
    return PastePlan(idx, rows, corners, grid, background)


def blend_faces(plan: PastePlan, faces: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """faces (N, 3, r, r) in [-1, 1] on the device, alpha (r, r) -> the pasted windows
    (M, hh, ww, 3) uint8 on the device (queued; nothing waits)."""
    m, r = len(plan.index), faces.shape[-1]
    # (The device index: a host list would be copied with a wait for the stream.)
    pixels = ((faces.index_select(0, plan.rows).float() / 2 + 0.5).clamp(0, 1)
              * 255)  # (M, 3, r, r)
    rgba = torch.cat([pixels, alpha.float().expand(m, 1, r, r)], dim=1)  # (M, 4, r, r)
    warped = F.grid_sample(rgba, plan.grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # (M, 4, hh, ww)
    a = warped[:, 3:]  # (M, 1, hh, ww)
    blended = a * warped[:, :3] + (1 - a) * plan.background
    return blended.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def write_windows(frames: Frames, plan: PastePlan, windows: npt.NDArray[np.uint8]) -> None:
    """Put `blend_faces`'s windows (M, hh, ww, 3), on the host, into their frames."""
    hh, ww = windows.shape[1:3]
    for k, (i, (x, y)) in enumerate(zip(plan.index, plan.corners, strict=True)):
        frames[i, y : y + hh, x : x + ww] = windows[k]


def to_device(array: npt.NDArray[np.generic], device: torch.device) -> torch.Tensor:
    """A host array on `device`. To CUDA through pinned memory without blocking: the copy
    is queued behind the device's work and the host goes on (the pinned buffer is held
    until the copy is done by torch's caching host allocator)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _face_box(affine: Affine, r: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """x0, y0, x1, y1 of the crop's footprint in the frame, clipped; None when outside."""
    inverse = cv2.invertAffineTransform(np.asarray(affine, np.float64))  # crop -> frame
    corners = np.array([[-0.5, -0.5], [r - 0.5, -0.5], [-0.5, r - 0.5], [r - 0.5, r - 0.5]])
    pts = corners @ inverse[:, :2].T + inverse[:, 2]
    x0 = max(int(math.floor(pts[:, 0].min())), 0)
    y0 = max(int(math.floor(pts[:, 1].min())), 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 1, width)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 1, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1, y1
