"""Our LatentSync UNet against the reference: golden outputs, key layout, loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.errors import ConfigError
from media.latentsync.checkpoint import (
    CheckpointMismatchError,
    check_manifest,
    load_unet,
    read_manifest,
)
from media.latentsync.config import UNetConfig
from media.latentsync.layers import Attention
from media.latentsync.unet import DeepCacheState, UNet3DConditionModel
from media.latentsync.verify import FAITHFUL_RELATIVE_ERROR, relative_error, verify_unet

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_one_thread")]


@pytest.fixture(scope="module")
def fixtures(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="module")
def tiny_config(fixtures: Path) -> UNetConfig:
    return UNetConfig.from_json(fixtures / "tiny_unet_config.json")


@pytest.fixture(scope="module")
def tiny_unet(fixtures: Path, tiny_config: UNetConfig) -> UNet3DConditionModel:
    return load_unet(tiny_config, fixtures / "tiny_unet_weights.safetensors")


@pytest.fixture(scope="module")
def golden(fixtures: Path) -> dict[str, torch.Tensor]:
    return load_file(fixtures / "tiny_unet_io.safetensors")


@pytest.fixture(scope="module")
def baseline(tiny_unet: UNet3DConditionModel, golden: dict[str, torch.Tensor]) -> torch.Tensor:
    return run(tiny_unet, golden)


def run(
    model: UNet3DConditionModel, io: dict[str, torch.Tensor], **over: torch.Tensor
) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(
            over.get("sample", io["sample"]),
            over.get("timestep", io["timestep"]),
            over.get("audio", io["audio"]),
        )
    return out


def test_tiny_unet_reproduces_reference(fixtures: Path) -> None:
    error = verify_unet(
        fixtures / "tiny_unet_config.json",
        fixtures / "tiny_unet_weights.safetensors",
        fixtures / "tiny_unet_io.safetensors",
    )
    assert error < FAITHFUL_RELATIVE_ERROR


def test_audio_conditioning_is_used(
    tiny_unet: UNet3DConditionModel, golden: dict[str, torch.Tensor]
) -> None:
    silent = run(tiny_unet, golden, audio=torch.zeros_like(golden["audio"]))
    # The reference moves by about 1.7% without audio.
    assert relative_error(silent, golden["expected"]) > 5e-3


def test_audio_is_batch_major(
    tiny_unet: UNet3DConditionModel, golden: dict[str, torch.Tensor], baseline: torch.Tensor
) -> None:
    # Rows F..2F-1 belong to the second video: changing them leaves the first one
    # exactly as it was (nothing mixes batch items) and changes the second.
    frames = golden["sample"].shape[2]
    audio = golden["audio"].clone()
    audio[frames:] = 0.0
    out = run(tiny_unet, golden, audio=audio)
    assert torch.equal(out[0], baseline[0])
    assert relative_error(out[1], baseline[1]) > 5e-3


def test_timestep_as_number_or_batch(
    tiny_unet: UNet3DConditionModel, golden: dict[str, torch.Tensor], baseline: torch.Tensor
) -> None:
    step = int(golden["timestep"].item())
    batch = golden["sample"].shape[0]
    with torch.inference_mode():
        as_int = tiny_unet(golden["sample"], step, golden["audio"])
    per_item = run(tiny_unet, golden, timestep=torch.full((batch,), step))
    assert torch.allclose(as_int, baseline) and torch.allclose(per_item, baseline)


@pytest.mark.parametrize(
    "kernels",
    [
        {"channels_last": True, "temporal_attention": "sdpa"},
        {"channels_last": False, "temporal_attention": "math"},
        {"channels_last": True, "temporal_attention": "math"},
        {"channels_last": False, "temporal_attention": "inline"},
        {"channels_last": True, "temporal_attention": "math", "pointwise_linear": True,
         "packed_qkv": True, "padded_convs": True, "fused_geglu": True},
        {"channels_last": False, "temporal_attention": "sdpa", "pointwise_linear": True,
         "packed_qkv": True, "padded_convs": True, "fused_geglu": True},
        {"channels_last": True, "temporal_attention": "math", "packed_qkv": True,
         "timestep_table": True},
    ],
)
def test_kernel_choices_reproduce_the_reference(
    fixtures: Path, tiny_config: UNetConfig, golden: dict[str, torch.Tensor], kernels: dict
) -> None:
    """Channels-last activations and the frames' attention as matmuls (what compiled
    forwards use on CUDA) compute the released model: the golden output, and channels-last
    stays channels-last through every layer (no copy back to the default layout)."""
    model = load_unet(tiny_config, fixtures / "tiny_unet_weights.safetensors")
    model.set_kernels(**kernels)
    assert model.kernels() == {"pointwise_linear": False, "packed_qkv": False,
                               "padded_convs": False, "fused_geglu": False,
                               "timestep_table": False, **kernels}
    layouts = []
    if kernels["channels_last"]:
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            # (At 1x1 pixels a layout is a matter of convention: not counted.)
            if isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[-2:] != (1, 1):
                layouts.append(x.is_contiguous(memory_format=torch.channels_last_3d))

        for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
            for module in block.modules():
                module.register_forward_pre_hook(record)
    out = run(model, golden)
    assert relative_error(out, golden["expected"]) < FAITHFUL_RELATIVE_ERROR
    assert all(layouts) and (len(layouts) > 50) == kernels["channels_last"]
    model.set_kernels(channels_last=False, temporal_attention="sdpa", pointwise_linear=False,
                      packed_qkv=False, padded_convs=False, fused_geglu=False,
                      timestep_table=False)
    assert relative_error(run(model, golden), golden["expected"]) < FAITHFUL_RELATIVE_ERROR
    with pytest.raises(ValueError, match="temporal_attention must be one of"):
        model.set_kernels(temporal_attention="flash")


def test_timestep_table_gathers_what_the_time_embedding_computes(
    fixtures: Path, tiny_config: UNetConfig, golden: dict[str, torch.Tensor]
) -> None:
    """Each table row holds every resnet's time projection of that timestep: the plain
    forward's output at the sampler's timesteps (as a number, a CPU tensor, a per-item
    tensor), and a timestep the table lacks is refused rather than rounded."""
    model = load_unet(tiny_config, fixtures / "tiny_unet_weights.safetensors")
    version = model.weights_version
    batch = golden["sample"].shape[0]
    with torch.inference_mode():
        plain = [model(golden["sample"], t, golden["audio"]) for t in (981, 1)]
        model.set_kernels(timestep_table=True)
        assert model.weights_version == version + 1  # a new tensor: graphs capture again
        assert model.time_table is not None and model.time_table.shape[0] == 1000
        for t, expected in zip((981, 1), plain, strict=True):
            for given in (t, torch.tensor(t), torch.full((batch,), t)):
                out = model(golden["sample"], given, golden["audio"])
                assert relative_error(out, expected) < 1e-5  # GEMM order only (3e-6)
        for bad in (0.5, 1000, -1):
            with pytest.raises(ValueError, match="not in the timestep table"):
                model(golden["sample"], bad, golden["audio"])
        model.set_kernels(timestep_table=False)
        assert model.time_table is None and model.weights_version == version + 2
        assert torch.equal(model(golden["sample"], 981, golden["audio"]), plain[0])


def test_runs_in_bfloat16(
    fixtures: Path, tiny_config: UNetConfig, golden: dict[str, torch.Tensor]
) -> None:
    # The float32 timestep sinusoid must be cast to the weights' dtype.
    model = load_unet(tiny_config, fixtures / "tiny_unet_weights.safetensors", dtype=torch.bfloat16)
    out = run(model, golden, sample=golden["sample"].bfloat16(), audio=golden["audio"].bfloat16())
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), golden["expected"]) < 0.05


def test_full_size_model_has_the_released_layout(shared_dir: Path) -> None:
    manifest = shared_dir / "manifests" / "latentsync_unet_stage2.json"
    config, tensors = read_manifest(manifest)
    with torch.device("meta"):
        model = UNet3DConditionModel(config)
    state = model.state_dict()
    check_manifest(state, manifest)  # raises on any name or shape difference
    assert len(state) == len(tensors) == 1246
    assert sum(t.numel() for t in state.values()) == 1_267_944_644
    assert any(name.endswith("pos_encoder.pe") for name in state)


def test_mismatched_weights_give_a_clear_error(
    fixtures: Path, tiny_config: UNetConfig, tmp_path: Path
) -> None:
    state = load_file(fixtures / "tiny_unet_weights.safetensors")
    del state["conv_in.bias"]
    state["conv_in.extra"] = torch.zeros(1)
    state["conv_out.weight"] = torch.zeros(5, 32, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_unet(tiny_config, path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing (conv_in.bias)" in message
    assert "1 unexpected (conv_in.extra)" in message
    assert "conv_out.weight: [5, 32, 3, 3] vs expected [4, 32, 3, 3]" in message


def test_loads_latentsync_pt_format(
    fixtures: Path, tiny_config: UNetConfig, golden: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    state = load_file(fixtures / "tiny_unet_weights.safetensors")
    good, bad = tmp_path / "latentsync_unet.pt", tmp_path / "flat.pt"
    torch.save({"global_step": 7, "state_dict": state}, good)
    torch.save(state, bad)
    model = load_unet(tiny_config, good)
    assert relative_error(run(model, golden), golden["expected"]) < FAITHFUL_RELATIVE_ERROR
    with pytest.raises(ConfigError, match="expected a dict with 'state_dict'"):
        load_unet(tiny_config, bad)


def test_config_rejects_unknown_and_unsupported_values(fixtures: Path) -> None:
    config = UNetConfig.from_json(fixtures / "tiny_unet_config.json")
    assert config.block_out_channels == (32, 64, 64, 64)
    with pytest.raises(ConfigError, match="unknown UNet config keys: \\['typo'\\]"):
        UNetConfig.from_dict({"typo": 1})
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        UNetConfig.from_dict({"resnet_time_scale_shift": "scale_shift"})


@pytest.mark.parametrize(
    "kernels",
    [
        {"channels_last": False, "temporal_attention": "sdpa"},
        {"channels_last": True, "temporal_attention": "math"},
        {"channels_last": True, "temporal_attention": "math", "pointwise_linear": True,
         "packed_qkv": True, "padded_convs": True, "timestep_table": True},
    ],
)
def test_guided_forward_computes_the_pair_of_the_plain_one(
    fixtures: Path, tiny_config: UNetConfig, golden: dict[str, torch.Tensor], kernels: dict
) -> None:
    """A classifier-free-guidance pair (the same latents twice, all-zero audio for the
    first half) through the guided forward, which runs the shared part once and the
    silent half's cross-attentions as their bias: the plain forward's result, and the
    conditional half is the golden output. Also under DeepCache's shallow step."""
    model = load_unet(tiny_config, fixtures / "tiny_unet_weights.safetensors")
    model.set_kernels(**kernels)
    sample = torch.cat([golden["sample"], golden["sample"]])
    audio = torch.cat([torch.zeros_like(golden["audio"]), golden["audio"]])
    t = golden["timestep"]
    layouts: list[bool] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[-2:] != (1, 1):
            layouts.append(x.is_contiguous(memory_format=torch.channels_last_3d))

    with torch.inference_mode():
        plain = model(sample, t, audio)
        handles = [m.register_forward_pre_hook(record) for m in model.up_blocks.modules()]
        guided = model(sample, t, audio, guided=True)
        for handle in handles:
            handle.remove()
        # DeepCache: a refresh then a shallow step, each way.
        caches = [DeepCacheState(), DeepCacheState()]
        for cache, flag in zip(caches, (False, True), strict=True):
            model(sample, t, audio, cache=cache, guided=flag)
            cache.refresh = False
        shallow = [model(sample, t, audio, cache=c, guided=f)
                   for c, f in zip(caches, (False, True), strict=True)]
    assert guided.shape == plain.shape
    assert relative_error(guided, plain) < 1e-5
    half = golden["sample"].shape[0]
    assert relative_error(guided[half:], golden["expected"]) < FAITHFUL_RELATIVE_ERROR
    assert relative_error(shallow[1], shallow[0]) < 1e-5
    assert relative_error(guided[:half], guided[half:]) > 5e-3  # the halves do differ
    assert all(layouts) == kernels["channels_last"] and len(layouts) > 20


