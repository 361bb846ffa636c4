"""Which blocks a peer should host: the block-choice and rebalancing rules (pure functions on numpy).

The swarm is a set of spans, one per peer; a peer adds its throughput (tokens/s) to every block of its span.
A chain through the swarm is as fast as its weakest block, so the figure to raise is the *bottleneck*, the
smallest per-block throughput (0 while some block has no peer at all).

- **Joining** (``choose_span``): take the window of ``length`` blocks that is weakest, comparing windows by
  their per-block throughputs sorted ascending, lexicographically (lowest block first, then the next
  lowest, ...; earliest start on ties). That window holds the bottleneck if any window can, and among those
  it is the one whose other blocks are also weakest.
- **Rebalancing** (``plan_move``): a peer takes itself out, finds its best window the same way, and moves
  only if the swarm that would follow (every peer re-placing itself greedily until no one moves) has a
  bottleneck at least ``1 / quality`` times today's -- the margin that keeps a balanced swarm still -- and
  the move alone opens no gap. This is the load balancing of Petals (Borzunov et al., 2023, "Distributed
  Inference and Fine-tuning of Large Language Models Over The Internet").

Example, a 4-block model, every peer at 1 token/s, three peers on blocks [0, 2) and one on [2, 4)::

    spans = {"a1": SpanLoad(0, 2, 1.0), "a2": SpanLoad(0, 2, 1.0), "a3": SpanLoad(0, 2, 1.0),
             "b": SpanLoad(2, 4, 1.0)}
    block_throughputs(spans, 4)         # array([3., 3., 1., 1.]); the bottleneck is 1
    choose_span(spans, 4, 2)            # (2, 4): a newcomer joins "b"
    plan_move("a1", spans, 4)           # 2: without a1, [2, 2, 1, 1]; after its move, [2, 2, 2, 2]
    plan_move("b", spans, 4)            # None: b is where it would choose to be
    # after a1 moves, every peer's plan_move is None: the swarm is balanced

Windows are compared on throughputs snapped to a grid of ``_REL_TOL`` times the largest block throughput, so
float noise cannot order them: windows equal on the grid are tied, and a peer whose current window is tied
with the best one stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np

from swarm_peer.dht import ServerInfo, ServerState

__all__ = [
    "SpanLoad",
    "best_start",
    "block_throughputs",
    "choose_span",
    "plan_move",
    "spans_from_servers",
    "swarm_throughput",
]

# Shapes: L = window length (blocks), S = window starts (num_blocks - length + 1).

_REL_TOL = 1e-9  # grid of throughput comparisons, relative to the largest (against float noise; not a margin)
# Rounds of greedy re-placement in plan_move's estimate of where the swarm settles. Measured on 900 peers x
# 80 blocks: the first round gives ~99.8% of the settled bottleneck, rounds 6..13 add less than the spread
# between random orders (~0.07%) at ~0.04 s each. A cut-short estimate is low, so it can only hold back a
# borderline move.
_SETTLE_ROUNDS = 5
_COUNTED_STATES = (ServerState.ONLINE, ServerState.JOINING)

Peer = TypeVar("Peer", bound=Hashable)  # a peer id: hivemind's PeerID in a swarm, anything hashable in tests


@dataclass(frozen=True)
class SpanLoad:
    """A peer's span ``[start, end)`` and the tokens/s it adds to each block of it.

    Raises ``ValueError`` for an empty or negative span or a negative / non-finite throughput.
    """

    start: int
    end: int
    throughput: float

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span must have 0 <= start < end, got [{self.start}, {self.end})")
        if not (math.isfinite(self.throughput) and self.throughput >= 0):
            raise ValueError(f"throughput must be finite and >= 0, got {self.throughput}")

    @property
    def length(self) -> int:
        return self.end - self.start


def block_throughputs(spans: Mapping[Hashable, SpanLoad], num_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the spans covering it: float64, shape ``(num_blocks,)``.

    Raises ``ValueError`` if a span reaches past ``num_blocks``.
    """
    starts, lengths, tps = _columns(spans, num_blocks)
    return _coverage(starts, lengths, tps, num_blocks)[0]


