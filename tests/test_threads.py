"""Thread choice for small steps (swarm_peer.threads), and adapters that exist only while a request computes."""

from __future__ import annotations

import time

import pytest
import torch

from swarm_peer.models import resolve_checkpoint
from swarm_peer.peer import adapters
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.protocols.extras import Lora
from swarm_peer.threads import compute_threads, fastest_threads


def test_compute_threads_sets_and_restores():
    before = torch.get_num_threads()
    with compute_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with compute_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 torch threads to choose from")
def test_fastest_threads_keeps_all_threads_only_when_they_clearly_win():
    # steps whose duration depends on the thread count they run with (sleeps: the choice, not this machine's load)
    def step(one: float, all_: float):
        return lambda: time.sleep(one if torch.get_num_threads() == 1 else all_)

    assert fastest_threads(step(0.004, 0.004)) == 1  # no gain: leave the other cores free
    assert fastest_threads(step(0.0042, 0.004)) == 1  # within the margin
    assert fastest_threads(step(0.012, 0.004)) == torch.get_num_threads()  # control: a clear gain


def test_adapters_hook_only_the_request_that_applies_them(tiny_checkpoints):
    span = BlockSpan(resolve_checkpoint(tiny_checkpoints["llama"]), 0, 2)
    x_BTD = torch.randn(1, 5, span.hidden_size)
    mask_BS = torch.ones(1, 5, dtype=torch.long)
    positions_BT = torch.arange(5)[None]
    layers = span.layers_of(0, 2)
    q = layers[1].self_attn.q_proj
    lora = Lora.of(
        ["1.self_attn.q_proj"], [2.0], [torch.randn(4, q.in_features)], [torch.randn(q.out_features, 4)]
    )
    prompts_NBPD = torch.randn(2, 1, 3, span.hidden_size)

    def run():
        with torch.inference_mode():
            return span.forward(x_BTD, mask_BS, positions_BT, 0, 2)

    plain = run()
    with adapters.applying(layers, [lora]):
        with_lora = run()
    with adapters.applying(layers, [], prompts_NBPD):
        with_prompts = run()
    after = run()
    assert not torch.allclose(with_lora, plain) and not torch.allclose(with_prompts, plain)
    torch.testing.assert_close(after, plain, atol=0, rtol=0)
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks for layer in span.layers for m in layer.modules()
    )
