"""Which stage of a SWARM run a peer should train: the stage-rebalancing rule (a pure function).

A SWARM pipeline (Ryabinin et al., ICML 2023, "adaptive rebalancing") is as fast as its slowest stage, whose
capacity is the summed throughput of its peers. As peers come and go, a stage can end up over-served while another
holds the whole pipeline back; a peer of the over-served stage then moves to the bottleneck.

``plan_stage_move`` is that rule, with the guards that keep it from oscillating (a naive "move the least busy peer
from the least loaded stage to the most loaded one" moved 37 times on a 2/8/2 split in our simulation, where 4
moves reach 4/4/4):

- only a peer of the stage with the largest capacity moves, and only its weakest (the smallest throughput, then the
  smallest id): every peer computes the same plan, so one peer moves per look;
- it moves to the stage with the smallest capacity, and only if both stages stay in the same order or come level
  (the target stage, with it, has no more than the source stage, without it: moving back could never help);
- and only if the smaller of the two capacities grows by at least ``1 / quality`` (the margin of the inference
  rebalancing, ``peer.balance``): a pipeline that is balanced up to a peer's worth stays still.

Example, three stages served by equal peers 2 / 8 / 2 (capacities in samples/s)::

    stages = {(0, 4): {"a": 1.0, "b": 1.0}, (4, 8): {f"c{i}": 1.0 for i in range(8)}, (8, 12): {"d": 1.0, "e": 1.0}}
    plan_stage_move("c0", stages)  # (0, 4): 3 / 7 / 2; then c1 goes to (8, 12), ... 4 moves to 4 / 4 / 4
    plan_stage_move("a", stages)   # None: a's stage is not the most served
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

__all__ = ["plan_stage_move"]

Peer = TypeVar("Peer", bound=Hashable)
Stage = tuple[int, int]

_REL_TOL = 1e-6  # capacities closer than this (relative) count as equal


def plan_stage_move(
    me: Peer, stages: Mapping[Stage, Mapping[Peer, float]], quality: float = 0.75
) -> Stage | None:
    """The stage ``me`` should move to, or None to stay (module docstring). ``stages``: each stage's peers and their
    throughputs, ``me`` among them."""
    capacity = {stage: sum(peers.values()) for stage, peers in stages.items()}
    if len(capacity) < 2:
        return None
    tol = _REL_TOL * max(max(capacity.values()), 1e-12)
    # the most served stage and the bottleneck; ties broken by the stages' order, the same for every peer
    source = max(sorted(capacity), key=lambda stage: capacity[stage])
    target = min(sorted(capacity), key=lambda stage: capacity[stage])
    peers = stages[source]
    if len(peers) < 2 or capacity[source] - capacity[target] <= tol:
        return None
    mover = min(peers, key=lambda peer: (peers[peer], str(peer)))
    if mover != me:
        return None
    moved = peers[me]
    after_target, after_source = capacity[target] + moved, capacity[source] - moved
    if (
        after_target > after_source + tol
    ):  # it would make the target the most served: moving back would follow
        return None
    if min(after_target, after_source) < capacity[target] / quality - tol:
        return None
    return target
