"""Autograd graphs of training forwards, kept briefly so that their backward need not recompute the forward.

A client training through the swarm calls forward, then (soon after, on the same peer) backward with the same
inputs. Recomputing the forward in backward costs about a third of the step; keeping the forward's graph instead
costs its activations' memory. ``GraphCache`` keeps the graphs of at most ``max_tokens`` (batch * tokens) of
forwards, each for at most ``ttl`` seconds, by (client peer id, graph id); a backward takes its graph out, or
finds none (evicted, expired, or never kept) and recomputes. Used from the compute thread only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Graph", "GraphCache"]


@dataclass
class Graph:
    """One forward's outputs with their graph, the leaves to differentiate, and what produced them."""

    inputs: tuple[torch.Tensor, ...]  # hidden states, mask, positions as received
    extras: Any  # the request's applied extras (with ``same_as``), compared with the backward's
    outputs: torch.Tensor
    leaves: list[torch.Tensor]

    def matches(self, inputs: tuple[torch.Tensor, ...], extras: Any) -> bool:
        return self.extras.same_as(extras) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(inputs, self.inputs, strict=True)
        )


class GraphCache:
    def __init__(self, max_tokens: int, ttl: float = 60.0):
        self.max_tokens, self.ttl = max_tokens, ttl
        self._items: OrderedDict[tuple[str, int], tuple[Graph, int, float]] = OrderedDict()
        self._tokens = 0

    def fits(self, tokens: int) -> bool:
        return 0 < tokens <= self.max_tokens

    def put(self, key: tuple[str, int], graph: Graph, tokens: int) -> None:
        self.pop(key)
        self._items[key] = (graph, tokens, time.monotonic() + self.ttl)
        self._tokens += tokens
        self._expire()
        while self._tokens > self.max_tokens:
            self._drop(next(iter(self._items)))

    def pop(self, key: tuple[str, int]) -> Graph | None:
        self._expire()
        if key not in self._items:
            return None
        graph = self._items[key][0]
        self._drop(key)
        return graph

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, _, deadline) in self._items.items() if deadline < now]:
            self._drop(key)

    def _drop(self, key) -> None:
        _, tokens, _ = self._items.pop(key)
        self._tokens -= tokens