def swarm_throughput(spans: Mapping[Hashable, SpanLoad], num_blocks: int) -> float:
    """The bottleneck: the smallest per-block throughput, 0.0 if some block has no peer."""
    starts, lengths, tps = _columns(spans, num_blocks)
    return _bottleneck(*_coverage(starts, lengths, tps, num_blocks))


def best_start(throughputs: np.ndarray, length: int) -> int:
    """The start of the weakest window of ``length`` blocks, where adding a peer raises the bottleneck most.

    Windows are compared by their throughputs sorted ascending, lexicographically; ties (equal up to float
    noise) go to the earliest start. E.g. ``best_start(np.array([1., 5., 9., 1., 2., 9.]), 3) == 2``:
    windows 0..3 all hold a 1, and ``[1, 2, 9]`` (starts 2 and 3) beats ``[1, 5, 9]`` (starts 0 and 1).
    Raises ``ValueError`` unless ``1 <= length <= len(throughputs)``.
    """
    throughputs = np.asarray(throughputs, dtype=np.float64)
    if throughputs.ndim != 1 or not 1 <= length <= throughputs.size:
        raise ValueError(f"need 1 <= length <= {throughputs.size} blocks, got length {length}")
    return _best_window(throughputs, length, _tolerance(throughputs))


def choose_span(spans: Mapping[Hashable, SpanLoad], num_blocks: int, length: int) -> tuple[int, int]:
    """``(start, end)`` for a peer joining a swarm it is not part of: the weakest window (``best_start``).

    ``length`` is clipped to ``num_blocks``. E.g. ``choose_span({}, 80, 8) == (0, 8)``. Raises ``ValueError``
    if ``length < 1`` or a span reaches past ``num_blocks``.
    """
    if length < 1:
        raise ValueError(f"a span needs at least one block, got length {length}")
    length = min(length, num_blocks)
    start = best_start(block_throughputs(spans, num_blocks), length)
    return start, start + length


