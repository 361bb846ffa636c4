"""Robust group averaging over real hivemind DHTs and averagers on 127.0.0.1: members end a round with identical
tensors, near the honest inputs' mean under an attack that ruins a plain mean (the control), leave out a sender of
non-finite values for good, and finish a round without a member that dies in it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from swarm_peer.dht import create_dht
from swarm_peer.dht.node import local_peer_id, visible_maddrs
from swarm_peer.protocols import aggregators
from swarm_peer.protocols.averaging import RobustAverager

D = 50_000  # several 512 KiB parts per member


@pytest.fixture(scope="module")
def dhts():
    first = create_dht()
    nodes = [first] + [create_dht(initial_peers=visible_maddrs(first)) for _ in range(4)]
    yield nodes
    for node in nodes:
        node.shutdown()


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base_D = torch.randn(D, generator=g)
    return base_D, [base_D + 0.05 * torch.randn(D, generator=g) for _ in range(n)]


def _round(averagers, timeout: float = 60) -> list:
    """One round on every averager at once; their AveragingRound results."""
    results = [None] * len(averagers)

    def run(i):
        results[i] = averagers[i].average(timeout=timeout, gather=i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return results


def _values(averager) -> torch.Tensor:
    with averager.get_tensors() as (tensor,):
        return tensor.clone()


def _averagers(dhts, inputs, prefix: str, aggregator: str, min_group_size: int | None = None, **kwargs):
    return [
        RobustAverager(
            [x.clone()],
            dht,
            prefix=prefix,
            aggregator=aggregator,
            min_group_size=min_group_size or len(inputs),
            target_group_size=len(inputs),
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            **kwargs,
        )
        for x, dht in zip(inputs, dhts, strict=False)
    ]


def _shutdown(averagers):
    for averager in averagers:
        averager.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("aggregator", ["mean", "centered_clip"])
def test_an_honest_group_ends_with_identical_tensors_equal_to_the_aggregate(dhts, aggregator):
    _, inputs = _inputs(4, seed=0)
    averagers = _averagers(dhts, inputs, f"honest-{aggregator}", aggregator)
    try:
        results = _round(averagers)
        assert all(r is not None and len(r.peers) == 4 for r in results), results
        assert sorted(results[0].gathered.values()) == [0, 1, 2, 3]
        values = [_values(a) for a in averagers]
    finally:
        _shutdown(averagers)
    assert all(torch.equal(values[0], v) for v in values[1:]), "members hold different tensors"
    # each owner aggregated its own slice of the vector: together, the rule applied per slice
    want = aggregators.mean(torch.stack(inputs)) if aggregator == "mean" else None
    if want is not None:
        assert torch.allclose(values[0], want, atol=1e-6)
    else:
        honest = torch.stack(inputs).mean(0)
        assert (values[0] - honest).norm() < 0.05 * (inputs[0] - honest).norm()


@pytest.mark.timeout(240)
def test_an_attacker_cannot_drag_the_robust_aggregate_but_ruins_the_mean(dhts):
    base_D, inputs = _inputs(5, seed=1)
    inputs[-1] = -1000 * base_D  # the attacker
    honest_D = torch.stack(inputs[:-1]).mean(0)
    spread = (inputs[0] - honest_D).norm()
    errors = {}
    for aggregator in ("centered_clip", "mean"):
        averagers = _averagers(dhts, inputs, f"attack-{aggregator}", aggregator)
        try:
            assert all(r is not None for r in _round(averagers))
            values = [_values(a) for a in averagers[:-1]]
        finally:
            _shutdown(averagers)
        assert all(torch.equal(values[0], v) for v in values[1:]), aggregator
        errors[aggregator] = (values[0] - honest_D).norm() / spread
    assert errors["centered_clip"] < 0.5, errors
    assert errors["mean"] > 100, errors  # the control


@pytest.mark.timeout(240)
def test_a_sender_of_non_finite_values_is_left_out_of_this_and_later_rounds(dhts):
    _, inputs = _inputs(4, seed=2)
    inputs[-1] = inputs[-1].clone()
    inputs[-1][::7] = float("nan")
    bad = str(local_peer_id(dhts[3]))
    averagers = _averagers(
        dhts, inputs, "nonfinite", "centered_clip", min_group_size=3, sender_timeout=5.0, reducer_timeout=10.0
    )
    try:
        _round(averagers)
        honest = averagers[:-1]
        values = [_values(a) for a in honest]
        assert all(torch.isfinite(v).all() for v in values)
        assert all(bad in a.banned_peers() for a in honest)
        # a later round: the banned peer is refused by leaders and its inputs ignored; the honest three agree
        for averager, x in zip(averagers, inputs, strict=True):
            with averager.get_tensors() as (tensor,):
                tensor.copy_(x)
        results = _round(averagers, timeout=10)
        honest_rounds = [r for r in results[:-1] if r is not None]
        assert honest_rounds, "the honest peers formed no group without the banned one"
        assert all(bad not in r.peers for r in honest_rounds)
        later = [_values(a) for a in honest]
        assert all(torch.isfinite(v).all() for v in later)
    finally:
        _shutdown(averagers)


@pytest.mark.timeout(240)
def test_the_others_finish_a_round_in_which_a_member_is_killed(dhts):
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(4_000_000, generator=g) for _ in range(4)]  # 16 MB each: the round takes a while
    averagers = _averagers(
        dhts, inputs, "killed", "mean", min_group_size=3, sender_timeout=5.0, reducer_timeout=10.0
    )
    survivors = averagers[:-1]
    try:
        killer = threading.Timer(
            2.5, os.kill, args=(averagers[-1].pid, signal.SIGKILL)
        )  # once the group formed
        killer.start()
        t0 = time.monotonic()
        _round(averagers, timeout=30)
        assert time.monotonic() - t0 < 60, "the round outlived its timeouts"
        killer.join()
        # the survivors go on: a round among them succeeds and leaves them identical
        results = _round(survivors, timeout=30)
        assert all(r is not None and len(r.peers) == 3 for r in results), results
        values = [_values(a) for a in survivors]
        assert all(torch.equal(values[0], v) for v in values[1:])
    finally:
        _shutdown(survivors)


@pytest.mark.timeout(120)
def test_a_joiner_downloads_the_state_of_the_best_peer_it_has_not_banned(dhts):
    values = [torch.full((10,), 2.0), torch.full((10,), 1.0), torch.zeros(10)]
    averagers = _averagers(dhts, values, "download", "mean")
    try:
        averagers[0].state_sharing_priority, averagers[1].state_sharing_priority = 2.0, 1.0
        joiner, first = averagers[2], str(local_peer_id(dhts[0]))
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:  # until both peers' priorities are in the DHT
            state = joiner.load_state_from_peers(timeout=10)
            if state is not None and torch.equal(state[1][0], values[0]):
                break
            time.sleep(0.5)
        assert state is not None and torch.equal(state[1][0], values[0]), "the control: the best peer's state"
        joiner.ban([first])
        state = joiner.load_state_from_peers(timeout=10)
        assert state is not None and torch.equal(state[1][0], values[1]), state
    finally:
        _shutdown(averagers)
