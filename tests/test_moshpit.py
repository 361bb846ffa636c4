"""Moshpit averaging (Ryabinin et al., NeurIPS 2021) with ``RobustAverager``: groups of G found through group keys
on a grid (hivemind's ``initial_group_bits`` and ``target_group_size``; after each round a member's key moves to a
new coordinate). 16 peers on a 4x4 grid reach the exact mean in 2 rounds of groups of 4; with 10% of the peers
missing each round, the spread still shrinks fast and the mean is kept."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from swarm_peer.dht import create_dht
from swarm_peer.dht.node import visible_maddrs
from swarm_peer.protocols.averaging import RobustAverager

PEERS, G = 16, 4


@pytest.fixture(scope="module")
def dhts():
    first = create_dht()
    nodes = [first] + [create_dht(initial_peers=visible_maddrs(first)) for _ in range(PEERS - 1)]
    yield nodes
    for node in nodes:
        node.shutdown()


def _grid(dhts, inputs, prefix: str, min_group_size: int):
    # a row of the 4x4 grid per 2-bit key: peers 0, 4, 8, 12 share row 00, ...
    return [
        RobustAverager(
            [x.clone()],
            dht,
            prefix=prefix,
            aggregator="mean",
            target_group_size=G,
            min_group_size=min_group_size,
            initial_group_bits=f"{i % G:02b}",
            min_matchmaking_time=3.0,
            request_timeout=1.0,
        )
        for i, (x, dht) in enumerate(zip(inputs, dhts, strict=True))
    ]


def _round(averagers, present) -> list:
    results = [None] * len(averagers)

    def run(i):
        results[i] = averagers[i].average(timeout=12)

    threads = [threading.Thread(target=run, args=(i,)) for i in present]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _values(averagers) -> torch.Tensor:
    values = []
    for averager in averagers:
        with averager.get_tensors() as (tensor,):
            values.append(tensor.clone())
    return torch.stack(values)


@pytest.mark.timeout(180)
def test_a_full_4x4_grid_reaches_the_exact_mean_in_two_rounds_of_four(dhts):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1000, generator=g) for _ in range(PEERS)]
    mean = torch.stack(inputs).mean(0)
    averagers = _grid(dhts, inputs, "grid", min_group_size=G)
    try:
        first = _round(averagers, range(PEERS))
        assert all(r is not None and len(r.peers) == G for r in first)
        # one round mixes each row only (the control: not yet the mean)
        assert (_values(averagers) - mean).abs().max() > 0.1
        second = _round(averagers, range(PEERS))
        assert all(r is not None and len(r.peers) == G for r in second)
        assert (_values(averagers) - mean).abs().max() <= 1e-6
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(300)
def test_with_a_tenth_missing_each_round_the_spread_falls_a_thousandfold_and_the_mean_is_kept(dhts):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1000, generator=g) for _ in range(PEERS)]
    mean = torch.stack(inputs).mean(0)

    def spread(values: torch.Tensor) -> float:
        return ((values - values.mean(0)) ** 2).mean().item()

    start = spread(torch.stack(inputs))
    averagers = _grid(dhts, inputs, "lossy", min_group_size=2)
    rng = random.Random(0)
    try:
        for _ in range(6):
            missing = set(rng.sample(range(PEERS), PEERS // 10 + 1))  # 2 of 16 sit the round out
            _round(averagers, [i for i in range(PEERS) if i not in missing])
        values = _values(averagers)
    finally:
        for averager in averagers:
            averager.shutdown()
    assert spread(values) <= start / 1000, (start, spread(values))
    assert torch.allclose(values.mean(0), mean, atol=1e-5)  # groups keep their sum: so does the swarm
