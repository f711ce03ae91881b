"""GPU memory as the framework sees it (torch), for admission control and the leak guard.

Imports torch only when asked about a CUDA device, so CPU-only servers never
pay for it.
"""

from __future__ import annotations


def gpu_memory(device: str) -> tuple[int, int] | None:
    """(used, total) bytes of a CUDA device: the larger of the device-wide use and this
    process's reserve; None for a non-CUDA device or without CUDA."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved = int(torch.cuda.memory_reserved(device))
    return max(int(total - free), reserved), int(total)
