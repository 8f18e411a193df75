"""CUDA-graph replay of a deployed encoder: its forward launched as one graph instead of ~200 Python launches.

The deployed encoder runs eagerly (every integer kernel is launched from the modules' Python), and at ViT-B/16
with batch 256 enqueueing one forward took the host longer than the GPU took to run it (17-20 ms against
15.9 ms of kernels on an H200, 2026-12-02): the eager path is launch-bound. :class:`CudaGraphRunner` captures
the forward once per (input shape, dtype, RegCache state) and replays it, the state being the identity of
each block's prefix and deletion filter (installing another prefix captures a new graph; the runner keeps the
objects of every captured state alive, so an identity is never reused while its graph exists).

Replay reuses the captured buffers: the returned tensor is overwritten by the next call (clone it to keep
it), and the captured graph reads the input through its own copy, so any tensor of the captured shape works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CudaGraphRunner:
    """``runner(images)``: ``fn(images)`` replayed from a CUDA graph captured on first use of each state."""

    def __init__(self, encoder: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.encoder = encoder
        self.fn = fn or encoder
        self._graphs: dict[tuple, tuple] = {}

    def _state(self) -> tuple:
        blocks = getattr(self.encoder, "blocks", ())
        return tuple((id(getattr(b.attn, "prefix", None)), id(getattr(b, "input_filter", None))) for b in blocks)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's output for ``images`` (a CUDA tensor), from the graph of this shape and RegCache state."""
        if not images.is_cuda:
            raise ValueError(f"CudaGraphRunner needs a CUDA input, got one on {images.device}: call the encoder itself")
        key = (tuple(images.shape), images.dtype, images.device, self._state())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(images)
        graph, static, out, _ = entry
        static.copy_(images)
        graph.replay()
        return out

    def _capture(self, images: torch.Tensor) -> tuple:
        static = images.clone()
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm: kernel compilation, code tables and cached casts outside the capture
            self.fn(static)
            self.fn(static)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(static)
        blocks = getattr(self.encoder, "blocks", ())
        keep = [(getattr(b.attn, "prefix", None), getattr(b, "input_filter", None)) for b in blocks]
        return graph, static, out, keep

    def clear(self) -> None:
        """Drop every captured graph (and the memory its buffers hold)."""
        self._graphs.clear()


__all__ = ["CudaGraphRunner"]
