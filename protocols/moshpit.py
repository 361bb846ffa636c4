"""Where a volunteer sits on a Moshpit grid, and whom it averages with in each round.

Moshpit SGD (Ryabinin, Gorbunov, Plokhotnyuk, Pekhimenko, "Moshpit SGD: Communication-Efficient Decentralized
Training on Heterogeneous Unreliable Devices", NeurIPS 2021) averages in small groups instead of one all-reduce
of everyone: n peers sit on a d-dimensional grid of side s (s^d >= n), and in round t each peer averages with the
peers of its *line* along dimension ``t mod d``: those that share every other coordinate. On a full grid, d rounds
give every peer the exact mean of all n (each round averages out one coordinate); with peers missing, the spread
still shrinks geometrically and, as every group keeps its sum, the mean is kept.

Every volunteer computes its place from the same inputs, with no messages: the run's volunteers as listed in the
DHT (sorted peer ids: a volunteer's rank is its position) and the largest group ``group_size`` (G). The grid has
the fewest dimensions d with G^d >= n, and the smallest side s <= G with s^d >= n; rank r sits at the d base-s
digits of r (the first the most significant). Ranks n..s^d - 1 stay empty, so lines can be short: a line with one
peer would average with nobody, so lone peers are put together in groups of up to s, and a last one left over joins
the smallest group (a group can then hold s + 1 peers, G + 1 when s = G).

Example: 10 volunteers, G = 4: d = 2 (4 < 10 <= 16), s = 4 (3^2 = 9 < 10). Rank 9 sits at (2, 1)::

        c1:  0  1  2  3
    c0 = 0:  0  1  2  3      round 0 (along c0, the columns): {0,4,8} {1,5,9} {2,6} {3,7}
    c0 = 1:  4  5  6  7      round 1 (along c1, the rows):    {0,1,2,3} {4,5,6,7} {8,9}
    c0 = 2:  8  9            round 2 = round 0, ...

On a full grid, rounds 0 and 1 give every peer the exact mean. On a partial one, group means weigh members of
short lines more (the robust aggregators take no weights), so the mean takes more rounds: here 8 and 9 see the
inputs of 2, 3, 6 and 7 only in round 2 (every value depends on every input after d rounds, d + 1 in the worst
layouts), and each value's largest weight error is 0.1 after 2 rounds, 3e-3 after 6. Every round keeps the mean. A group's hivemind key (``key_bits``)
is 8 bits of the round's number (groups of different rounds never meet) and the group's index in the round: peers
that see different listings (one joined, one left) may then meet fewer peers than they expect, never the wrong
round's.

    group = moshpit_group(listed_peer_ids, my_peer_id, group_size=16, round=t)
    averager.average(timeout, group_bits=group.key_bits, group_size=len(group.members))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MoshpitGroup", "coordinates", "grid_shape", "moshpit_group", "round_groups"]

_ROUND_BITS = 8  # a round's number, mod 256, leads every group key


def grid_shape(n: int, group_size: int) -> tuple[int, int]:
    """(side s, dimensions d) of the grid for ``n`` peers and groups of up to ``group_size``: the fewest d with
    group_size^d >= n, then the smallest s with s^d >= n. One peer: (1, 1)."""
    if n < 1 or group_size < 2:
        raise ValueError(f"a grid needs at least one peer and groups of two, not n={n}, G={group_size}")
    dims = 1
    while group_size**dims < n:
        dims += 1
    side = max(1, math.ceil(n ** (1 / dims)) - 1)
    while side**dims < n:  # the float root may fall short (or over: start one below)
        side += 1
    return side, dims


def coordinates(rank: int, side: int, dims: int) -> tuple[int, ...]:
    """The d base-``side`` digits of ``rank``, the most significant first: rank 9 on a 4x4 grid is (2, 1)."""
    return tuple(rank // side ** (dims - 1 - k) % side for k in range(dims))


def round_groups(n: int, group_size: int, round: int) -> list[tuple[int, ...]]:
    """The groups of ranks 0..n-1 in ``round`` (module docstring): the lines along dimension ``round mod d``, in
    the order of their other coordinates, then the lone peers' groups. Every rank is in exactly one group; no
    group has one member unless n = 1."""
    side, dims = grid_shape(n, group_size)
    axis = round % dims
    lines: dict[tuple[int, ...], list[int]] = {}
    for rank in range(n):
        c = coordinates(rank, side, dims)
        lines.setdefault(c[:axis] + c[axis + 1 :], []).append(rank)
    ordered = [line for _, line in sorted(lines.items())]
    groups = [line for line in ordered if len(line) > 1]
    lone = [line[0] for line in ordered if len(line) == 1]
    groups += [lone[i : i + side] for i in range(0, len(lone), side)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        last = groups.pop()
        min(reversed(groups), key=len).extend(last)  # the smallest group, the last of equals
    return [tuple(group) for group in groups]


@dataclass(frozen=True)
class MoshpitGroup:
    """A volunteer's group in one round: its hivemind group key bits and its members (peer ids, rank order)."""

    key_bits: str
    members: tuple[str, ...]


def moshpit_group(peers: Sequence[str], me: str, group_size: int, round: int) -> MoshpitGroup:
    """My group in ``round`` on the grid of ``peers`` (the run's volunteers; ``me`` is added when missing, as a
    volunteer that has not been listed yet). Key: the round's 8 bits, then the group's index in at least 1 bit."""
    ranked = sorted(set(peers) | {me})
    groups = round_groups(len(ranked), group_size, round)
    rank = ranked.index(me)
    index = next(i for i, group in enumerate(groups) if rank in group)
    index_bits = max(1, (len(groups) - 1).bit_length())
    key = format(round % 2**_ROUND_BITS, f"0{_ROUND_BITS}b") + format(index, f"0{index_bits}b")
    return MoshpitGroup(key, tuple(ranked[r] for r in groups[index]))
