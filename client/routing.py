"""Route planning: which peers, in which order, carry hidden states through blocks [start, end).

The DHT holds, per block, the live peers and their spans. A route is a chain of hops ``(peer, a, b)`` whose
ranges tile [start, end) with no gap. Two kinds of routes:

- **Inference** (``inference_route``): a long-lived session, so the route should be fast. It is the shortest
  path over block boundaries ``start..end`` where taking blocks [a, b) on peer p costs
  ``rtt(p) + (b - a) * block_seconds(p) + cache_penalty(p)``: the measured round trip to the peer (pinged
  when unknown or stale, never assumed), its announced per-block compute time (from ``inference_rps``), and a
  penalty when it announces less free cache than the session needs (it would likely refuse).
- **Forward/backward** (``forward_route``): many independent calls, so the load should spread: from each block,
  a peer covering it is drawn with probability proportional to its announced throughput, and takes as many
  blocks as it serves.

Banned peers (``PeerHealth``) are left out. When no live peer covers some block, planning keeps looking until
``route_timeout`` and then raises ``RoutingError`` naming the block.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from dataclasses import dataclass

from hivemind.p2p import PeerID

from swarm_peer.client.health import PeerHealth
from swarm_peer.dht import ServerInfo, online_servers
from swarm_peer.errors import RoutingError
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings

__all__ = ["Hop", "Router"]

logger = logging.getLogger(__name__)

_RETRY_PERIOD = 0.5
_LOOKUP_TIMEOUT = 10.0  # seconds one DHT lookup may take; a slower one is tried again
_UNKNOWN_BLOCK_SECONDS = 0.01  # per-block compute time of a peer that announces no inference_rps
_CACHE_PENALTY_SECONDS = 10.0  # a peer announcing too little free cache: use it only if nothing else covers
_PING_TIMEOUT = 2.0


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) on one peer."""

    peer_id: PeerID
    start: int
    end: int


