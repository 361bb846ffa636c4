"""A hosting peer: block loading, KV-cache budget, RPC handlers, lifecycle."""

from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.server import Peer

__all__ = ["BlockSpan", "Peer"]
