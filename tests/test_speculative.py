"""Speculative decoding through the swarm: ``generate(prompt_lookup_num_tokens=k)`` or ``assistant_model=draft``
proposes tokens, the swarm verifies them in one step, and every hop rolls its cache back to the accepted prefix
(``RemoteCache.crop``, ``InferenceSession.rollback``; the peer crops when a step's mask is shorter than its cache).

A tiny random Llama's 4 blocks on 2 peers; the draft is another random tiny Llama (it proposes mostly wrong tokens,
so most steps roll back). Oracles: local transformers greedy, and the target's own next-token distribution.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, LlamaConfig

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client.model import RemoteCache
from swarm_peer.errors import ValidationError

from .conftest import SMALL_CONFIG, client_settings, reference_model

NEW_TOKENS = 16
DRAWS, TEMPERATURE = (
    300,
    0.05,
)  # random tiny models have flat logits: sharpen them, a few tokens carry most mass


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints):
    with LocalSwarm(tiny_checkpoints["llama"], [(0, 2), (2, 4)], peer_args=["--throughput", "100"]) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(swarm.model, settings=client_settings(swarm))
        try:
            yield swarm, model
        finally:
            model.shutdown()


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, **SMALL_CONFIG))
    return model.eval()


def _prompts() -> list[torch.Tensor]:
    """Repetitive prompts (prompt lookup finds continuations in them) and random ones."""
    generator = torch.Generator().manual_seed(0)
    repeated = [torch.randint(3, 100, (1, 4), generator=generator).repeat(1, 3) for _ in range(3)]
    return repeated + [torch.randint(3, 100, (1, n), generator=generator) for n in (5, 9)]


def test_speculative_greedy_gives_plain_greedys_tokens_and_rolls_back(swarm, draft):
    swarm, model = swarm
    local = reference_model(swarm.model)
    rolled_back = 0
    for prompt in _prompts():
        want = local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        for speculation in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": draft}):
            with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS + 32) as session:
                got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **speculation)
                rolled_back += session.rolled_back
            assert torch.equal(got, want), (speculation, got, want)
    assert rolled_back > 0  # proposals were refused, and the hops dropped them


def test_without_rolling_back_the_hops_speculation_breaks(swarm, draft, monkeypatch):
    """The control: a remote cache that keeps the refused proposals (no crop) does not give greedy's tokens."""
    swarm, model = swarm
    monkeypatch.setattr(RemoteCache, "crop", lambda self, tokens_to_remove: None)
    prompt = _prompts()[-1]
    want = reference_model(swarm.model).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    try:
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=draft)
    except ValidationError:  # or it runs out of the session's length
        return
    assert not torch.equal(got, want)


def test_speculative_sampling_keeps_the_targets_distribution(swarm, draft):
    """The first new token of speculative sampling (each draw: the draft proposes, the swarm accepts it with
    probability min(1, p/q) or resamples) follows the target's distribution: chi-square p > 0.01 over many draws.
    The control: the draft's own samples, which acceptance without the rejection step would give, fail it."""
    swarm, model = swarm
    prompt = _prompts()[-1]
    with torch.no_grad():
        target = (reference_model(swarm.model)(prompt).logits[0, -1].double() / TEMPERATURE).softmax(-1)
        proposed = (draft(prompt).logits[0, -1].double() / TEMPERATURE).softmax(-1)
    torch.manual_seed(0)
    kwargs = dict(max_new_tokens=2, do_sample=True, temperature=TEMPERATURE, top_k=0)
    swarm_draws = [
        int(model.generate(prompt, assistant_model=draft, **kwargs)[0, prompt.shape[1]]) for _ in range(DRAWS)
    ]
    draft_draws = torch.multinomial(proposed, DRAWS, replacement=True).tolist()

    def p_value(draws: list[int]) -> float:
        # tokens expected at least 5 times are bins of their own; the rest one bin
        big = (target * DRAWS >= 5).nonzero().flatten().tolist()
        expected = [float(target[t] * DRAWS) for t in big] + [float((1 - target[big].sum()) * DRAWS)]
        observed = [draws.count(t) for t in big] + [sum(t not in big for t in draws)]
        if expected[-1] < 1e-9:
            expected, observed = expected[:-1], observed[:-1]
        expected = [e * sum(observed) / sum(expected) for e in expected]  # the same total, to the last bit
        return chisquare(observed, expected).pvalue

    assert p_value(swarm_draws) > 0.01
    assert p_value(draft_draws) < 0.01  # the control


class _KillFirstHop:
    """A generate() streamer that kill -9s the session's first peer once ``puts`` answers came."""

    def __init__(self, model, swarm: LocalSwarm, puts: int):
        self.model, self.swarm, self.puts, self.killed = model, swarm, puts, None

    def put(self, value) -> None:
        self.puts -= 1
        if self.puts == 0:
            self.killed = self.model._active_session.route[0].peer_id
            peer = next(p for p in self.swarm.peers if p.peer_id == str(self.killed))
            os.killpg(peer.process.pid, signal.SIGKILL)
            peer.process.wait(10)

    def end(self) -> None:
        pass


@pytest.mark.timeout(240)
def test_a_peer_killed_during_speculative_decoding_fails_over_by_replay(tiny_checkpoints):
    """The replay of a replacement peer takes only the accepted tokens: the rolled-back proposals are gone from what
    the client keeps, so the tokens stay greedy's."""
    path = tiny_checkpoints["llama"]
    prompt = _prompts()[0]
    want = reference_model(path).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    with LocalSwarm(path, [(0, 4), (0, 4)], peer_args=["--throughput", "100"]) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(
            path, settings=client_settings(swarm, retry_timeout=60)
        )
        try:
            streamer = _KillFirstHop(model, swarm, puts=3)
            with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS + 8) as session:
                got = model.generate(
                    prompt,
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    prompt_lookup_num_tokens=4,
                    streamer=streamer,
                )
                assert streamer.killed is not None and streamer.killed not in [
                    hop.peer_id for hop in session.route
                ]
                assert session.rolled_back > 0  # the replay went on from a rolled-back history
            assert torch.equal(got, want)
        finally:
            model.shutdown()
