"""peer.stage_balance: the stage-rebalancing rule of a SWARM run, on simulated pipelines (every peer applies the
rule in turn, moves when it says so, and the next look sees the move)."""

from __future__ import annotations

import random

import pytest

from swarm_peer.peer.stage_balance import plan_stage_move

STAGES = [(0, 4), (4, 8), (8, 12)]


def _pipeline(counts: list[int], speeds: dict[str, float] | None = None) -> dict:
    stages, n = {}, 0
    for stage, count in zip(STAGES, counts, strict=True):
        stages[stage] = {f"p{n + i}": (speeds or {}).get(f"p{n + i}", 1.0) for i in range(count)}
        n += count
    return stages


def _settle(stages: dict, looks: int = 40, seed: int = 0) -> tuple[int, dict[str, int]]:
    """Every look, the peers in a random order each apply the rule (and move at once); returns the moves in all and
    per peer."""
    rng, moves, per_peer = random.Random(seed), 0, {}
    for _ in range(looks):
        peers = [(peer, stage) for stage, members in stages.items() for peer in members]
        rng.shuffle(peers)
        for peer, _ in peers:
            stage = next(s for s, members in stages.items() if peer in members)
            target = plan_stage_move(peer, stages)
            if target is not None:
                stages[target][peer] = stages[stage].pop(peer)
                moves, per_peer[peer] = moves + 1, per_peer.get(peer, 0) + 1
    return moves, per_peer


def test_a_2_8_2_pipeline_of_equal_peers_ends_4_4_4_in_four_moves_and_stays():
    stages = _pipeline([2, 8, 2])
    moves, per_peer = _settle(stages)
    assert [len(stages[s]) for s in STAGES] == [4, 4, 4]
    assert moves == 4 and max(per_peer.values()) == 1  # the fewest moves there are; nobody moves twice
    assert _settle(stages) == (0, {})  # and it stays


@pytest.mark.parametrize("counts", [[4, 4, 4], [3, 4, 4], [1, 1, 1], [5, 4, 4]])
def test_a_balanced_pipeline_does_not_move(counts):
    # up to a peer's worth of imbalance: one move would only swap which stage is short
    assert _settle(_pipeline(counts)) == (0, {})


def test_the_rule_follows_capacities_not_peer_counts_and_a_lone_peer_never_leaves_its_stage():
    # stage 1's single peer is as fast as four: 4 / 4 / 1 in capacity; two of the slow peers move to the bottleneck
    stages = _pipeline([4, 1, 4], speeds={"p4": 4.0})
    moves, _ = _settle(stages)
    capacities = [sum(stages[s].values()) for s in STAGES]
    assert "p4" in stages[(4, 8)] and min(capacities) >= 3 and moves <= 3, (capacities, moves)


def test_stages_a_peer_apart_stay_where_a_naive_rule_moves_for_ever():
    # 4.5 / 4 / 4.2 in capacity: moving a peer of 1 from the first stage to the second would only make it 3.5 / 5
    speeds = {"p3": 1.5, "p8": 4.2}
    stages = _pipeline([4, 4, 1], speeds)
    assert _settle(stages) == (0, {})
    # the control, the naive rule: the weakest peer of the most served stage moves to the least served one
    naive, naive_moves = _pipeline([4, 4, 1], speeds), 0
    for _ in range(40):
        capacity = {s: sum(m.values()) for s, m in naive.items()}
        source, target = max(capacity, key=capacity.get), min(capacity, key=capacity.get)
        if capacity[source] > capacity[target] and len(naive[source]) > 1:
            peer = min(naive[source], key=lambda p: (naive[source][p], p))
            naive[target][peer] = naive[source].pop(peer)
            naive_moves += 1
    assert naive_moves == 40  # a peer goes back and forth between the first two stages