def plan_move(
    peer: Hashable,
    spans: Mapping[Hashable, SpanLoad],
    num_blocks: int,
    *,
    quality: float = 0.75,
    rng: np.random.Generator | None = None,
) -> int | None:
    """The start ``peer`` should move its span to (same length), or None to stay where it is.

    ``peer`` takes itself out of ``spans`` and finds its best start (``best_start``); if its current window
    is as weak as that one, it stays. Otherwise the move is simulated, then every peer, in random order
    (``rng``), re-places itself the same way, for rounds until no one moves (at most ``_SETTLE_ROUNDS``):
    an estimate of where the swarm settles once everyone has rebalanced. ``peer`` moves only if

    (a) the settled bottleneck ``new`` beats today's ``old`` by the margin: ``new > old`` and
        ``new * quality >= old`` (so ``quality=1.0`` moves for any gain; ``old == 0 < new`` always counts);
    (b) moving ``peer`` alone, the others staying put, leaves no block bare that someone covers today.

    A third rule, "(c) moving ``peer`` alone does not lower the bottleneck", needs no check: it always
    holds, and so does (b) while the swarm has no gap. Proof: the blocks ``peer`` would join (new window
    minus old) are untouched by its removal, so each holds at least ``old``. If a block it would leave (old
    minus new) fell below ``old`` -- to 0 for (b) -- the old window, without ``peer``, would hold a value
    below anything the new window adds over their common blocks, so its sorted throughputs would be
    lexicographically smaller: the old window would be the best, and ``peer`` would stay. This is exact on
    the comparison grid, and it holds for every move of the settling estimate too, so that estimate's
    bottleneck never falls (which lets it stop as soon as it is high enough). (c) is asserted, not checked.
    (b) does bind when the swarm already has a gap: leaving a block bare to cover another only moves the
    gap; a redundant peer should cover it instead. Neither rule holds back a move that helps at once; (b)
    holds back a move whose gain relies on others following. The reload is outside these rules: while
    ``peer`` loads its new blocks it serves none, which is for the hosting peer to manage.

    A balanced swarm stays still: in a settled swarm every peer's window is tied with its best one, so
    nobody looks further, and a peer that does must expect a gain of ``1 / quality`` (a). While the
    membership stays the same no move lowers the bottleneck (c), so moves cannot swing it down and back up.

    Raises ``ValueError`` if ``peer`` is not in ``spans``, ``quality`` is not in ``(0, 1]`` or a span
    reaches past ``num_blocks``.
    """
    if not 0 < quality <= 1:
        raise ValueError(f"quality must be in (0, 1], got {quality}")
    if peer not in spans:
        raise ValueError(f"peer {peer!r} has no span in the swarm")
    rng = np.random.default_rng() if rng is None else rng
    index = list(spans).index(peer)
    starts, lengths, tps = _columns(spans, num_blocks)
    throughputs, counts = _coverage(starts, lengths, tps, num_blocks)
    tol = _tolerance(throughputs)
    old = _bottleneck(throughputs, counts)
    start, length, throughput = int(starts[index]), int(lengths[index]), float(tps[index])

    alone = throughputs.copy()  # the swarm without peer, then with peer moved alone
    alone[start : start + length] -= throughput
    target = _best_window(alone, length, tol, current=start)
    if target == start:
        return None

    alone[target : target + length] += throughput
    counts_alone = counts.copy()
    counts_alone[start : start + length] -= 1
    counts_alone[target : target + length] += 1
    if np.any((counts > 0) & (counts_alone == 0)):  # (b)
        return None
    assert _bottleneck(alone, counts_alone) >= old - tol, "a best-start move lowered the bottleneck"  # (c)

    # (a) cannot hold if even a perfect fractional spread of all the peers does not gain enough
    if not _gains(float(tps @ lengths) / num_blocks, old, quality, tol):
        return None
    starts[index] = target
    settled = _settle(
        alone,
        starts.tolist(),
        lengths.tolist(),
        tps.tolist(),
        tol,
        rng,
        enough=lambda new: _gains(new, old, quality, tol),
    )
    return target if _gains(max(float(settled.min()), 0.0), old, quality, tol) else None


def spans_from_servers(servers: Sequence[Mapping[Peer, ServerInfo]]) -> dict[Peer, SpanLoad]:
    """The swarm's spans from a per-block lookup (``get_block_servers`` / ``online_servers``).

    ``servers[i]`` maps peer id -> ``ServerInfo`` for block ``i``, as the lookup over
    ``range(num_blocks)`` returns it. Keeps peers whose state is ONLINE or JOINING (a joining peer will
    serve soon, so others should not pile onto its blocks); a peer's first such record in block order gives
    its span, clipped to ``len(servers)`` blocks so that a record claiming blocks past the model cannot
    skew the arithmetic. An unknown throughput (0) counts as 1.0, so the peer still counts as coverage.
    """
    spans: dict[Peer, SpanLoad] = {}
    for block_servers in servers:
        for peer_id, info in block_servers.items():
            if peer_id in spans or info.state not in _COUNTED_STATES:
                continue
            # a lookup only returns records whose span holds their block, so start_block < len(servers)
            end = min(info.end_block, len(servers))
            spans[peer_id] = SpanLoad(info.start_block, end, info.throughput or 1.0)
    return spans


