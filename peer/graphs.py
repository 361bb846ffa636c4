"""Autograd graphs of training forwards, kept briefly so that their backward need not recompute the forward.

A client training through the swarm calls forward, then (soon after, on the same peer) backward with the same
inputs. Recomputing the forward in backward costs about a third of the step; keeping the forward's graph instead
costs its activations' memory. That memory is measured, not estimated: ``SavedTensors`` counts the bytes of every
tensor autograd saves while the forward runs (each storage once, the blocks' own weights excepted), plus the
outputs. ``GraphCache`` keeps at most ``max_bytes`` of graphs, each for at most ``ttl`` seconds, by (client peer
id, graph id), dropping the oldest first; a backward takes its graph out, or finds none (evicted, expired, too
large, or never kept) and recomputes. A graph stays counted until it is taken out or dropped, expired or not:
until then it holds its memory. Used from the compute thread only; ``bytes_left`` is read from others.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Graph", "GraphCache", "SavedTensors"]


@dataclass
class Graph:
    """One forward's outputs with their graph, the leaves to differentiate, and what produced them."""

    inputs: tuple[torch.Tensor, ...]  # hidden states, mask, positions as received
    extras: Any  # the request's applied extras (with ``same_as``), compared with the backward's
    outputs: torch.Tensor
    leaves: list[torch.Tensor]
    nbytes: int = 0  # memory the graph holds: saved activations and outputs (``SavedTensors``)

    def matches(self, inputs: tuple[torch.Tensor, ...], extras: Any) -> bool:
        return self.extras.same_as(extras) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(inputs, self.inputs, strict=True)
        )


class SavedTensors:
    """Counts the bytes autograd saves for backward inside the block, each storage once, ``shared`` excepted.

    >>> with SavedTensors(span.layers.parameters()) as saved:
    ...     outputs = span.forward(...)
    >>> saved.count(outputs)
    >>> saved.nbytes  # activations held by the graph, and the outputs
    """

    def __init__(self, shared: Iterable[torch.Tensor] = ()):
        self._seen = {_storage(t) for t in shared}
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count(tensor)
        return tensor

    def count(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage not in self._seen:
            self._seen.add(storage)
            self.nbytes += tensor.untyped_storage().nbytes()

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _storage(tensor: torch.Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


class GraphCache:
    def __init__(self, max_bytes: int, ttl: float = 60.0):
        self.max_bytes, self.ttl = max_bytes, ttl
        self._items: OrderedDict[tuple[str, int], tuple[Graph, float]] = OrderedDict()
        self.used = 0

    @property
    def bytes_left(self) -> int:
        return self.max_bytes - self.used

    def put(self, key: tuple[str, int], graph: Graph) -> bool:
        """Keeps ``graph`` (dropping the oldest as needed), unless it alone exceeds the budget."""
        self.pop(key)
        if graph.nbytes > self.max_bytes:
            return False
        self._items[key] = (graph, time.monotonic() + self.ttl)
        self.used += graph.nbytes
        while self.used > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    def pop(self, key: tuple[str, int]) -> Graph | None:
        self._expire()
        if key not in self._items:
            return None
        graph = self._items[key][0]
        self._drop(key)
        return graph

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, deadline) in self._items.items() if deadline < now]:
            self._drop(key)

    def _drop(self, key) -> None:
        graph, _ = self._items.pop(key)
        self.used -= graph.nbytes
