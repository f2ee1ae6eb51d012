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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Outputs = Any  # a tensor or a tuple of tensors


class StepGraphs:
    def __init__(self, store: Any) -> None:
        self.store = store  # the SlotStore these graphs read and write
        self.version = store.version
        self.stream = torch.cuda.Stream(device=store.device)
        self.warm: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, Outputs]] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # id -> static output of any graph here (kept alive)

    def valid_for(self, store: Any) -> bool:
        return store is self.store and store.version == self.version

    def __call__(self, name: str, fn: Callable[..., Outputs], *args: Any) -> Outputs:
        key = (name,) + tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm:
                self.warm.add(key)
                return self._on_stream(fn, args)  # warm-up: a real call, eagerly, on the capture stream
            entry = self.graphs[key] = self._capture(fn, args)
        graph, static_args, outputs = entry
        for static, arg in zip(static_args, args):
            if isinstance(arg, torch.Tensor) and arg is not static:
                static.copy_(arg)
        graph.replay()
        return outputs

    def _on_stream(self, fn: Callable[..., Outputs], args: tuple) -> Outputs:
        current = torch.cuda.current_stream(self.store.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn(*args)
        current.wait_stream(self.stream)
        return out

    def _capture(self, fn: Callable[..., Outputs], args: tuple) -> tuple[torch.cuda.CUDAGraph, tuple, Outputs]:
        # Inputs that are another graph's outputs are read in place; the rest get a static buffer of their own.
        static_args = tuple(
            a if not isinstance(a, torch.Tensor) or id(a) in self._outputs and self._outputs[id(a)] is a
            else a.clone()
            for a in args
        )
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a DataLoader's pin-memory thread) may keep using CUDA during the capture
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            outputs = fn(*static_args)
        for t in outputs if isinstance(outputs, tuple) else (outputs,):
            self._outputs[id(t)] = t
        return graph, static_args, outputs
