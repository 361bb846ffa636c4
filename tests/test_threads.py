"""Thread choice for small steps (swarm_peer.threads), and adapters that exist only while a request computes."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.models import resolve_checkpoint
from swarm_peer.peer import adapters
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.metrics import scrape
from swarm_peer.peer.throughput import _decode_steps, decode_threads
from swarm_peer.protocols.extras import Lora
from swarm_peer.threads import cached_fastest_threads, compute_threads, fastest_threads, running_peers

from .conftest import free_port, wait_until

ALL = torch.get_num_threads()
needs_threads = pytest.mark.skipif(ALL < 2, reason="needs at least 2 torch threads to choose from")


def test_compute_threads_sets_and_restores():
    before = torch.get_num_threads()
    with compute_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with compute_threads(None):
        assert torch.get_num_threads() == before


@needs_threads
def test_fastest_threads_keeps_all_threads_only_when_they_clearly_win():
    # steps whose duration depends on the thread count they run with (sleeps: the choice, not this machine's load)
    def step(one: float, all_: float):
        return lambda: time.sleep(one if torch.get_num_threads() == 1 else all_)

    assert fastest_threads(step(0.004, 0.004)) == 1  # no gain: leave the other cores free
    assert fastest_threads(step(0.0042, 0.004)) == 1  # within the margin
    assert fastest_threads(step(0.012, 0.004)) == ALL  # control: a clear gain


@contextlib.contextmanager
def _hogs(n: int):
    """``n`` processes that spin, paused (SIGSTOP) until ``resume``; killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)

    def resume():
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)  # scheduled

    try:
        yield resume
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


class _Burst:
    """``step``, with the hogs resumed from its ``from_call``-th call on: load that starts while a probe runs."""

    def __init__(self, step, resume, from_call: int):
        self.step, self.resume, self.from_call, self.calls = step, resume, from_call, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.from_call:
            self.resume()
        self.step()


def _one_setting_after_the_other(step, repeats: int = 5, margin: float = 1.1) -> int:
    """The control: each setting timed in one stretch (a warm-up, then the median of ``repeats``)."""
    medians = {}
    for n in (1, ALL):
        with compute_threads(n):
            step()
            medians[n] = statistics.median(_seconds(step) for _ in range(repeats))
    return 1 if medians[1] <= margin * medians[ALL] else ALL


def _seconds(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def wide_span(tmp_path_factory) -> BlockSpan:
    """One llama block of width 1024: on this project's 2-core machine a decode step takes 41 ms per 16 steps on one
    thread and 26 ms on two, so the choice matters."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=16, vocab_size=256
    )
    path = tmp_path_factory.mktemp("wide-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return BlockSpan(resolve_checkpoint(str(path)), 0, 1)


@needs_threads
def test_load_that_starts_during_the_probe_does_not_change_the_choice(wide_span, tmp_path, monkeypatch):
    step = _decode_steps(wide_span)
    with torch.inference_mode():
        assert fastest_threads(step) == ALL, "precondition: all threads are faster on a quiet machine"
        with _hogs(ALL) as resume:  # the hogs spin from the second half of the probe's calls on
            # the probe: 2 warm-ups and 7 rounds of both settings
            assert fastest_threads(_Burst(step, resume, from_call=9)) == ALL
        with _hogs(ALL) as resume:  # control: the same load over the second setting's stretch blames it
            assert _one_setting_after_the_other(_Burst(step, resume, from_call=7)) == 1
    # cached per model and dtype: a restart takes the choice without measuring
    monkeypatch.setenv("SWARM_PEER_CACHE", str(tmp_path))
    assert decode_threads(wide_span) == ALL
    calls = []
    assert cached_fastest_threads(f"decode|{wide_span.checkpoint.model_id}|float32", calls.append) == ALL
    assert not calls, "the cached choice is used without measuring"
    assert cached_fastest_threads("decode|another model|float32", lambda: calls.append(1)) in (1, ALL)
    assert calls, "another model is measured"


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


@pytest.mark.timeout(120)
def test_peers_on_one_machine_divide_its_cores_and_take_them_back(tiny_checkpoints):
    """Two peers on this machine take half of its cores each; once one is gone, the other takes them all (the
    control: a peer alone takes all). Read from each peer's compute_threads gauge."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: nothing to divide")
    if running_peers():
        pytest.skip("other peers run on this machine: their share is not this test's to check")
    ports = [free_port(), free_port()]
    args = ["--throughput", "100", "--rebalance-period", "0"]

    def threads(port: int) -> float:
        return scrape(f"http://127.0.0.1:{port}/metrics")[("swarm_peer_peer_compute_threads", ())]

    with LocalSwarm(tiny_checkpoints["llama"], spans=[], peer_args=args) as swarm:
        first = swarm.add_peer(0, 4, extra_args=["--metrics-port", str(ports[0])])
        assert running_peers() == 1 and threads(ports[0]) == cores  # the control: alone, all of them
        second = swarm.add_peer(0, 4, extra_args=["--metrics-port", str(ports[1])])
        assert running_peers() == 2
        share = cores // 2
        assert wait_until(lambda: threads(ports[0]) == threads(ports[1]) == share, timeout=30)
        second.terminate(15)
        assert wait_until(lambda: running_peers() == 1 and threads(ports[0]) == cores, timeout=30)
        assert first.process.poll() is None
