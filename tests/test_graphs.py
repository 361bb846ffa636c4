"""GraphCache: bounded by tokens, expiring, taken out once."""

from __future__ import annotations

import time

import torch

from swarm_peer.peer.graphs import Graph, GraphCache


class _Same:
    def same_as(self, other) -> bool:
        return other is self


def _graph(extras=None) -> Graph:
    x = torch.ones(1, 2, 3)
    return Graph((x,), extras or _Same(), x * 2, [x])


def test_a_graph_is_taken_out_once():
    cache = GraphCache(max_tokens=10)
    graph = _graph()
    cache.put(("client", 1), graph, tokens=4)
    assert cache.pop(("other client", 1)) is None
    assert cache.pop(("client", 1)) is graph
    assert cache.pop(("client", 1)) is None


def test_oldest_graphs_are_dropped_past_the_token_budget():
    cache = GraphCache(max_tokens=10)
    for i in range(3):
        cache.put(("c", i), _graph(), tokens=4)
    assert cache.pop(("c", 0)) is None
    assert cache.pop(("c", 1)) is not None and cache.pop(("c", 2)) is not None
    assert not cache.fits(11) and not GraphCache(max_tokens=0).fits(1)


def test_graphs_expire():
    cache = GraphCache(max_tokens=10, ttl=0.05)
    cache.put(("c", 1), _graph(), tokens=1)
    time.sleep(0.1)
    assert cache.pop(("c", 1)) is None


def test_a_graph_matches_only_the_same_inputs_and_extras():
    extras = _Same()
    graph = _graph(extras)
    assert graph.matches((torch.ones(1, 2, 3),), extras)
    assert not graph.matches((torch.zeros(1, 2, 3),), extras)
    assert not graph.matches((torch.ones(1, 2, 3),), _Same())
