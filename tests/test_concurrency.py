"""Many generations at once through one model object: each call its own session, all exact, no peer overrun."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm

from .conftest import client_settings, kv_cache_mb, reference_model

PROMPT_TOKENS, NEW_TOKENS, THREADS = 6, 10, 16
SESSION_TOKENS = PROMPT_TOKENS + NEW_TOKENS
# two peers whose caches hold 8 sessions together: 16 at once cannot all fit, so some wait (busy) and go on later


@pytest.mark.timeout(300)
def test_sixteen_threads_generate_through_one_model_object(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    prompts = [
        torch.randint(3, 128, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(i))
        for i in range(THREADS)
    ]
    ref = reference_model(path)
    want = [ref.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False) for p in prompts]
    peer_args = ["--cache-mb", str(kv_cache_mb(path, 4 * SESSION_TOKENS)), "--client-cache-share", "1"]
    with LocalSwarm(path, [(0, 4), (0, 4)], peer_args=peer_args) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(
            path, settings=client_settings(swarm, ban_seconds=0.5)
        )
        try:
            with ThreadPoolExecutor(THREADS) as pool:
                got = list(
                    pool.map(lambda p: model.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False), prompts)
                )
        finally:
            model.shutdown()
        alive = [peer.process.poll() is None for peer in swarm.peers]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"thread {i}: {g.tolist()} != {w.tolist()}"
    assert all(alive), "a peer died"
