"""Picks and builds the renderer that config asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import structlog

from agent.avatars import AvatarRegistry
from agent.config import AgentConfig
from agent.errors import ConfigError
from media.cpu_renderer import CpuRenderer
from media.types import Renderer

log = structlog.get_logger(__name__)

UNET_FILE = "latentsync_unet.pt"


def latentsync_available(checkpoint_dir: Path, resolution: int) -> tuple[bool, str]:
    """Whether the diffusion renderer can run here, and why not."""
    if not (checkpoint_dir / UNET_FILE).is_file():
        return False, f"no {checkpoint_dir / UNET_FILE}"
    if importlib.util.find_spec("media.latentsync.renderer") is None:
        return False, "the LatentSync renderer is not installed"
    from media.latentsync.renderer import check_checkpoint_dir, cuda_available

    try:
        check_checkpoint_dir(checkpoint_dir, resolution)
    except ConfigError as exc:
        return False, str(exc).splitlines()[0] + " (see --renderer latentsync for details)"
    if not cuda_available():
        return False, "no CUDA device"
    return True, "checkpoints and CUDA present"


def build_renderer(config: AgentConfig, avatars: AvatarRegistry) -> Renderer | list[Renderer]:
    """The primary renderer(s): one LatentSync renderer per visible GPU, or the CPU renderer.

    Each GPU gets its own engine worker (lane); the engine hands the most urgent
    batch to whichever lane is free, so sessions spread over the GPUs by load.
    """
    choice = config.renderer.name
    ckpt = Path(config.renderer.latentsync.checkpoint_dir)
    if choice == "auto":
        ok, why = latentsync_available(ckpt, config.renderer.latentsync.resolution)
        choice = "latentsync" if ok else "cpu"
        log.info("renderer_selected", renderer=choice, reason=why)
    if choice == "latentsync":
        try:
            from media.latentsync.renderer import LatentSyncRenderer
        except ImportError as exc:
            raise ConfigError(f"the LatentSync renderer cannot be loaded: {exc}") from None
        from media.latentsync.renderer import cuda_device_count

        gpus = max(cuda_device_count(), 1)
        log.info("renderer_devices", renderer="latentsync", gpus=gpus)
        return [LatentSyncRenderer(avatars.get, config.renderer.latentsync, device=f"cuda:{i}")
                for i in range(gpus)]
    return CpuRenderer(avatars.get, config.renderer.cpu)
