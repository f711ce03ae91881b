"""The LatentSync chunk pipeline on CPU with tiny models: loading, faces, paste-back, render."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch
from safetensors.torch import save_file

from agent.config import DefaultAvatarConfig, LatentSyncConfig
from agent.errors import ConfigError, RenderError
from media.avatar import FACE_POINTS, Avatar
from media.default_avatar import ensure_default_avatar
from media.face_align import TEMPLATE_256
from media.face_align import crop_affine as face_align_crop_affine
from media.latentsync.audio_features import required_samples
from media.latentsync.checkpoint import CheckpointMismatchError
from media.latentsync.face import (
    AvatarFaces,
    align_points,
    crop_affine,
    crop_masks,
    paste_faces,
    track_clip,
)
from media.latentsync.pipeline import EagerNoisePredictor, LatentSyncModels
from media.latentsync.renderer import LatentSyncRenderer, load_models
from media.latentsync.vae import LatentCodec, load_vae
from media.latentsync.whisper import WhisperCheckpointError
from media.types import ChunkKey, FrameSpec, RenderChunk, RenderResult, SourceRef
from tests.latentsyncutil import (
    CROP,
    STEPS,
    CountingCodec,
    counting_models,
    fixtures_dir,
    tiny_models,
    tiny_renderer,
    tiny_unet_config,
    tiny_vae,
    with_face,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_one_thread")]

FPS = 25
SPF = 16_000 // FPS
P = {name: i for i, name in enumerate(FACE_POINTS)}
STAGES = {"audio_features", "face", "inference", "decode", "paste"}


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=128, clip_seconds=(2.0, 3.0), seed=11)
    return ensure_default_avatar(tmp_path_factory.mktemp("avatars"), config, FPS)


def lookup(avatar: Avatar) -> dict[str, Avatar]:
    return {avatar.id: avatar}


@pytest.fixture(scope="module")
def renderer(avatar: Avatar) -> Iterator[LatentSyncRenderer]:
    made = tiny_renderer(lookup(avatar).__getitem__)
    yield made
    made.close()


def voice(seconds: float, seed: int = 0) -> npt.NDArray[np.float32]:
    """Loud harmonic audio with a syllable envelope."""
    t = np.arange(round(seconds * 16_000)) / 16_000
    tone = sum(np.sin(2 * math.pi * 150 * k * t + k) / k for k in range(1, 8))
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return np.asarray(0.3 * (tone + noise) * (np.sin(2 * math.pi * 3 * t) > -0.3), np.float32)


def chunk(avatar: Avatar, specs: Sequence[FrameSpec], audio: npt.NDArray[np.float32], *,
          first: int = 0, index: int = 0, end_of_turn: bool = False) -> RenderChunk:
    return RenderChunk(ChunkKey("s", "t", index), avatar.id, tuple(specs), first, audio, FPS,
                       end_of_turn=end_of_turn)


def specs(n: int, *, clip: int = 1, start: int = 0, speech: bool = True) -> list[FrameSpec]:
    return [FrameSpec(SourceRef(clip, start + f), speech=speech) for f in range(n)]


def sources(avatar: Avatar, frames: Sequence[FrameSpec]) -> npt.NDArray[np.uint8]:
    return np.stack([avatar.source.frame(s.source) for s in frames])


# --- alignment and crops ------------------------------------------------------------


def test_align_points_sit_on_the_brows_and_nose(avatar: Avatar) -> None:
    g = avatar.source.geometry(SourceRef(1, 0)).astype(np.float64)
    brow_l, brow_r, nose = align_points(g)
    eye_distance = float(np.linalg.norm(g[P["right_eye"]] - g[P["left_eye"]]))
    assert brow_l[1] < g[P["left_eye"], 1] and brow_r[1] < g[P["right_eye"], 1]
    assert np.linalg.norm(brow_l - g[P["left_eye"]]) == pytest.approx(0.3 * eye_distance)
    eyes_mid = (g[P["left_eye"]] + g[P["right_eye"]]) / 2
    assert eyes_mid[1] < nose[1] < g[P["nose_tip"], 1]
    # A rotated face gives the same points, rotated: the alignment follows the head.
    angle = math.radians(12.0)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = g.mean(axis=0)
    turned = (g - centre) @ rot.T + centre
    np.testing.assert_allclose(align_points(turned), (align_points(g) - centre) @ rot.T + centre,
                               atol=1e-9)


def test_crop_affine_agrees_with_the_reference_crops() -> None:
    box = np.array([[0.9, 0.1, -40.0], [-0.1, 0.9, -30.0]])
    for r in (256, 512):
        np.testing.assert_allclose(crop_affine(box, r), face_align_crop_affine(box, r), atol=1e-12)
    # Any size shows the region of the 256 px crop (scaled as the reference scales its
    # template, so within half a pixel of a rescale about pixel centres).
    points = np.random.default_rng(0).uniform(0, 300, (20, 2))
    at = {r: points @ crop_affine(box, r)[:, :2].T + crop_affine(box, r)[:, 2] for r in (64, 256)}
    assert np.abs(at[64] - ((at[256] + 0.5) / 4 - 0.5)).max() <= 0.5


def test_track_puts_the_brows_on_the_template(avatar: Avatar) -> None:
    track = track_clip(avatar, 0, 256)
    assert track.has_face.all() and track.crops is None and track.box_affines is not None
    # The first frame is not smoothed: its brows and nose land on the template exactly
    # (up to the least-squares fit of three points).
    points = align_points(avatar.source.geometry(SourceRef(0, 0)))
    box = track.box_affines[0]
    mapped = points @ box[:, :2].T + box[:, 2]
    assert np.abs(mapped - TEMPLATE_256).max() < 0.05 * 210


def test_prepared_affines_and_crops_are_used(avatar: Avatar) -> None:
    n = avatar.clips[1].num_frames
    affines = np.zeros((n, 2, 3), np.float32)
    affines[:, 0, 0] = affines[:, 1, 1] = 2.0
    affines[:, :, 2] = [-10.0, -20.0]
    affines[3] = 0.0  # the preparation tool writes zeros where it found no face
    crops = np.full((n, 256, 256, 3), 90, np.uint8)
    prepared = dataclasses.replace(avatar, extras={"affine256_1": affines, "crop256_1": crops})
    track = track_clip(prepared, 1, 256)
    np.testing.assert_array_equal(track.crop_affines[0], affines[0])
    assert track.has_face.sum() == n - 1 and not track.has_face[3]
    assert track.crop(prepared, SourceRef(1, 0), 256).mean() == 90
    bad = dataclasses.replace(avatar, extras={"affine256_1": affines, "crop256_1": crops[:, :64]})
    with pytest.raises(ValueError, match="crop256_1"):
        track_clip(bad, 1, 256)


def test_paste_matches_a_per_frame_opencv_paste(avatar: Avatar) -> None:
    masks = crop_masks(CROP, 8, torch.device("cpu"))
    affines = np.stack([track_clip(avatar, 1, CROP).crop_affines[f] for f in (0, 5, 9)])
    # A face box partly outside the frame still pastes its visible part.
    affines[2, :, 2] += [40.0, 25.0]
    # Smooth faces: OpenCV quantises sample positions to 1/32 px, visible on pixel noise.
    coarse = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    faces = torch.nn.functional.interpolate(coarse, size=(CROP, CROP), mode="bilinear")
    frames = np.stack([avatar.source.frame(SourceRef(1, f)) for f in (0, 5, 9)])
    pasted = frames.copy()
    paste_faces(pasted, faces, affines, np.ones(3, bool), masks.paste_alpha)
    h, w = frames.shape[1:3]
    for i in range(3):
        rgb = ((faces[i].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) * 255)
        rgba = np.dstack([rgb, masks.paste_alpha.numpy()]).astype(np.float32)
        inverse = cv2.invertAffineTransform(affines[i])
        warped = cv2.warpAffine(rgba, inverse, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        a = warped[..., 3:]
        expected = a * warped[..., :3] + (1 - a) * frames[i]
        error = np.abs(pasted[i].astype(np.float32) - expected)
        # OpenCV rounds sample positions to 1/32 px: a little off at the mask's hard edge.
        assert error.max() <= 4.0 and error.mean() <= 0.02
        untouched = a[..., 0] == 0
        np.testing.assert_array_equal(pasted[i][untouched], frames[i][untouched])
        assert (pasted[i] != frames[i]).any()
    # Frames without a face are left alone.
    again = frames.copy()
    paste_faces(again, faces, affines, np.zeros(3, bool), masks.paste_alpha)
    np.testing.assert_array_equal(again, frames)


def test_face_latents_are_encoded_once_and_seeded_per_frame(avatar: Avatar) -> None:
    base = tiny_models()
    codec = CountingCodec(base.codec)
    masks = crop_masks(CROP, codec.downsample, codec.device)
    faces = AvatarFaces(avatar, CROP, codec, masks, seed=3)
    refs = [SourceRef(1, f) for f in (4, 2, 4, 7)]
    with torch.inference_mode():
        first = faces.inputs(refs)
        assert codec.encoded == 2 * 3  # masked and reference, three distinct frames
        again = faces.inputs(refs[::-1])
        assert codec.encoded == 6
        # Another cache that meets the frames in another order encodes the same latents.
        other = AvatarFaces(avatar, CROP, codec, masks, seed=3).inputs([refs[3], refs[0]])
    assert first.masked.shape == (4, 4, CROP // 8, CROP // 8)
    torch.testing.assert_close(again.masked, first.masked.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(other.reference[1], first.reference[0], rtol=0, atol=0)
    torch.testing.assert_close(other.masked[0], first.masked[3], rtol=0, atol=0)
    assert not torch.equal(first.masked[0], first.reference[0])  # the mouth is masked out


def every_frame(avatar: Avatar) -> list[SourceRef]:
    return [SourceRef(c, f) for c, clip in enumerate(avatar.clips) for f in range(clip.num_frames)]


def test_prepare_encodes_every_frame_once_as_the_lazy_path_would(avatar: Avatar) -> None:
    codec = CountingCodec(tiny_models().codec)
    masks = crop_masks(CROP, codec.downsample, codec.device)
    everything = every_frame(avatar)
    total, faced = len(everything), with_face(avatar)
    prepared, sliced, lazy = (AvatarFaces(avatar, CROP, codec, masks, seed=3) for _ in range(3))
    with torch.inference_mode():
        report = prepared.prepare()
        assert (report.avatar, report.frames, report.remaining) == (avatar.id, total, 0)
        assert report.seconds > 0 and codec.encoded == 2 * faced
        again = prepared.prepare()  # idempotent
        assert (again.frames, again.remaining, codec.encoded) == (0, 0, 2 * faced)
        # Slices resume where the last stopped and skip frames a render met first.
        sliced.inputs(everything[40:50])
        steps = [sliced.prepare(max_frames=7)]
        while steps[-1].remaining:
            steps.append(sliced.prepare(max_frames=7))
        assert [s.frames for s in steps] == [7] * (len(steps) - 1) + [steps[-1].frames]
        assert sum(s.frames for s in steps) == total - 10
        assert [s.remaining for s in steps] == [total - 10 - 7 * (i + 1) for i in
                                                range(len(steps) - 1)] + [0]
        assert codec.encoded == 4 * faced
        # The latents are the ones renders meeting the frames in another order encode.
        backwards = everything[::-1]
        for start in range(0, total, 16):
            refs = backwards[start : start + 16]
            want = lazy.inputs(refs)
            for faces in (prepared, sliced):
                got = faces.inputs(refs)
                assert torch.equal(got.masked, want.masked)
                assert torch.equal(got.reference, want.reference)
                np.testing.assert_array_equal(got.crop_affines, want.crop_affines)
                np.testing.assert_array_equal(got.has_face, want.has_face)
    assert codec.encoded == 6 * faced  # only the lazy cache encoded anything
    assert prepared.encoded_frames == sliced.encoded_frames == lazy.encoded_frames == total


# --- loading --------------------------------------------------------------------------


def write_tiny_checkpoints(root: Path) -> Path:
    """checkpoints/ as users lay it out, with tiny models in the released formats."""
    root.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir()
    state = {k: v.clone() for k, v in tiny_models().unet.state_dict().items()}
    torch.save({"global_step": 1, "state_dict": state}, root / "latentsync_unet.pt")
    (root / "whisper").mkdir(exist_ok=True)
    shutil.copy(fixtures / "tiny_whisper_tiny_encoder.pt", root / "whisper" / "tiny.pt")
    tiny_vae().save_pretrained(root / "sd-vae-ft-mse")
    return root


def test_missing_checkpoints_name_every_file(tmp_path: Path, avatar: Avatar) -> None:
    config = LatentSyncConfig(checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        LatentSyncRenderer(lookup(avatar).__getitem__, config, device="cpu")
    message = str(info.value)
    for name in ("latentsync_unet.pt", str(Path("whisper") / "tiny.pt"), "sd-vae-ft-mse",
                 "LatentSync-1.5"):
        assert name in message


def test_checkpoint_dir_loads_strictly_and_names_bad_files(tmp_path: Path) -> None:
    root = write_tiny_checkpoints(tmp_path / "checkpoints")
    cpu, f32 = torch.device("cpu"), torch.float32
    models = load_models(root, CROP, device=cpu, dtype=f32, unet_config=tiny_unet_config(),
                         vae_shape=None)
    loaded = models.unet.state_dict()
    for name, tensor in tiny_models().unet.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    # The released architecture refuses the tiny files, naming them and what was expected.
    with pytest.raises(ConfigError, match=r"sd-vae-ft-mse.*\[128, 256, 512, 512\]"):
        load_models(root, 256, device=cpu, dtype=f32)
    with pytest.raises(CheckpointMismatchError, match="latentsync_unet.pt"):
        load_models(root, 256, device=cpu, dtype=f32, vae_shape=None)
    (root / "whisper" / "tiny.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WhisperCheckpointError, match=r"whisper.tiny\.pt"):
        load_models(root, CROP, device=cpu, dtype=f32, unet_config=tiny_unet_config(),
                    vae_shape=None)


def test_vae_loads_from_a_folder_or_one_file_and_rejects_others(tmp_path: Path) -> None:
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "folder")
    single = tmp_path / "single"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              single / "sd-vae-ft-mse.safetensors")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = vae.decode(z).sample
        loaded = load_vae(tmp_path / "folder", expect=None)
        torch.testing.assert_close(loaded.decode(z).sample, expected, rtol=0, atol=0)
    # A lone weights file is read with the packaged sd-vae-ft-mse config: the tiny
    # weights do not fit it, and the error says so.
    with pytest.raises(ConfigError, match=r"sd-vae-ft-mse\.safetensors: VAE weights do not match"):
        load_vae(single, expect=None)
    (single / "sd-vae-ft-mse.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read VAE weights"):
        load_vae(single, expect=None)
    with pytest.raises(ConfigError, match="not found"):
        load_vae(tmp_path / "nowhere")


def test_compiled_decoder_decodes_what_the_eager_one_does() -> None:
    codec = LatentCodec(tiny_vae())
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = codec.decode(z)
        # Dynamo's own backend ("eager") on the CPU: the wrapper, the symbolic frame count
        # and the channels-last weights (Inductor and the graphs: the GPU renderer tests).
        codec.compile_decoder(backend="eager")
        assert codec.compiled
        assert codec.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        for frames in (3, 1, 2):  # 1 compiles apart (Dynamo specialises it), 2 reuses 3's
            torch.testing.assert_close(codec.decode(z[:frames]), expected[:frames],
                                       rtol=1e-4, atol=1e-5)
        codec.capture_decode([(1, 4, 8, 8)])  # no CUDA graphs on the CPU
        assert codec.captured == []
        codec.use_compiled = False
        torch.testing.assert_close(codec.decode(z), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_decode_replays_the_compiled_decoder_on_cuda() -> None:
    codec = LatentCodec(tiny_vae().to("cuda"))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.inference_mode():
        eager = codec.decode(z)
        codec.compile_decoder(backend="eager")  # (Inductor: the compiled renderer's GPU test)
        expected = codec.decode(z)  # channels-last, not yet replayed
        codec.capture_decode([(1, 4, 8, 8), (3, 4, 8, 8)])
        assert codec.captured == [(1, 4, 8, 8), (3, 4, 8, 8)]
        first = codec.decode(z)
        second = codec.decode(z.flip(0))  # a later replay leaves the earlier result alone
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, expected.flip(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(codec.decode(z[:1]), expected[:1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(codec.decode(z[:2]), expected[:2], rtol=1e-5, atol=1e-5)
        # Against the contiguous eager decoder: other cuDNN kernels, TF32 convolutions.
        torch.testing.assert_close(first, eager, rtol=0, atol=5e-3)


# --- rendering ------------------------------------------------------------------------


def test_capabilities(renderer: LatentSyncRenderer) -> None:
    caps = renderer.capabilities
    assert (caps.name, caps.chunk_frames, caps.max_batch, caps.audio_lookahead_ms, caps.device
            ) == ("latentsync", 16, 4, 120, "cpu")


def test_batch_shapes_order_stages_and_partial_chunk(
    renderer: LatentSyncRenderer, avatar: Avatar
) -> None:
    audio = voice(1.6)
    first, second = specs(16), specs(5, start=16)
    batch = [chunk(avatar, first, audio), chunk(avatar, second, audio, first=16, index=1)]
    results = renderer.render(batch)
    assert [r.key for r in results] == [c.key for c in batch]
    assert [r.frames.shape for r in results] == [(16, 128, 128, 3), (5, 128, 128, 3)]
    for result, frames in zip(results, (first, second), strict=True):
        assert set(result.stages) == STAGES and all(v >= 0 for v in result.stages.values())
        assert result.frames.dtype == np.uint8
        changed = (result.frames != sources(avatar, frames)).any(axis=-1)  # (F, H, W)
        for f, spec in enumerate(frames):
            g = avatar.source.geometry(spec.source)
            # The mouth is regenerated; the eyes and the image's top never change.
            mouth = changed[f, int(g[P["upper_lip"], 1]) - 1 : int(g[P["chin"], 1]),
                            int(g[P["mouth_left"], 0]) : int(g[P["mouth_right"], 0])]
            assert mouth.mean() > 0.5
            assert not changed[f, : int(min(g[P["left_eye"], 1], g[P["right_eye"], 1]))].any()
    # A chunk renders the same alone as in a batch (up to float summation order).
    alone = renderer.render([batch[1]])[0]
    assert np.abs(alone.frames.astype(int) - results[1].frames).max() <= 2


def test_short_end_of_turn_chunk(renderer: LatentSyncRenderer, avatar: Avatar) -> None:
    # The last chunk of an ended turn may hold less audio than one encoder step.
    tail = chunk(avatar, specs(3, start=40), voice(1.6)[: 40 * SPF + 100], first=40,
                 end_of_turn=True)
    assert renderer.render([tail])[0].frames.shape == (3, 128, 128, 3)


def test_blends_mix_both_sources(renderer: LatentSyncRenderer, avatar: Avatar) -> None:
    audio = voice(1.0)
    a, b = SourceRef(1, 3), SourceRef(2, 40)

    def render(spec: FrameSpec) -> RenderResult:
        # Blends happen around speech (turn start and end): silent frames, fast here.
        return renderer.render([chunk(avatar, [spec] * 8, audio)])[0]

    plain_a = render(FrameSpec(a)).frames
    plain_b = render(FrameSpec(b)).frames
    np.testing.assert_array_equal(render(FrameSpec(a, b, 0.0)).frames, plain_a)
    np.testing.assert_array_equal(render(FrameSpec(a, b, 1.0)).frames, plain_b)
    half = render(FrameSpec(a, b, 0.5)).frames
    assert not np.array_equal(half, plain_a) and not np.array_equal(half, plain_b)
    # Away from the face the picture is the pixel blend of both sources.
    expected = cv2.addWeighted(avatar.source.frame(a), 0.5, avatar.source.frame(b), 0.5, 0.0)
    np.testing.assert_array_equal(half[0, 100:], expected[100:])


class RecordingPredictor(EagerNoisePredictor):
    """The eager UNet, recording what each denoise step receives."""

    def __init__(self, models: LatentSyncModels) -> None:
        super().__init__(models.unet)
        self.calls: list[tuple[tuple[int, ...], int, torch.Tensor]] = []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor
                 ) -> torch.Tensor:
        self.calls.append((tuple(sample.shape), int(timestep), audio.clone()))
        return super().__call__(sample, timestep, audio)


def test_non_speech_frames_are_conditioned_on_silence(avatar: Avatar) -> None:
    recorder = RecordingPredictor(tiny_models())
    made = tiny_renderer(lookup(avatar).__getitem__, noise_predictor=recorder)
    try:
        quiet = made.render([chunk(avatar, specs(16, speech=False), voice(1.0))])[0]
        (shape, t0, audio), (_, t1, _) = recorder.calls
        assert shape == (2, 13, 16, CROP // 8, CROP // 8)  # one chunk, guidance doubles it
        assert (t0, t1) == (501, 1) and len(recorder.calls) == STEPS
        assert audio.shape == (2 * 16, 50, 384)
        assert not audio[:16].any()  # unconditional half: zeros
        assert audio[16:].abs().mean() > 0.1  # conditional half: silence's features, not zeros
        # The same as speech frames over silent audio.
        zeros = np.zeros(required_samples(16, FPS), np.float32)
        silent_speech = made.render([chunk(avatar, specs(16), zeros)])[0]
        np.testing.assert_array_equal(quiet.frames, silent_speech.frames)
        torch.testing.assert_close(recorder.calls[-1][2], audio, rtol=0, atol=0)
        loud = made.render([chunk(avatar, specs(16), voice(1.0))])[0]
        assert not np.array_equal(loud.frames, quiet.frames)
    finally:
        made.close()


def test_batched_guidance_takes_every_chunk_in_one_call(avatar: Avatar) -> None:
    recorder = RecordingPredictor(tiny_models())
    made = tiny_renderer(lookup(avatar).__getitem__, noise_predictor=recorder)
    try:
        batch = [chunk(avatar, specs(16), voice(1.5), index=0),
                 chunk(avatar, specs(9, start=16), voice(1.5), first=16, index=1)]
        made.render(batch)
        assert [c[0] for c in recorder.calls] == [(4, 13, 16, 8, 8)] * STEPS
        audio = recorder.calls[0][2]
        assert audio.shape == (4 * 16, 50, 384) and not audio[: 2 * 16].any()
        # Chunk 1's padding repeats its last frame's audio.
        padded = audio[3 * 16 : 4 * 16]
        assert torch.equal(padded[9:], padded[8:9].expand(7, -1, -1))
    finally:
        made.close()


def test_invalid_chunks_are_render_errors(renderer: LatentSyncRenderer, avatar: Avatar) -> None:
    audio = voice(1.0)
    bad = [
        RenderChunk(ChunkKey("s", "t", 0), "nobody", tuple(specs(4)), 0, audio, FPS),
        RenderChunk(ChunkKey("s", "t", 0), avatar.id, tuple(specs(4)), 0, audio, 30),
        chunk(avatar, specs(17), voice(2.0)),
        chunk(avatar, [FrameSpec(SourceRef(1, 10_000))], audio),
        # Before the turn ends the audio must reach the chunk's look-ahead.
        chunk(avatar, specs(16), audio[: 16 * SPF]),
    ]
    for c in bad:
        with pytest.raises(RenderError) as info:
            renderer.render([c])
        assert not info.value.retryable
    with pytest.raises(RenderError, match="max_batch"):
        renderer.render([chunk(avatar, specs(4), audio)] * 5)


def test_a_prepared_avatar_renders_the_same_without_encoding(
    renderer: LatentSyncRenderer, avatar: Avatar
) -> None:
    models = counting_models()
    codec = models.codec
    assert isinstance(codec, CountingCodec)
    made = tiny_renderer(lookup(avatar).__getitem__, models=models)
    total, faced = len(every_frame(avatar)), with_face(avatar)
    try:
        first = made.prepare_avatar(avatar.id, max_frames=100)
        assert (first.avatar, first.frames, first.remaining) == (avatar.id, 100, total - 100)
        rest = made.prepare_avatar(avatar.id)
        assert (rest.frames, rest.remaining) == (total - 100, 0)
        assert codec.encoded == 2 * faced
        assert made.prepare_avatar(avatar.id).frames == 0
        a, b = SourceRef(1, 3), SourceRef(2, 40)
        frames = [FrameSpec(a, b, w, speech=True) for w in np.linspace(0, 1, 6)]
        c = chunk(avatar, [*specs(10, start=20), *frames], voice(1.0))
        got = made.render([c])[0]
        assert codec.encoded == 2 * faced  # the chunk's faces were all resident
        # The same pictures as a renderer that encodes the faces as chunks meet them.
        np.testing.assert_array_equal(got.frames, renderer.render([c])[0].frames)
        with pytest.raises(RenderError, match="unknown avatar"):
            made.prepare_avatar("nobody")
    finally:
        made.close()
    with pytest.raises(RenderError, match="closed"):
        made.prepare_avatar(avatar.id)


def test_warmup_and_close(avatar: Avatar) -> None:
    made = tiny_renderer(lookup(avatar).__getitem__)
    made.warmup()
    made.close()
    made.close()
    with pytest.raises(RenderError, match="closed"):
        made.render([chunk(avatar, specs(4), voice(1.0))])
