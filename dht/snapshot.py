"""A snapshot of the models a swarm serves, as views of it show them (``swarm-peer status``, the health page).

``model_status`` folds the records of every block of a model (``get_block_servers``) and the peers that did not
answer a ping into one ``ModelStatus``: each peer once, in its best state, and per block how many reachable ONLINE
peers serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.p2p import PeerID

from swarm_peer.dht.keys import block_ranges
from swarm_peer.dht.records import ServerInfo, ServerState

__all__ = ["MAX_MODELS", "PING_TIMEOUT", "ModelStatus", "model_status", "online_peers"]

MAX_MODELS = 16  # models a view looks up (anyone can list models: the list is not trusted)
PING_TIMEOUT = 2.0  # seconds an ONLINE peer has to answer its info RPC before a view shows it UNREACHABLE


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model in the swarm.

    ``peers``: one (peer id, record) per peer that announced any block, the record in its best state (a peer
    that moved keeps OFFLINE records on the blocks it left until they expire); sorted by span.
    ``online``: per block, how many reachable peers announced it as ONLINE.
    ``unreachable``: the ONLINE peers that did not answer a ping.
    """

    model_id: str
    num_blocks: int
    peers: tuple[tuple[PeerID, ServerInfo], ...]
    online: tuple[int, ...]
    unreachable: frozenset[PeerID] = frozenset()
    name: str = ""  # the readable name peers list the model under (never part of its id)

    @property
    def uncovered(self) -> tuple[tuple[int, int], ...]:
        """[start, end) ranges of blocks with no ONLINE peer."""
        return block_ranges(block for block, count in enumerate(self.online) if count == 0)

    @property
    def covered(self) -> bool:
        """Whether every block has an ONLINE peer."""
        return not self.uncovered


def model_status(
    model_id: str,
    num_blocks: int,
    servers: list[dict[PeerID, ServerInfo]],
    unreachable: frozenset[PeerID] = frozenset(),
    name: str = "",
) -> ModelStatus:
    """Summarize the records found for each block of ``model_id`` (``get_block_servers``); peers in
    ``unreachable`` cover nothing."""
    best: dict[PeerID, ServerInfo] = {}
    for block_servers in servers:
        for peer_id, info in block_servers.items():
            if peer_id not in best or info.state > best[peer_id].state:
                best[peer_id] = info
    peers = sorted(
        best.items(), key=lambda item: (item[1].start_block, item[1].end_block, item[0].to_base58())
    )
    online = tuple(
        sum(
            info.state == ServerState.ONLINE and peer_id not in unreachable for peer_id, info in block.items()
        )
        for block in servers
    )
    return ModelStatus(model_id, num_blocks, tuple(peers), online, frozenset(unreachable & best.keys()), name)


def online_peers(found: dict[str, list[dict[PeerID, ServerInfo]]]) -> set[PeerID]:
    """The peers that announce any block of any model of ``found`` (model id -> ``get_block_servers``) ONLINE: those
    a view pings to tell the unreachable ones."""
    return {
        peer_id
        for servers in found.values()
        for block in servers
        for peer_id, info in block.items()
        if info.state == ServerState.ONLINE
    }
