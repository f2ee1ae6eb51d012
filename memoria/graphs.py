"""CUDA-graph replay of Memoria's per-step device work (`Memoria(cuda_graph=True)`).

A step launches a few hundred small kernels, so on a GPU its time is the host's cost of launching them. The device
work of add, remind and adjust reads no host state that changes between steps (counters live on the device, ties
come from a hash, shapes are static), so each call can be captured once as a CUDA graph and replayed: one launch
instead of hundreds.

- One `StepGraphs` per store allocation; Memoria drops it when the store is replaced or grows.
- Each (call, argument shapes) is warmed up once, eagerly, on the capture stream; the next such call is captured
  and replayed, and every later one replayed.
- Tensor arguments are copied into the graph's static inputs before a replay (skipped when the argument is that
  static tensor already, e.g. the previous call's output). Outputs are the graph's static tensors: the next replay
  overwrites them, so Memoria clones what it hands to callers.
- The CUDA calls go through a small backend object, so the bookkeeping above can be tested off a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Outputs = Any  # a tensor or a tuple of tensors


class CudaBackend:
    """Streams, capture and replay with torch.cuda."""

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def run_on(self, stream: Any, device: torch.device, fn: Callable[..., Outputs], args: tuple) -> Outputs:
        """fn(*args) eagerly on `stream`, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = fn(*args)
        current.wait_stream(stream)
        return out

    def capture(self, stream: Any, fn: Callable[..., Outputs], args: tuple) -> tuple[Any, Outputs]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a DataLoader's pin-memory thread) may keep using CUDA during the capture
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            outputs = fn(*args)
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()


class StepGraphs:
    def __init__(self, store: Any, backend: Any = None) -> None:
        self.store = store  # the SlotStore these graphs read and write
        self.version = store.version
        self.backend = backend or CudaBackend()
        self.stream = self.backend.stream(store.device)
        self.warm: set[tuple] = set()
        self.graphs: dict[tuple, tuple[Any, tuple, Outputs]] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # id -> static output of any graph here (kept alive)

    def valid_for(self, store: Any) -> bool:
        return store is self.store and store.version == self.version

    def __call__(self, name: str, fn: Callable[..., Outputs], *args: Any) -> Outputs:
        key = (name,) + tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm:
                self.warm.add(key)  # warm-up: a real call, eagerly, on the capture stream
                return self.backend.run_on(self.stream, self.store.device, fn, args)
            entry = self.graphs[key] = self._capture(fn, args)
        graph, static_args, outputs = entry
        for static, arg in zip(static_args, args):
            if isinstance(arg, torch.Tensor) and arg is not static:
                static.copy_(arg)
        self.backend.replay(graph)
        return outputs

    def _capture(self, fn: Callable[..., Outputs], args: tuple) -> tuple[Any, tuple, Outputs]:
        # Inputs that are another graph's outputs are read in place; the rest get a static buffer of their own.
        static_args = tuple(
            a if not isinstance(a, torch.Tensor) or self._outputs.get(id(a)) is a else a.clone() for a in args
        )
        graph, outputs = self.backend.capture(self.stream, fn, static_args)
        for t in outputs if isinstance(outputs, tuple) else (outputs,):
            if isinstance(t, torch.Tensor):
                self._outputs[id(t)] = t
        return graph, static_args, outputs
