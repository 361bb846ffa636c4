"""Batching across sessions (``peer.compute``, ``BlockSpan.decode_batch``): single-token steps of sessions that
are ready together run as one forward over their separate caches, and give each session what it alone would get;
a long prompt beside them is computed in chunks (``BlockHandlers._prefill``), and gives what it would in one go.

A tiny random Llama's 4 blocks: peer A serves 0:2 for every session (and counts its batches on /metrics), then
peers B1 and B2 serve 2:4; two client models route through B1 and through B2. Oracle: local transformers greedy.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from hivemind.p2p import PeerID

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.peer.metrics import scrape

from .conftest import client_settings, free_port, reference_model

# 8 sessions: prompts of different lengths (one long enough to be computed in chunks while the others decode),
# some ending early, started at different times
PROMPT_TOKENS = [3, 9, 5, 200, 2, 7, 4, 10]
NEW_TOKENS = [16, 6, 16, 10, 16, 5, 16, 12]
ON_B2 = (6, 7)  # the sessions of the second client, whose peer B2 dies mid-generation
KILL_AFTER = 4  # tokens of session 6 before B2 is killed
PEER_ARGS = ["--rebalance-period", "0", "--announce-period", "1"]


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints):
    port = free_port()
    with LocalSwarm(tiny_checkpoints["llama"], spans=[], peer_args=PEER_ARGS) as swarm:
        a = swarm.add_peer(0, 2, extra_args=["--throughput", "1000", "--metrics-port", str(port)], wait=False)
        b1 = swarm.add_peer(2, 4, extra_args=["--throughput", "100"], wait=False)
        b2 = swarm.add_peer(2, 4, extra_args=["--throughput", "100"], wait=False)
        for peer in swarm.peers:
            peer.wait_ready(swarm.start_timeout)
        yield swarm, port, a, b1, b2


def _batched(port: int) -> float:
    return scrape(f"http://127.0.0.1:{port}/metrics").get(("swarm_peer_peer_batched_steps", ()), 0.0)


def _prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 100, (1, n), generator=generator) for n in PROMPT_TOKENS]


def _client(swarm: LocalSwarm, avoid: str, ban_seconds: float) -> DistributedModelForCausalLM:
    """A client whose routes leave out peer ``avoid`` for ``ban_seconds``: its sessions take the other peer of 2:4."""
    model = DistributedModelForCausalLM.from_pretrained(
        swarm.model, settings=client_settings(swarm, retry_timeout=60, ban_seconds=ban_seconds)
    )
    model.router.health.ban(PeerID.from_base58(avoid))
    return model


class _KillAfter:
    """A generate() streamer that kill -9s ``victim`` (its whole process group) after ``tokens`` new tokens."""

    def __init__(self, victim, tokens: int):
        self.victim, self.tokens, self.calls, self.killed = victim, tokens, 0, False

    def put(self, value) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == self.tokens + 1:
            os.killpg(self.victim.process.pid, signal.SIGKILL)
            self.victim.process.wait(10)
            self.killed = True

    def end(self) -> None:
        pass


@pytest.mark.timeout(300)
def test_eight_concurrent_sessions_batch_and_give_the_tokens_of_sequential_ones(swarm):
    swarm, port, a, b1, b2 = swarm
    prompts, local = _prompts(), reference_model(swarm.model)
    want = []
    with torch.no_grad():
        for prompt, n in zip(prompts, NEW_TOKENS, strict=True):
            out = local.generate(
                prompt, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            want.append((out.sequences, torch.cat(out.logits)))
    models = [_client(swarm, avoid=b2.peer_id, ban_seconds=3600)]
    try:
        # the control: sessions one after another never batch, and give the oracle's tokens too
        for i in (0, 1):
            got = models[0].generate(prompts[i], max_new_tokens=NEW_TOKENS[i], do_sample=False)
            assert torch.equal(got, want[i][0])
        assert _batched(port) == 0

        # the second client's sessions start on B2 (B1 banned a moment) and fail over to B1 once B2 dies
        models.append(_client(swarm, avoid=b1.peer_id, ban_seconds=2))
        results: dict[int, object] = {}
        killer = _KillAfter(b2, KILL_AFTER)

        def generate(i: int) -> None:
            time.sleep(0.03 * i)
            model = models[1] if i in ON_B2 else models[0]
            try:
                results[i] = model.generate(
                    prompts[i],
                    max_new_tokens=NEW_TOKENS[i],
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    streamer=killer if i == ON_B2[0] else None,
                )
            except Exception as e:  # reported below, with the others' results
                results[i] = e

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert killer.killed
        for i, (sequences, logits) in enumerate(want):
            got = results[i]
            assert not isinstance(got, Exception), f"session {i}: {got!r}"
            assert torch.equal(got.sequences, sequences), f"session {i}: {got.sequences} != {sequences}"
            assert (torch.cat(got.logits) - logits).abs().max() <= 1e-4, f"session {i}"
        assert _batched(port) > 0  # steps of several sessions did run as one forward on A
        assert models[1].router.health.is_banned(
            PeerID.from_base58(b2.peer_id)
        )  # the sessions on B2 failed over to B1
    finally:
        for model in models:
            model.shutdown()
