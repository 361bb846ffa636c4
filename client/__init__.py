"""The client side: routing, remote blocks, inference sessions, and the distributed causal LM."""

from swarm_peer.client.model import DistributedModelForCausalLM, RemoteCache, RemoteModel
from swarm_peer.client.remote import RemoteSequential
from swarm_peer.client.routing import Hop, Router
from swarm_peer.client.session import InferenceSession
from swarm_peer.protocols.runtime import SwarmRuntime

__all__ = [
    "DistributedModelForCausalLM",
    "RemoteCache",
    "RemoteModel",
    "RemoteSequential",
    "Hop",
    "Router",
    "SwarmRuntime",
    "InferenceSession",
]
