"""Decentralized mixture of experts (Learning@home): an expert grid in the DHT, gating by beam search over it,
experts hosted by peers (``swarm-peer join --experts``) and called from anywhere.

    declare_experts(dht, ["ffn.0.3", "ffn.5.1"], get_dht_time() + 60)    # a peer's experts (swarm_peer.dht)
    searcher = MoEBeamSearcher(dht, "ffn.", grid_size=(8, 8))
    best = searcher.find_best_experts([scores_B8, scores_B8], k=4)       # per sample: 4 live experts, best first
    y0, y1 = call_experts(runtime, [(peer, "ffn.0.3"), (peer, "ffn.5.1")], [x0_BD, x1_BD])   # differentiable
    layer = RemoteMixtureOfExperts(in_features=512, grid_size=(8, 8), uid_prefix="ffn.", k_best=4,
                                   initial_peers=[maddr])                # or SwarmRuntime(...) as the first argument

Expert types (``ffn``, ``transformer``, and those registered with ``register_expert_type``) are in ``experts``; the
peer side (optimizers, checkpoints, RPCs) in ``swarm_peer.peer``; the layer that mixes them in ``mixture``.
"""

from swarm_peer.moe.beam_search import Expert, MoEBeamSearcher
from swarm_peer.moe.experts import (
    ExpertType,
    FeedForwardExpert,
    TransformerExpert,
    create_expert,
    expand_grid,
    expert_type,
    register_expert_type,
)
from swarm_peer.moe.mixture import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from swarm_peer.moe.remote_expert import RemoteExpert, call_experts

__all__ = [
    "Expert",
    "ExpertType",
    "FeedForwardExpert",
    "MoEBeamSearcher",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "TransformerExpert",
    "call_experts",
    "create_expert",
    "expand_grid",
    "expert_type",
    "register_expert_type",
]
