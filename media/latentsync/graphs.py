"""A one-input function replayed as a CUDA graph: the capture and replay that the audio
encoder (`AudioFeatureExtractor.capture`) and the VAE decode (`LatentCodec.capture_decode`)
share. The UNet's `accel.GraphPredictor` captures its own: several inputs, one memory pool
for all its shapes, and DeepCache's pair of graphs."""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_CALLS = 2  # eager calls before the capture: libraries pick kernels, the allocator settles


class StaticGraph:
    """`fn` captured for `example`'s shape, dtype and device (CUDA)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor
                 ) -> None:
        device = example.device
        self.input = example.clone()
        # The warm-up runs off the capture's stream, as torch.cuda.graphs asks.
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                fn(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # A capture stream of the input's device (torch's default one is made on the device
        # current at the time); thread-local errors: another thread may allocate meanwhile.
        capture = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        with torch.cuda.graph(self.graph, stream=capture, capture_error_mode="thread_local"):
            self.output = fn(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`fn(x)` by replay, as a new tensor (the next replay overwrites the graph's)."""
        self.input.copy_(x)
        self.graph.replay()
        return self.output.clone()
