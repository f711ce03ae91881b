"""`serve --profile-turns N`: a torch profiler trace of rendered chunks, for Perfetto.

Wraps a renderer: the first `chunks` render calls run under
`torch.profiler.profile` (CPU, and CUDA when present), each stage marked with
`record_function`, and the trace is written as Chrome trace JSON, which
https://ui.perfetto.dev opens. Later calls run unprofiled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from media.types import (
    AvatarPrep,
    FrameSink,
    RenderChunk,
    Renderer,
    RendererCapabilities,
    RenderResult,
    prepare_inner,
    render_inner,
)


class ProfilingRenderer:
    def __init__(self, inner: Renderer, out_dir: Path, chunks: int) -> None:
        if chunks < 1:
            raise ValueError("profile at least one chunk")
        self.inner = inner
        self.out_dir = out_dir
        self.remaining = chunks
        self.written: list[Path] = []
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> RendererCapabilities:
        return self.inner.capabilities

    def warmup(self) -> None:
        self.inner.warmup()

    def prepare_avatar(self, avatar: str, max_frames: int | None = None) -> AvatarPrep:
        """The inner renderer's, unprofiled (only renders are traced)."""
        return prepare_inner(self.inner, avatar, max_frames)

    def close(self) -> None:
        self.inner.close()

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]:
        return self._render(batch, None)

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]:
        """The inner renderer's streaming render (its plain one when it does not stream)."""
        return self._render(batch, on_frames)

    def _render(self, batch: Sequence[RenderChunk],
                on_frames: FrameSink | None) -> list[RenderResult]:
        with self._lock:
            profile = self.remaining > 0
            if profile:
                self.remaining -= len(batch)
        if not profile:
            return render_inner(self.inner, batch, on_frames)
        import torch
        from torch.profiler import ProfilerActivity, record_function
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        keys = ",".join(f"{c.key.session}/{c.key.turn}/{c.key.index}" for c in batch)
        with torch_profile(activities=activities, record_shapes=True) as prof:
            with record_function(f"render[{keys}]"):
                results = render_inner(self.inner, batch, on_frames)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"chunks-{time.time_ns()}.trace.json"
        prof.export_chrome_trace(str(path))
        self.written.append(path)
        return results
