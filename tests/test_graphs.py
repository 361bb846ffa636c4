"""GraphCache: bounded by the bytes its graphs hold, expiring, taken out once; SavedTensors measures them."""

from __future__ import annotations

import time

import torch

from swarm_peer.peer.graphs import Graph, GraphCache, SavedTensors


class _Same:
    def same_as(self, other) -> bool:
        return other is self


def _graph(extras=None, nbytes=4) -> Graph:
    x = torch.ones(1, 2, 3)
    return Graph((x,), extras or _Same(), x * 2, [x], nbytes)


def test_a_graph_is_taken_out_once():
    cache = GraphCache(max_bytes=10)
    graph = _graph()
    assert cache.put(("client", 1), graph) and cache.bytes_left == 6
    assert cache.pop(("other client", 1)) is None
    assert cache.pop(("client", 1)) is graph
    assert cache.pop(("client", 1)) is None


def test_oldest_graphs_are_dropped_past_the_byte_budget():
    cache = GraphCache(max_bytes=10)
    for i in range(3):
        cache.put(("c", i), _graph())
    assert cache.pop(("c", 0)) is None and cache.bytes_left == 2
    assert cache.pop(("c", 1)) is not None and cache.pop(("c", 2)) is not None
    assert not cache.put(("c", 3), _graph(nbytes=11)) and not GraphCache(max_bytes=0).put(("c", 4), _graph())
    assert cache.bytes_left == 10


def test_graphs_expire():
    cache = GraphCache(max_bytes=10, ttl=0.05)
    cache.put(("c", 1), _graph())
    time.sleep(0.1)
    assert cache.pop(("c", 1)) is None


def test_a_graph_matches_only_the_same_inputs_and_extras():
    extras = _Same()
    graph = _graph(extras)
    assert graph.matches((torch.ones(1, 2, 3),), extras)
    assert not graph.matches((torch.zeros(1, 2, 3),), extras)
    assert not graph.matches((torch.ones(1, 2, 3),), _Same())


def test_saved_tensors_counts_activations_once_and_not_shared_weights():
    weight = torch.randn(256, 256)  # a frozen block weight: held by the model, not by the graph
    x = torch.randn(4, 256, requires_grad=True)
    with SavedTensors([weight]) as saved:
        hidden = x @ weight  # saves the weight (not counted) and perhaps x
        y = hidden.exp()  # saves its output y
        z = y.exp()  # saves its output z
    saved.count(z)  # the graph's output, already saved: counted once
    activation = 4 * 256 * 4
    assert 2 * activation <= saved.nbytes <= 3 * activation < weight.nbytes
