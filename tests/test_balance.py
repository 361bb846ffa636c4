"""swarm_peer.peer.balance: the block-choice and rebalancing rules (pure functions, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from hivemind.p2p import PeerID

from swarm_peer.dht import ServerInfo, ServerState
from swarm_peer.peer.balance import (
    SpanLoad,
    best_start,
    block_throughputs,
    choose_span,
    plan_move,
    spans_from_servers,
    swarm_throughput,
)


def stacked() -> dict[str, SpanLoad]:
    """4 blocks, equal peers: three on [0, 2), one on [2, 4); block throughputs [3, 3, 1, 1]."""
    return {
        "a1": SpanLoad(0, 2, 1.0),
        "a2": SpanLoad(0, 2, 1.0),
        "a3": SpanLoad(0, 2, 1.0),
        "b": SpanLoad(2, 4, 1.0),
    }


def moved(spans: dict, peer, start: int) -> dict:
    span = spans[peer]
    return {**spans, peer: SpanLoad(start, start + span.length, span.throughput)}


def test_block_throughputs_sum_the_covering_spans():
    spans = {"a": SpanLoad(0, 3, 2.0), "b": SpanLoad(2, 5, 0.5)}
    np.testing.assert_array_equal(block_throughputs(spans, 6), [2.0, 2.0, 2.5, 0.5, 0.5, 0.0])
    assert swarm_throughput(spans, 6) == 0.0  # block 5 has no peer
    assert swarm_throughput(spans, 5) == 0.5
    assert swarm_throughput({}, 3) == 0.0
    with pytest.raises(ValueError, match="past the model"):
        block_throughputs(spans, 4)


@pytest.mark.parametrize(
    "start, end, throughput", [(2, 2, 1.0), (-1, 2, 1.0), (0, 2, -1.0), (0, 2, float("nan"))]
)
def test_span_load_rejects_bad_spans(start, end, throughput):
    with pytest.raises(ValueError):
        SpanLoad(start, end, throughput)


def test_best_start_picks_a_gap():
    throughputs = np.array([3.0, 3.0, 0.0, 3.0, 3.0])
    assert best_start(throughputs, 1) == 2
    assert best_start(throughputs, 2) == 1  # [3, 0] and [0, 3] tie: the earliest
    assert best_start(np.array([5.0, 5.0, 5.0, 5.0, 0.0]), 3) == 2


def test_best_start_picks_the_weakest_window():
    assert best_start(np.array([4.0, 4.0, 1.0, 1.5, 4.0, 4.0]), 2) == 2
    # the weakest block decides first: [2, 7] beats [3, 3], though [3, 3] is weaker on the whole
    assert best_start(np.array([7.0, 2.0, 9.0, 9.0, 3.0, 3.0]), 2) == 0


def test_best_start_breaks_ties_lexicographically():
    # windows 0..3 all hold a 1; [1, 2, 9] (starts 2 and 3) beats [1, 5, 9]; the earliest of those wins
    assert best_start(np.array([1.0, 5.0, 9.0, 1.0, 2.0, 9.0]), 3) == 2
    assert best_start(np.array([2.0, 1.0, 2.0, 2.0, 1.0, 2.0]), 2) == 0  # equal windows: the earliest
    # float noise does not break a tie: exactly, start 1 ([2, 1]) would beat start 0 ([1 + 1e-13, 2])
    assert best_start(np.array([1.0 + 1e-13, 2.0, 1.0, 2.0]), 2) == 0


def test_best_start_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        throughputs = rng.integers(0, 4, size=int(rng.integers(1, 12))).astype(float)  # many ties
        length = int(rng.integers(1, throughputs.size + 1))
        starts = range(throughputs.size - length + 1)
        expected = min(starts, key=lambda s: (sorted(throughputs[s : s + length]), s))
        assert best_start(throughputs, length) == expected, (throughputs, length)


def test_best_start_rejects_bad_lengths():
    for length in (0, 4):
        with pytest.raises(ValueError):
            best_start(np.ones(3), length)


def test_choose_span():
    assert choose_span({}, 80, 8) == (0, 8)
    assert choose_span({}, 3, 8) == (0, 3)  # clipped to the model
    assert choose_span(stacked(), 4, 2) == (2, 4)
    assert choose_span(stacked(), 4, 1) == (2, 3)
    with pytest.raises(ValueError):
        choose_span({}, 4, 0)


def test_plan_move_unstacks_a_crowded_span_and_then_stays_still():
    spans = stacked()
    plans = {peer: plan_move(peer, spans, 4, rng=np.random.default_rng(0)) for peer in spans}
    assert plans == {"a1": 2, "a2": 2, "a3": 2, "b": None}

    spans = moved(spans, "a1", 2)
    np.testing.assert_array_equal(block_throughputs(spans, 4), [2.0, 2.0, 2.0, 2.0])
    for seed in range(5):  # no oscillation: nobody moves again, in any order, even without a margin
        rng = np.random.default_rng(seed)
        for _ in range(3):
            for peer in rng.permutation(list(spans)).tolist():
                assert plan_move(peer, spans, 4, quality=0.75, rng=rng) is None
                assert plan_move(peer, spans, 4, quality=1.0, rng=rng) is None


def test_plan_move_closes_a_gap():
    spans = {"a1": SpanLoad(0, 2, 1.0), "a2": SpanLoad(0, 2, 1.0)}  # block 2 has no peer
    assert swarm_throughput(spans, 3) == 0.0
    assert plan_move("a1", spans, 3, rng=np.random.default_rng(0)) == 1  # old == 0 < new counts as a gain
    assert swarm_throughput(moved(spans, "a1", 1), 3) == 1.0


def test_a_sole_cover_never_moves_away():
    # p alone covers block 0; block 4 has no peer. Without p, p's best window is [3, 5), the gap...
    spans = {"p": SpanLoad(0, 2, 1.0), "q": SpanLoad(1, 4, 1.0), "r": SpanLoad(1, 2, 5.0)}
    np.testing.assert_array_equal(block_throughputs(spans, 5), [1.0, 7.0, 1.0, 1.0, 0.0])
    without_p = {peer: span for peer, span in spans.items() if peer != "p"}
    assert best_start(block_throughputs(without_p, 5), 2) == 3
    # ...but moving there would bare block 0, so p stays; r (redundant on block 1) and q (keeping its
    # blocks 2 and 3) can close the gap instead
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert {peer: plan_move(peer, spans, 5, rng=rng) for peer in spans} == {"p": None, "q": 2, "r": 4}


def test_the_quality_margin_holds_back_a_marginal_gain():
    spans = {**{a: SpanLoad(0, 2, 1.0) for a in ("a1", "a2", "a3")}, "b1": SpanLoad(2, 4, 1.0)}
    spans["b2"] = SpanLoad(2, 4, 0.8)
    np.testing.assert_allclose(block_throughputs(spans, 4), [3.0, 3.0, 1.8, 1.8])
    # moving a1 to [2, 4) gives [2, 2, 2.8, 2.8]: a gain of 2 / 1.8 = 1.11, under 1 / 0.75 and 1 / 0.85
    assert plan_move("a1", spans, 4, quality=0.75, rng=np.random.default_rng(0)) is None
    assert plan_move("a1", spans, 4, quality=0.85, rng=np.random.default_rng(0)) is None
    # control: without the margin (and with a small one) the same swarm moves, so the margin is what stops it
    assert plan_move("a1", spans, 4, quality=1.0, rng=np.random.default_rng(0)) == 2
    assert plan_move("a1", spans, 4, quality=0.95, rng=np.random.default_rng(0)) == 2

    spans = moved(spans, "a1", 2)
    for peer in spans:  # and once moved, it stays moved, even without a margin
        assert plan_move(peer, spans, 4, quality=1.0, rng=np.random.default_rng(1)) is None


def test_rebalancing_random_swarms_settles_without_lowering_the_bottleneck():
    rng = np.random.default_rng(3)
    total_moves = 0
    for _ in range(4):
        num_blocks = 10
        spans = {}
        for peer in range(20):  # placed at random, not by choose_span: unbalanced, sometimes with gaps
            length = int(rng.integers(2, 6))
            start = int(rng.integers(0, num_blocks - length + 1))
            spans[peer] = SpanLoad(start, start + length, float(rng.lognormal(0.0, 1.0)))
        for _ in range(20):
            moves = 0
            for peer in rng.permutation(list(spans)).tolist():
                start = plan_move(peer, spans, num_blocks, quality=0.75, rng=rng)
                if start is None:
                    continue
                before, covered = (
                    swarm_throughput(spans, num_blocks),
                    block_throughputs(spans, num_blocks) > 0,
                )
                spans = moved(spans, peer, start)
                assert swarm_throughput(spans, num_blocks) >= before - 1e-9  # rule (c)
                assert np.all(block_throughputs(spans, num_blocks)[covered] > 0)  # rule (b): no block bared
                moves += 1
            total_moves += moves
            if moves == 0:
                break
        assert moves == 0, "rebalancing did not settle in 20 rounds"
    assert total_moves > 0  # the swarms did need rebalancing


def test_plan_move_validates_its_arguments():
    with pytest.raises(ValueError, match="no span"):
        plan_move("nobody", stacked(), 4)
    for quality in (0.0, 1.5):
        with pytest.raises(ValueError, match="quality"):
            plan_move("a1", stacked(), 4, quality=quality)
    assert plan_move("a1", stacked(), 4) == 2  # rng defaults to a fresh generator


def test_spans_from_servers_keeps_live_peers_and_maps_their_records():
    p0, p1, p2, p3 = (PeerID(f"peer-{i}".encode()) for i in range(4))
    online = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=2, throughput=5.0)
    offline = ServerInfo(state=ServerState.OFFLINE, start_block=0, end_block=4, throughput=9.0)
    joining = ServerInfo(state=ServerState.JOINING, start_block=1, end_block=4)  # throughput 0: unknown
    too_long = ServerInfo(state=ServerState.ONLINE, start_block=2, end_block=6, throughput=2.0)
    servers = [
        {p0: online, p1: offline},
        {p0: online, p1: offline, p2: joining},
        {p1: offline, p2: joining, p3: too_long},
        {p1: offline, p2: joining, p3: too_long},
    ]
    spans = spans_from_servers(servers)
    assert spans == {p0: SpanLoad(0, 2, 5.0), p2: SpanLoad(1, 4, 1.0), p3: SpanLoad(2, 4, 2.0)}
    np.testing.assert_array_equal(block_throughputs(spans, 4), [5.0, 6.0, 3.0, 3.0])
    assert spans_from_servers([{p1: offline}, {p1: offline}]) == {}