def _columns(
    spans: Mapping[Hashable, SpanLoad], num_blocks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, lengths (int64) and throughputs (float64) of ``spans``, in the mapping's order."""
    if num_blocks < 1:
        raise ValueError(f"a model needs at least one block, got {num_blocks}")
    starts = np.fromiter((span.start for span in spans.values()), np.int64, len(spans))
    ends = np.fromiter((span.end for span in spans.values()), np.int64, len(spans))
    tps = np.fromiter((span.throughput for span in spans.values()), np.float64, len(spans))
    if ends.size and ends.max() > num_blocks:
        raise ValueError(f"a span ends at block {ends.max()}, past the model's {num_blocks} blocks")
    return starts, ends - starts, tps


def _coverage(
    starts: np.ndarray, lengths: np.ndarray, tps: np.ndarray, num_blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per block: the summed throughput (float64) and the number of covering peers (int64)."""
    ends = starts + lengths
    # a difference array: +x where a span starts, -x where it ends, then a running sum
    diff = np.bincount(starts, tps, num_blocks + 1) - np.bincount(ends, tps, num_blocks + 1)
    counts = np.cumsum(np.bincount(starts, None, num_blocks + 1) - np.bincount(ends, None, num_blocks + 1))
    counts = counts[:num_blocks].astype(np.int64)
    throughputs = np.cumsum(diff)[:num_blocks]
    throughputs[counts == 0] = 0.0  # exactly 0 where no one is, whatever the running sum's rounding
    return throughputs, counts


def _bottleneck(throughputs: np.ndarray, counts: np.ndarray) -> float:
    return 0.0 if np.any(counts == 0) else max(float(throughputs.min()), 0.0)


def _tolerance(throughputs: np.ndarray) -> float:
    return _REL_TOL * float(np.abs(throughputs).max(initial=0.0)) + 1e-12


def _gains(new: float, old: float, quality: float, tol: float) -> bool:
    """Rule (a): ``new`` is better than ``old`` by the factor ``1 / quality``."""
    return new > old + tol and new * quality >= old - tol


@lru_cache(maxsize=256)
def _window_index(num_blocks: int, length: int) -> np.ndarray:
    """(L, S) block indices of every window, one column per window start; cached and read-only."""
    index_LS = np.arange(length)[:, None] + np.arange(num_blocks - length + 1)[None, :]
    index_LS.flags.writeable = False
    return index_LS


def _best_window(throughputs: np.ndarray, length: int, tol: float, current: int = -1) -> int:
    """``best_start``, comparing throughputs snapped to a grid of ``tol`` (float noise below it is ignored).

    Returns ``current`` if its window is tied with the best one.
    """
    snapped = np.round(throughputs * (1.0 / tol))  # integers up to ~1e9, exact as floats
    # level 0, each window's weakest block, needs no sort and leaves only the windows holding the minimum:
    # few (at most ``length`` per weakest block), so the rest is a plain lexicographic min over lists
    level_S = np.minimum.reduce(snapped[_window_index(snapped.size, length)])
    starts = (level_S == level_S.min()).nonzero()[0].tolist()
    if len(starts) > 1:
        values = snapped.tolist()
        rows = [sorted(values[start : start + length]) for start in starts]
        best = min(rows)
        starts = [start for start, row in zip(starts, rows, strict=True) if row == best]
    return current if current in starts else starts[0]


def _settle(
    throughputs: np.ndarray,
    starts: list[int],
    lengths: list[int],
    tps: list[float],
    tol: float,
    rng: np.random.Generator,
    enough: Callable[[float], bool],
) -> np.ndarray:
    """Let every peer re-place itself at its best start, in random order, until no one moves.

    Updates ``throughputs`` and ``starts`` in place and returns ``throughputs``. Stops early once
    ``enough(bottleneck)``: a best-start move never lowers the bottleneck (rule (c) of ``plan_move``), so the
    settled one would be at least as high. A peer whose best start was checked since the last move anywhere
    is skipped: nothing it sees has changed.
    """
    moves = 0  # moves so far; a peer settled at moves == m needs no new look until someone moves
    settled_at = [-1] * len(starts)
    for _ in range(_SETTLE_ROUNDS):
        moved = False
        for i in rng.permutation(len(starts)).tolist():
            if settled_at[i] == moves:
                continue
            start, length, throughput = starts[i], lengths[i], tps[i]
            throughputs[start : start + length] -= throughput
            target = _best_window(throughputs, length, tol, current=start)
            throughputs[target : target + length] += throughput
            if target != start:
                starts[i] = target
                moves += 1
                moved = True
                if enough(float(throughputs.min())):
                    return throughputs
            settled_at[i] = moves
        if not moved:
            break
    return throughputs
