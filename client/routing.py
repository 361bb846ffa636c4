"""Route planning: which peers, in which order, carry hidden states through blocks [start, end).

The DHT holds, per block, the live peers and their spans. A route is a chain of hops ``(peer, a, b)`` whose
ranges tile [start, end) with no gap. We pick the chain with the fewest hops (greedy furthest reach from each
block is optimal for interval covering); among peers that reach equally far, the one with the lowest measured
round-trip time wins, then a random one, which spreads clients over equal peers.

Peers that just failed are left out for a while (``ban``), so a retry does not walk into the same error.
When no live peer covers some block, ``plan`` keeps looking until ``route_timeout`` and then raises
``RoutingError`` naming the block.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from hivemind.p2p import PeerID

from swarm_peer.dht import online_servers
from swarm_peer.errors import RoutingError

__all__ = ["Hop", "Router"]

logger = logging.getLogger(__name__)

_RETRY_PERIOD = 0.5
_BAN_SECONDS = 15.0


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) on one peer."""

    peer_id: PeerID
    start: int
    end: int


class Router:
    """Plans routes for one model from the DHT's current records."""

    def __init__(self, dht, model_id: str, num_blocks: int, *, route_timeout: float):
        self.dht, self.model_id, self.num_blocks, self.route_timeout = (
            dht,
            model_id,
            num_blocks,
            route_timeout,
        )
        self.latency: dict[PeerID, float] = {}
        self._banned_until: dict[PeerID, float] = {}

    def record_latency(self, peer_id: PeerID, seconds: float) -> None:
        """Exponential moving average of measured round trips."""
        old = self.latency.get(peer_id)
        self.latency[peer_id] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def ban(self, peer_id: PeerID, seconds: float = _BAN_SECONDS) -> None:
        self._banned_until[peer_id] = time.monotonic() + seconds

    def plan(self, start: int = 0, end: int | None = None) -> list[Hop]:
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.route_timeout
        while True:
            servers = online_servers(self.dht, self.model_id, range(start, end))
            now = time.monotonic()
            route, missing = self._cover(servers, start, end, now)
            if route is not None:
                logger.debug("Route for blocks %d:%d: %s", start, end, route)
                return route
            if time.monotonic() + _RETRY_PERIOD > deadline:
                raise RoutingError(
                    f"no live peer serves block {missing} of {self.model_id} "
                    f"(looked for {self.route_timeout:.0f} s); start a peer with --blocks covering it"
                )
            time.sleep(_RETRY_PERIOD)

    def _cover(self, servers, start: int, end: int, now: float) -> tuple[list[Hop] | None, int]:
        route: list[Hop] = []
        block = start
        while block < end:
            candidates = [
                (peer_id, min(info.end_block, end))
                for peer_id, info in servers[block - start].items()
                if info.start_block <= block < info.end_block and self._banned_until.get(peer_id, 0) <= now
            ]
            if not candidates:
                return None, block
            reach = max(stop for _, stop in candidates)
            best = [peer_id for peer_id, stop in candidates if stop == reach]
            peer_id = min(best, key=lambda p: (self.latency.get(p, 0.0), random.random()))
            route.append(Hop(peer_id, block, reach))
            block = reach
        return route, end
