"""Whisper's audio encoder in OpenAI's `tiny.pt` layout, returning every hidden state.

LatentSync conditions its UNet on Whisper-tiny encoder states: the conv stem
output plus the positional embedding, then the output of each block, all
before the final layer norm (5 states of width 384 for tiny). The modules
below keep OpenAI's parameter names (`encoder.conv1`, `encoder.blocks.N.attn.query`,
`...mlp.0`, `...mlp_ln`), so the released checkpoint loads with strict key
matching and no renaming. Only the encoder is built; decoder keys in the file
are ignored.

Numerics follow the reference: layer norms and the attention softmax run in
float32 whatever the module dtype, so float16 on CUDA stays close to float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agent.errors import ConfigError

ENCODER_PREFIX = "encoder."


class WhisperCheckpointError(ConfigError):
    """The Whisper checkpoint file is missing or does not hold the expected encoder."""


@dataclass(frozen=True, slots=True)
class WhisperEncoderConfig:
    """Encoder sizes; the defaults are Whisper tiny's (`dims` in `tiny.pt`)."""

    n_mels: int = 80
    n_ctx: int = 1500  # encoder steps per 30 s window: 50 Hz
    width: int = 384
    heads: int = 6
    layers: int = 4

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def n_states(self) -> int:
        """Hidden states returned per step: the embedding plus one per block."""
        return self.layers + 1

    @classmethod
    def from_dims(cls, dims: Mapping[str, object]) -> WhisperEncoderConfig:
        """Read the `n_audio_*` entries of a `tiny.pt` `dims` dict."""
        names = {
            "n_mels": "n_mels",
            "n_ctx": "n_audio_ctx",
            "width": "n_audio_state",
            "heads": "n_audio_head",
            "layers": "n_audio_layer",
        }
        values: dict[str, int] = {}
        for field, key in names.items():
            value = dims.get(key)
            if not isinstance(value, int):
                raise ValueError(f"dims[{key!r}] must be an int, got {value!r}")
            values[field] = value
        return cls(**values)


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """(length, channels) Whisper's positional embedding, in float32.

    The encoder takes its embedding from the checkpoint, as OpenAI's loader
    does; released files hold these values rounded to float16.
    """
    if channels % 2:
        raise ValueError(f"channels must be even, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))  # (C/2,)
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # (L, C/2)
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)  # (L, C)


class _LayerNorm(nn.LayerNorm):
    """Layer norm computed in float32 (as Whisper does), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)  # Whisper's key has no bias
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self.query(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        v = self.value(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        # Whisper scales q and k by D**-0.25 each: the same as SDPA's default 1/sqrt(D).
        # SDPA accumulates the softmax in float32 for half inputs.
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)
        return out


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = _SelfAttention(width, heads)
        self.attn_ln = _LayerNorm(width)
        # Sequential indices 0 and 2 are the checkpoint's `mlp.0` and `mlp.2`.
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.mlp_ln = _LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))  # (B, T, C)
        y: torch.Tensor = x + self.mlp(self.mlp_ln(x))  # (B, T, C)
        return y


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder; `forward` returns all hidden states, not the final output."""

    positional_embedding: torch.Tensor  # (n_ctx, width) buffer

    def __init__(self, config: WhisperEncoderConfig = WhisperEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv1 = nn.Conv1d(c.n_mels, c.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.width, c.width, kernel_size=3, stride=2, padding=1)
        # Sinusoids in the released model; a persistent buffer, so it comes from the file.
        self.register_buffer("positional_embedding", torch.zeros(c.n_ctx, c.width))
        self.blocks = nn.ModuleList([_Block(c.width, c.heads) for _ in range(c.layers)])
        # In the checkpoint and kept for strict loading; LatentSync uses pre-norm states.
        self.ln_post = _LayerNorm(c.width)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, 2 * n_ctx) log-mel -> (B, n_ctx, n_states, width) hidden states."""
        c = self.config
        if mel.ndim != 3 or mel.shape[1:] != (c.n_mels, 2 * c.n_ctx):
            raise ValueError(
                f"mel must be (B, {c.n_mels}, {2 * c.n_ctx}) (one 30 s window), "
                f"got {tuple(mel.shape)}"
            )
        x = F.gelu(self.conv1(mel))  # (B, C, 2T)
        x = F.gelu(self.conv2(x))  # (B, C, T)
        x = x.transpose(1, 2) + self.positional_embedding.to(x.dtype)  # (B, T, C)
        states = [x]
        for block in self.blocks:
            x = block(x)  # (B, T, C)
            states.append(x)
        return torch.stack(states, dim=2)  # (B, T, n_states, C)


def expected_encoder_shapes(config: WhisperEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key (with the `encoder.` prefix) -> shape, for an encoder of `config`."""
    with torch.device("meta"):  # shapes only: allocate nothing
        module = WhisperEncoder(config)
    return {ENCODER_PREFIX + k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_whisper_encoder(
    path: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WhisperEncoder:
    """Load the encoder of an OpenAI Whisper checkpoint (`tiny.pt`: `{"dims", "model_state_dict"}`).

    Every `encoder.*` key must match the encoder built from `dims`, name and
    shape; other keys (the decoder) are ignored. Raises `WhisperCheckpointError`
    naming the file and what was expected.
    """
    what = "an OpenAI Whisper checkpoint ({'dims', 'model_state_dict'}, e.g. tiny.pt)"
    if not path.is_file():
        raise WhisperCheckpointError(f"{path}: no such file; expected {what}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        raise WhisperCheckpointError(f"{path}: cannot be read as {what}: {exc}") from exc
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        got = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WhisperCheckpointError(f"{path}: expected {what}, found {got}")
    dims, state = checkpoint["dims"], checkpoint["model_state_dict"]
    if not isinstance(dims, dict) or not isinstance(state, dict):
        raise WhisperCheckpointError(f"{path}: 'dims' and 'model_state_dict' must be dicts")
    try:
        config = WhisperEncoderConfig.from_dims(dims)
    except ValueError as exc:
        raise WhisperCheckpointError(f"{path}: bad dims: {exc}") from exc

    expected = expected_encoder_shapes(config)
    found = {k: tuple(v.shape) for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    problems = _key_problems(expected, found)
    if problems:
        raise WhisperCheckpointError(
            f"{path}: encoder weights do not match Whisper {config} "
            f"({len(expected)} encoder.* tensors expected): " + "; ".join(problems)
        )

    encoder = WhisperEncoder(config)
    encoder.load_state_dict({k.removeprefix(ENCODER_PREFIX): state[k] for k in found}, strict=True)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _key_problems(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], shown: int = 5
) -> list[str]:
    """Human-readable differences between two key -> shape maps (at most `shown` names each)."""

    def listed(names: list[str]) -> str:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(
        f"{k} is {list(found[k])}, expected {list(expected[k])}"
        for k in expected.keys() & found.keys()
        if found[k] != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {listed(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {len(shapes)}: {listed(shapes)}")
    return problems
