"""Decentralized mixture of experts (Learning@home): an expert grid in the DHT, and gating by beam search over it.

    declare_experts(dht, ["ffn.0.3", "ffn.5.1"], get_dht_time() + 60)    # a peer's experts (swarm_peer.dht)
    searcher = MoEBeamSearcher(dht, "ffn.", grid_size=(8, 8))
    best = searcher.find_best_experts([scores_B8, scores_B8], k=4)       # per sample: 4 live experts, best first

What exists now is the grid and the search; hosting experts and the remote MoE layer come next (issue #21).
"""

from swarm_peer.moe.beam_search import Expert, MoEBeamSearcher

__all__ = ["Expert", "MoEBeamSearcher"]
