"""Real libx264 / JPEG encodes decoded by real decoders; the MP4 writer read back with PyAV."""

from __future__ import annotations

import math
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from agent.config import AgentConfig, VideoConfig
from media.audio import float_to_pcm16
from media.decode import VideoDecoder
from media.encode import (
    NAL_IDR,
    NAL_PPS,
    NAL_SLICE,
    NAL_SPS,
    EncodedFrame,
    H264Encoder,
    JpegEncoder,
    encode_loop,
    fit_size,
    h264_nal_types,
    h264_nal_units,
    make_encoder,
    resize_frame,
)
from media.mux import Mp4Writer
from media.types import Frame

pytestmark = pytest.mark.unit

W, H, FPS = 160, 128, 25
# Measured around 38-42 dB for these frames at crf 23 / JPEG q85; 32 dB
# leaves room for libx264 versions while still catching colour or plane mix-ups
# (those land below 20 dB).
MIN_PSNR_DB = 32.0


def make_frames(n: int, w: int = W, h: int = H, seed: int = 0) -> list[Frame]:
    """A smooth moving scene (gradient, a drifting blurred disc, mild texture)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 200 + 30, yy / h * 180 + 40, (xx + yy) / (w + h) * 150 + 60], -1)
    texture = cv2.GaussianBlur(rng.normal(0, 12, (h, w, 3)).astype(np.float32), (0, 0), 2.0)
    frames = []
    for i in range(n):
        img = base + texture
        cx, cy = w * (0.3 + 0.4 * i / max(n, 1)), h * (0.5 + 0.1 * np.sin(i / 3))
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < (h / 5) ** 2).astype(np.float32)
        disc = cv2.GaussianBlur(disc, (0, 0), 1.5)[..., None]
        img = img * (1 - disc) + np.array([220, 120, 90], np.float32) * disc
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def psnr(a: Frame, b: Frame) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def primary_pictures(au: bytes) -> int:
    """Slices that start a picture: VCL NAL units with first_mb_in_slice == 0.

    first_mb_in_slice is the first ue(v) of the slice header; value 0 is the
    single bit '1', i.e. the top bit of the byte after the NAL header.
    """
    return sum(
        1
        for nal in h264_nal_units(au)
        if nal[0] & 0x1F in (NAL_SLICE, NAL_IDR) and len(nal) > 1 and nal[1] & 0x80
    )


def encode_all(
    enc: H264Encoder, frames: list[Frame], force: frozenset[int] = frozenset()
) -> list[EncodedFrame]:
    return [enc.encode(f, force_keyframe=i in force) for i, f in enumerate(frames)]


@pytest.mark.parametrize("threads", [1, 2])
def test_h264_round_trip_one_picture_per_access_unit(threads: int) -> None:
    frames = make_frames(30)
    enc = H264Encoder(W, H, FPS, keyframe_interval=12, threads=threads)
    dec = VideoDecoder("h264")
    for i, frame in enumerate(frames):
        packet = enc.encode(frame)
        assert packet.data.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")), "not Annex-B"
        assert primary_pictures(packet.data) == 1, f"frame {i}: not exactly one access unit"
        pictures = dec.decode(packet.data)  # low delay: its own picture, at once
        assert len(pictures) == 1, f"frame {i}: decoder gave {len(pictures)} pictures"
        assert pictures[0].shape == (H, W, 3)
        assert psnr(pictures[0], frame) > MIN_PSNR_DB, f"frame {i}"
    enc.close()


def test_every_keyframe_carries_sps_pps_idr() -> None:
    packets = encode_all(H264Encoder(W, H, FPS, keyframe_interval=8), make_frames(25))
    assert any(not p.keyframe for p in packets)
    for i, p in enumerate(packets):
        types = h264_nal_types(p.data)
        assert not p.config
        if p.keyframe:
            assert NAL_SPS in types and NAL_PPS in types and NAL_IDR in types, (i, types)
            assert types.index(NAL_SPS) < types.index(NAL_PPS) < types.index(NAL_IDR), (i, types)
        else:
            assert NAL_IDR not in types and NAL_SPS not in types, (i, types)


def test_forced_and_interval_keyframes() -> None:
    n, interval = 40, 9
    forced = frozenset({5, 6, 20})
    packets = encode_all(H264Encoder(W, H, FPS, keyframe_interval=interval), make_frames(n), forced)
    keys = [i for i, p in enumerate(packets) if p.keyframe]
    # The rule: frame 0, every forced frame, and whenever `interval` frames
    # have passed since the last keyframe.
    expected, last = [], -interval
    for i in range(n):
        if i == 0 or i in forced or i - last >= interval:
            expected.append(i)
            last = i
    assert keys == expected
    assert forced <= set(keys)
    assert max(b - a for a, b in zip(keys, keys[1:], strict=False)) <= interval
    # Each keyframe starts a fresh decoder.
    for k in keys:
        assert len(VideoDecoder("h264").decode(packets[k].data)) == 1


def test_idle_loop_joinable_at_every_keyframe() -> None:
    source = make_frames(30, w=2 * W, h=2 * H)  # resized down by encode_loop
    loop = encode_loop(source, "h264", W, H, FPS, 10, AgentConfig().video)
    assert len(loop) == 30
    keys = [i for i, p in enumerate(loop) if p.keyframe]
    assert keys == [0, 10, 20]  # config's 2 s interval (50 frames) adds none
    expected = [resize_frame(f, W, H) for f in source]
    for k in keys:
        dec = VideoDecoder("h264")  # a session joining at k: fresh client decoder
        # from k to the end, then round the loop once more back to k
        order = list(range(k, len(loop))) + list(range(k))
        for i in order:
            pictures = dec.decode(loop[i].data)
            assert len(pictures) == 1
            assert psnr(pictures[0], expected[i]) > MIN_PSNR_DB, f"join {k}, frame {i}"


def test_jpeg_round_trip_baseline() -> None:
    frame = make_frames(1)[0]
    packet = JpegEncoder(W, H, 85).encode(frame)
    assert packet.keyframe and not packet.config
    assert packet.data[:2] == b"\xff\xd8"
    assert b"\xff\xc0" in packet.data and b"\xff\xc2" not in packet.data  # SOF0, no SOF2
    (picture,) = VideoDecoder("jpeg").decode(packet.data)
    assert psnr(picture, frame) > MIN_PSNR_DB
    with pytest.raises(ValueError, match="JPEG"):
        VideoDecoder("jpeg").decode(b"not a jpeg")


def test_make_encoder_uses_config() -> None:
    config = VideoConfig.model_validate({"keyframe_interval_s": 0.4, "jpeg_quality": 50})
    h264 = make_encoder("h264", W, H, 10, config)
    assert isinstance(h264, H264Encoder) and h264.keyframe_interval == 4
    packets = [h264.encode(f) for f in make_frames(9)]
    assert [i for i, p in enumerate(packets) if p.keyframe] == [0, 4, 8]
    jpeg = make_encoder("jpeg", W, H, 10, config)
    assert jpeg.codec == "jpeg" and jpeg.encode(make_frames(1)[0]).keyframe
    with pytest.raises(ValueError, match="codec"):
        make_encoder("vp8", W, H, 10, config)


def test_bad_sizes_and_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        H264Encoder(161, 128, FPS)
    with pytest.raises(ValueError, match="even"):
        H264Encoder(160, 127, FPS)
    enc = H264Encoder(W, H, FPS)
    with pytest.raises(ValueError, match="uint8 RGB"):
        enc.encode(np.zeros((H, W + 2, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        enc.encode(np.zeros((H, W, 3), np.float32))


@pytest.mark.parametrize(
    ("src_w", "src_h", "max_height"),
    [(512, 512, 256), (1280, 720, 512), (640, 480, 1000), (101, 75, 75), (720, 1280, 333)],
)
def test_fit_size_even_keeps_aspect_never_upscales(src_w: int, src_h: int, max_height: int) -> None:
    w, h = fit_size(src_w, src_h, max_height)
    assert w % 2 == 0 and h % 2 == 0
    assert h <= min(src_h, max_height) and h >= min(src_h, max_height) - 1
    assert abs(w - src_w * h / src_h) <= 1.0


def test_resize_frame() -> None:
    frame = make_frames(1, w=320, h=256)[0]
    small = resize_frame(frame, 160, 128)
    assert small.shape == (128, 160, 3) and small.dtype == np.uint8
    assert abs(float(small.mean()) - float(frame.mean())) < 1.0  # INTER_AREA averages
    assert resize_frame(frame, 320, 256) is frame


def test_mp4_written_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    rate, n = 16000, 50
    frames = make_frames(n)
    t = np.arange(n * rate // FPS) / rate
    pcm = float_to_pcm16((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    with Mp4Writer(path, FPS, W, H, rate) as mp4:
        per_frame = 2 * rate // FPS  # bytes of s16 mono per video frame
        for i, frame in enumerate(frames):
            mp4.write_video(frame, pts_us=i * 1_000_000 // FPS)
            mp4.write_audio(pcm[i * per_frame : (i + 1) * per_frame])
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.duration is not None
        assert abs(container.duration / 1e6 - n / FPS) < 0.05
        decoded = [
            np.asarray(f.to_ndarray(format="rgb24"), np.uint8) for f in container.decode(video=0)
        ]
    assert len(decoded) == n
    assert min(psnr(a, b) for a, b in zip(decoded, frames, strict=True)) > MIN_PSNR_DB
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert abs(samples - n * rate // FPS) <= 2048  # AAC pads to whole 1024-sample frames