class Router:
    """Plans routes for one model from the DHT's current records and the client's own measurements."""

    def __init__(
        self,
        runtime: SwarmRuntime,
        model_id: str,
        num_blocks: int,
        settings: ClientSettings,
        adapter: str = "",
    ):
        """``adapter``: route only through peers that serve this adapter (by name), if given."""
        self.runtime, self.model_id, self.num_blocks, self.adapter = runtime, model_id, num_blocks, adapter
        self.route_timeout = settings.route_timeout
        self.health = PeerHealth(
            ban_seconds=settings.ban_seconds,
            max_ban_seconds=settings.max_ban_seconds,
            ping_ttl=settings.ping_ttl,
        )
        self.banned = 0  # banned peers among those serving the blocks of the last plan
        self.lookup_cache_seconds = settings.lookup_cache_seconds
        # (start, end) -> (when, health.setbacks then, the lookup): see _lookup
        self._lookups: dict[tuple[int, int], tuple[float, int, list]] = {}

    def inference_route(self, start: int = 0, end: int | None = None, *, cache_tokens: int = 0) -> list[Hop]:
        """The fastest chain for a session that needs ``cache_tokens`` of cache on every hop."""
        end = self.num_blocks if end is None else end
        return self._plan(start, end, lambda servers: self._shortest_path(servers, start, end, cache_tokens))

    def forward_route(self, start: int = 0, end: int | None = None) -> list[Hop]:
        """A throughput-weighted random chain, for stateless forward/backward calls."""
        end = self.num_blocks if end is None else end
        return self._plan(start, end, lambda servers: _weighted_walk(servers, start, end))

    def _plan(self, start: int, end: int, choose) -> list[Hop]:
        if not 0 <= start < end <= self.num_blocks:
            raise RoutingError(f"blocks {start}:{end} are not inside the model's 0:{self.num_blocks}")
        deadline = time.monotonic() + self.route_timeout
        while True:
            try:  # a lookup that the DHT does not answer in time is tried again, within the route's deadline
                timeout = min(_LOOKUP_TIMEOUT, max(deadline - time.monotonic(), _RETRY_PERIOD))
                servers = self._usable_servers(start, end, timeout)
            except TimeoutError:
                logger.info("Looking up blocks %d:%d of %s timed out", start, end, self.model_id)
                servers = [{} for _ in range(start, end)]
            missing = next((start + i for i, peers in enumerate(servers) if not peers), None)
            if missing is None:
                route = choose(servers)
                logger.debug("Route for blocks %d:%d: %s", start, end, route)
                return route
            if time.monotonic() + _RETRY_PERIOD > deadline:
                with_adapter = f" with adapter {self.adapter!r}" if self.adapter else ""
                raise RoutingError(
                    f"no usable peer serves block {missing} of {self.model_id}{with_adapter} (looked for "
                    f"{self.route_timeout:.0f} s; {self.banned} peers are banned after failures); "
                    "start a peer with --blocks covering it"
                )
            time.sleep(_RETRY_PERIOD)

    def _usable_servers(self, start: int, end: int, timeout: float) -> list[dict[PeerID, ServerInfo]]:
        """Per block of [start, end): the online, unbanned peers that serve it (and the adapter, if any)."""
        servers = self._lookup(start, end, timeout)
        if self.adapter:
            servers = [{p: i for p, i in peers.items() if self.adapter in i.adapters} for peers in servers]
        self.banned = len({peer for peers in servers for peer in peers if self.health.is_banned(peer)})
        return [
            {peer: info for peer, info in peers.items() if not self.health.is_banned(peer)}
            for peers in servers
        ]

    def _lookup(self, start: int, end: int, timeout: float) -> list[dict[PeerID, ServerInfo]]:
        """Who serves each block of [start, end), as the DHT said at most ``lookup_cache_seconds`` ago. A lookup
        costs DHT round trips on every session's way to its first token (51 of the 83 ms the swarm added to a
        32-token prompt's first token on loopback). A lookup is reused only while every block has a peer and no
        peer has failed since; then the next route looks again."""
        key, now = (start, end), time.monotonic()
        cached = self._lookups.get(key)
        if (
            cached is not None
            and now - cached[0] < self.lookup_cache_seconds
            and cached[1] == self.health.setbacks
        ):
            return cached[2]
        setbacks = self.health.setbacks
        servers = online_servers(self.runtime.dht, self.model_id, range(start, end), timeout=timeout)
        if all(servers):
            self._lookups[key] = (now, setbacks, servers)
        return servers

    def measure(self, peers) -> None:
        """Pings the peers whose round trip is unknown or stale; bans those that do not answer."""
        stale = self.health.stale(peers)
        if not stale:
            return
        for peer, seconds in self.runtime.ping(stale, timeout=_PING_TIMEOUT).items():
            if seconds is None:
                logger.info("Peer %s did not answer a ping; banned for %.0f s", peer, self.health.ban(peer))
            else:
                self.health.record_rtt(peer, seconds)

    def _shortest_path(self, servers, start: int, end: int, cache_tokens: int) -> list[Hop]:
        self.measure({peer for peers in servers for peer in peers})
        infos: dict[PeerID, ServerInfo] = {}
        for peers in servers:
            infos.update(peers)
        jitter = {peer: 1 + 0.01 * random.random() for peer in infos}  # spreads clients over equal peers
        best = {start: 0.0}
        previous: dict[int, Hop] = {}
        heap = [(0.0, start)]
        while heap:
            cost, a = heapq.heappop(heap)
            if a == end:
                break
            if cost > best[a]:
                continue
            for peer, info in servers[a - start].items():
                rtt = self.health.rtt(peer)
                if rtt is None:  # did not answer the ping: banned just now
                    continue
                entry = cost + (rtt + _penalty(info, cache_tokens)) * jitter[peer]
                per_block = _block_seconds(info)
                for b in range(a + 1, min(info.end_block, end) + 1):
                    candidate = entry + (b - a) * per_block
                    if candidate < best.get(b, math.inf):
                        best[b] = candidate
                        previous[b] = Hop(peer, a, b)
                        heapq.heappush(heap, (candidate, b))
        if end not in previous:
            raise RoutingError(f"no reachable chain of peers covers blocks {start}:{end} of {self.model_id}")
        route, block = [], end
        while block != start:
            route.append(previous[block])
            block = previous[block].start
        return route[::-1]


def _block_seconds(info: ServerInfo) -> float:
    """Seconds one inference step spends in each block of this peer, from what it announces."""
    if info.inference_rps > 0:
        return 1.0 / (info.inference_rps * (info.end_block - info.start_block))
    return _UNKNOWN_BLOCK_SECONDS


def _penalty(info: ServerInfo, cache_tokens: int) -> float:
    return _CACHE_PENALTY_SECONDS if info.cache_tokens_left < cache_tokens else 0.0


def _weighted_walk(servers, start: int, end: int) -> list[Hop]:
    route, block = [], start
    while block < end:
        peers = list(servers[block - start].items())
        weights = [info.throughput or 1.0 for _, info in peers]
        peer, info = random.choices(peers, weights=weights)[0]
        stop = min(info.end_block, end)
        route.append(Hop(peer, block, stop))
        block = stop
    return route