def test_guided_forward_needs_a_pair(
    tiny_unet: UNet3DConditionModel, golden: dict[str, torch.Tensor]
) -> None:
    one = golden["sample"][:1]
    frames = one.shape[2]
    with torch.inference_mode(), pytest.raises(ValueError, match="guided needs an even batch"):
        tiny_unet(one, golden["timestep"], golden["audio"][:frames], guided=True)


def test_execution_choices_follow_weights_loaded_later(
    fixtures: Path, tiny_config: UNetConfig, golden: dict[str, torch.Tensor]
) -> None:
    """packed_qkv packs only self-attentions and reads the projections' own parameters on
    every call, so weights loaded afterwards (here: after the choices were set) are the
    ones used; padded_convs' copies follow once set again, and each padding (or its
    removal) counts as a weight move for captured graphs."""
    model = UNet3DConditionModel(tiny_config).eval()
    version = model.weights_version
    model.set_kernels(packed_qkv=True, padded_convs=True)
    assert model.weights_version == version + 1
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert {m.self_attention for m in attentions} == {True, False}
    assert all(m.packed for m in attentions)
    model.load_state_dict(load_unet(tiny_config, fixtures / "tiny_unet_weights.safetensors")
                          .state_dict())
    model.set_kernels(padded_convs=True)  # padded again from the loaded weights
    assert model.weights_version == version + 2
    assert model.conv_in_padded is not None and model.conv_in_padded.shape[1] % 16 == 0
    assert model.conv_out_padded is not None and model.conv_out_padded.shape[0] % 16 == 0
    assert relative_error(run(model, golden), golden["expected"]) < FAITHFUL_RELATIVE_ERROR
    model.set_kernels(padded_convs=False)
    assert model.weights_version == version + 3 and model.conv_in_padded is None
