"""Beam search over a grid of experts in the DHT: the top-k live experts of each sample, without listing the grid.

Learning@home (Ryabinin & Gusev, NeurIPS 2020, arXiv 2002.04013) gives each expert a uid on a grid, ``"ffn.3.7"``, and
a gate that scores each grid dimension separately (product-key gating): the score of expert (i, j) for sample b is
``scores_BG[0][b, i] + scores_BG[1][b, j]``. Peers declare every prefix level of the experts they host
(``swarm_peer.dht.declare_experts``: ``"ffn."`` -> {3, ...}, ``"ffn.3."`` -> {7, ...}), so a left-to-right beam search
reads one key per prefix it keeps instead of the whole grid::

    searcher = MoEBeamSearcher(dht, "ffn.", grid_size=(8, 8))
    best = searcher.find_best_experts([scores_B8, scores_B8], k=4)   # per sample, up to 4 Expert, best first
    best[0][0]   # Expert(uid="ffn.3.7", coords=(3, 7), score=2.41, peers=(PeerID, ...))

Algorithm, for all samples at once: the beam of a sample starts as the empty prefix; at dimension d, the prefixes in
all beams are looked up in one DHT request (``get_expert_successors``), each prefix is extended by its live next
coordinates, scored by the sum of its coordinates' scores, and each sample keeps its ``beam_size`` best (``k`` best
at the last dimension, where the prefixes are uids and the peers of an entry are the hosts of that expert). That is
``len(grid_size)`` DHT requests per batch, whatever the batch size, each of at most ``B * beam_size`` keys (the same
prefix is read once for all samples that keep it).

Exact on a full grid, for ``beam_size >= k``: every prefix of one level has the same best completion, so an expert's
prefix that scores below ``k`` other prefixes has ``k`` better experts. On a sparse grid it returns only live
(declared, unexpired) experts, and may miss one whose prefix scores low; a larger ``beam_size`` trades DHT keys for
recall.

``cache_seconds`` (default 0: none) keeps what each prefix's lookup found for that long, and looks up only the
prefixes it does not hold fresh: a layer that searches every batch then pays the DHT once per ``cache_seconds``
instead of ``len(grid_size)`` requests a batch. Records live for minutes and are refreshed every announce period, so
a cache of seconds misses only experts that came or went within it (a caller avoids peers that fail its calls:
``exclude``).

Why not hivemind's ``hivemind.moe.client.beam_search.MoEBeamSearcher``: the algorithm is the same and so is the uid
and prefix layout, but

- it reads hivemind's grid records (an int coordinate as the subkey, ``(uid, peer id)`` as the value), which are
  unsigned: any peer could overwrite or erase another's coordinate. Ours are signed per peer and checked by
  ``SwarmRecordValidator`` (``swarm_peer.dht.expert_record``), and its entry filter (``_select_valid_entries``) drops
  them (their subkeys are bytes, not ints);
- hivemind does not declare the first level (``"ffn."``), so its first beam probes ``"ffn.{i}."`` one index at a
  time, best first, and stores unsigned "no such prefix" entries (negative caching) to speed that up on sparse
  grids; we read the live first coordinates from one key and store nothing;
- its batched search runs one independent search per sample (``B * len(grid_size)`` DHT lookups) inside the DHT
  process, with every score pickled through the pipe to it (``B * sum(grid_size)`` floats: over the size a request
  to the DHT process survives for a large batch); here the scores stay in the caller and only keys travel;
- it returns ``RemoteExpert`` objects bound to hivemind's expert server; ours name the uid, its coordinates (for the
  gate's differentiable logits), its score and the peers that host it.

Shapes: ``scores_BG``: one tensor per grid dimension d, [B, grid_size[d]] (batch, grid coordinates).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Collection, Sequence
from typing import NamedTuple

import hivemind
import torch
from hivemind.p2p import PeerID

from swarm_peer.dht import MAX_GRID_DIMS, MAX_GRID_SIZE, get_expert_successors, validate_expert_prefix
from swarm_peer.errors import ValidationError

__all__ = ["Expert", "MoEBeamSearcher"]

logger = logging.getLogger(__name__)

_MAX_CACHED = 65536  # prefixes a searcher's cache holds before it drops the stale ones


class Expert(NamedTuple):
    """A live expert beam search chose for a sample: its uid, its coordinates on the searched grid, its score (the
    sum of its coordinates' scores), and the peers that declare it, sorted by peer id."""

    uid: str
    coords: tuple[int, ...]
    score: float
    peers: tuple[PeerID, ...]


class MoEBeamSearcher:
    """Finds the best live experts of a grid ``uid_prefix`` + ``grid_size`` for a batch of gate scores.

    ``uid_prefix`` is a grid's name and optionally some leading coordinates, ending in ``"."`` (``"ffn."``,
    ``"ffn.3."``); ``grid_size`` the size of each remaining dimension. ``timeout`` bounds each DHT request (default
    ``swarm_peer.dht.DEFAULT_TIMEOUT``); ``cache_seconds`` how long a prefix's lookup is reused (module docstring).
    Raises ``ValidationError`` for a malformed prefix or grid size. Thread-safe.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        uid_prefix: str,
        grid_size: Sequence[int],
        *,
        timeout: float | None = None,
        cache_seconds: float = 0.0,
    ):
        fixed = validate_expert_prefix(uid_prefix)
        grid_size = tuple(grid_size)
        if not grid_size or len(fixed) + len(grid_size) > MAX_GRID_DIMS:
            raise ValidationError(
                f"{uid_prefix} with {len(grid_size)} more dimensions: uids have 1 to {MAX_GRID_DIMS} coordinates"
            )
        if not all(type(size) is int and 1 <= size <= MAX_GRID_SIZE for size in grid_size):
            raise ValidationError(f"grid sizes must be ints in [1, {MAX_GRID_SIZE}], got {grid_size}")
        self.dht, self.uid_prefix, self.grid_size, self.timeout = dht, uid_prefix, grid_size, timeout
        self.cache_seconds = cache_seconds
        # prefix -> (time.monotonic() of its lookup, what it found: {next coordinate: peers})
        self._cache: dict[str, tuple[float, dict[int, tuple[PeerID, ...]]]] = {}
        self._lock = threading.Lock()

    def uid(self, coords: Sequence[int]) -> str:
        """The uid of the expert at ``coords`` of this grid: ``uid((3, 7)) == "ffn.3.7"`` for the prefix ``"ffn."``."""
        return self.uid_prefix + ".".join(map(str, coords))

    def _prefix(self, coords: tuple[int, ...]) -> str:
        return self.uid_prefix + "".join(f"{coord}." for coord in coords)

    def find_best_experts(
        self,
        scores_BG: Sequence[torch.Tensor],
        k: int,
        *,
        beam_size: int | None = None,
        exclude: Collection[PeerID] = (),
    ) -> list[list[Expert]]:
        """Per sample, up to ``k`` live experts with the highest scores, best first (see the module docstring).

        ``scores_BG``: one tensor [B, grid_size[d]] per grid dimension (no gradient flows through the search).
        ``exclude``: peers to leave out, as if they declared nothing (e.g. peers that just failed a call).
        ``beam_size`` (default ``k``, at least ``k``) is how many prefixes each sample keeps per dimension. A sample
        gets fewer than ``k`` experts only if fewer are live. Raises ``ValidationError`` for scores of the wrong shape
        or a bad ``k``, ``TimeoutError`` if the DHT does not answer a request in time.
        """
        beam_size = k if beam_size is None else beam_size
        exclude = frozenset(exclude)
        if type(k) is not int or k < 1 or type(beam_size) is not int or beam_size < k:
            raise ValidationError(f"need ints 1 <= k <= beam_size, got k={k!r}, beam_size={beam_size!r}")
        if len(scores_BG) != len(self.grid_size):
            raise ValidationError(
                f"need scores for {len(self.grid_size)} grid dimensions, got {len(scores_BG)}"
            )
        batch = scores_BG[0].shape[0] if scores_BG[0].dim() == 2 else -1
        for d, (scores, size) in enumerate(zip(scores_BG, self.grid_size, strict=True)):
            if tuple(scores.shape) != (batch, size):
                raise ValidationError(
                    f"scores of dimension {d} must be [B, {size}], got {list(scores.shape)}"
                )
        scores_lists = [scores.detach().to("cpu", torch.float64).tolist() for scores in scores_BG]

        # per sample, the kept (score, coordinates) of the current level; peers are known at the last level only
        beams: list[list[tuple[float, tuple[int, ...]]]] = [[(0.0, ())] for _ in range(batch)]
        hosts: dict[tuple[int, ...], tuple[PeerID, ...]] = {}
        for d, size in enumerate(self.grid_size):
            prefixes = {coords: self._prefix(coords) for beam in beams for _, coords in beam}
            found = self._successors(list(prefixes.values()))
            if exclude:  # a coordinate only excluded peers declare is dead to this search
                found = {
                    prefix: {c: live for c, peers in coords.items() if (live := _without(peers, exclude))}
                    for prefix, coords in found.items()
                }
            last = d == len(self.grid_size) - 1
            for b, beam in enumerate(beams):
                candidates = (
                    (score + scores_lists[d][b][coord], (*coords, coord))
                    for score, coords in beam
                    for coord in found[prefixes[coords]]
                    if coord < size  # a wider grid under the same name: not ours to choose
                )
                beams[b] = heapq.nlargest(k if last else beam_size, candidates)
            if last:
                hosts = {
                    (*coords, coord): peers
                    for coords, prefix in prefixes.items()
                    for coord, peers in found[prefix].items()
                }
        return [
            [Expert(self.uid(coords), coords, score, hosts[coords]) for score, coords in beam]
            for beam in beams
        ]

    def _successors(self, prefixes: list[str]) -> dict[str, dict[int, tuple[PeerID, ...]]]:
        """``get_expert_successors`` of ``prefixes``, in one DHT request for those the cache does not hold fresh."""
        now = time.monotonic()
        with self._lock:
            found = {
                prefix: entry[1]
                for prefix in prefixes
                if (entry := self._cache.get(prefix)) is not None and now - entry[0] < self.cache_seconds
            }
        missing = [prefix for prefix in prefixes if prefix not in found]
        if missing:
            looked_up = get_expert_successors(self.dht, missing, timeout=self.timeout)
            found.update(looked_up)
            if self.cache_seconds > 0:
                with self._lock:
                    if len(self._cache) > _MAX_CACHED:  # a grid's prefixes are bounded; old ones go first
                        self._cache = {
                            p: e for p, e in self._cache.items() if now - e[0] < self.cache_seconds
                        }
                    self._cache.update((prefix, (now, looked_up[prefix])) for prefix in missing)
        return found


def _without(peers: tuple[PeerID, ...], exclude: frozenset[PeerID]) -> tuple[PeerID, ...]:
    return tuple(peer for peer in peers if peer not in exclude)
