"""SWARM training (``join --train``, ``client.stages``): a tiny random Llama's 4 blocks as 2 trainable stages on real
peer processes, a trainer with the embeddings and head, checked against one local transformers model.

Oracle: the same checkpoint in transformers, the same tokens, the batch's mean loss. The stages' accumulated
gradients are read back through their state (``swarm.v1.stage_state``): after its first AdamW step a stage's first
moment is exactly (1 - beta1) x its gradient, and its second (1 - beta2) x the gradient squared.
"""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client import DistributedModelForCausalLM
from swarm_peer.dht import online_servers, run_model_id
from swarm_peer.models import resolve_checkpoint
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.stage import TrainableStage
from swarm_peer.protocols import rpc, swarm_pb2
from swarm_peer.protocols.stage_state import fetch_state
from swarm_peer.settings import StageSettings

from .conftest import client_settings, wait_until

B, T, MICRO = 4, 8, 2  # a batch of 4 sequences of 8 tokens, in 2 micro-batches of 2
STAGES = [(0, 2), (2, 4)]
PEER_ARGS = [
    "--throughput",
    "1000",
    "--announce-period",
    "1",
    "--compute-threads",
    "1",
    "--rebalance-period",
    "0",
]


AVERAGING = ["--average-every", "8", "--averaging-timeout", "10"]


def _stage_args(run: str, *extra: str) -> list[str]:
    return ["--train", "--run-id", run, "--target-batch-size", str(B), "--lr", "0.01", *extra]


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    with LocalSwarm(path, spans=[], peer_args=PEER_ARGS) as swarm:
        for run, extra in (("exact", []), ("int8", ["--compression", "8bit"])):
            for start, end in STAGES:
                swarm.add_peer(start, end, extra_args=_stage_args(run, *extra), wait=False)
        for _ in range(2):  # one stage of all 4 blocks, on two peers that average every 8 samples
            swarm.add_peer(0, 4, extra_args=_stage_args("avg", *AVERAGING), wait=False)
        for peer in swarm.peers:
            peer.wait_ready(swarm.start_timeout)
        yield swarm


def _trainer(swarm, run: str, compression: str = "none") -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        swarm.model, settings=client_settings(swarm), run_id=run, compression=compression
    )


def _batch() -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))


def _loss(model, ids_BT: torch.Tensor) -> float:
    """The batch's mean loss, backward micro-batch by micro-batch, each weighed by its share of the batch."""
    total = 0.0
    for ids in ids_BT.split(MICRO):
        loss = model(input_ids=ids, labels=ids).loss * (len(ids) / len(ids_BT))
        loss.backward()
        total += loss.item()
    return total


def _stage_states(model, swarm_model_id: str, local):
    """Each stage's state, from one of its peers; ``local``: a local model of the checkpoint (the stages' shapes)."""
    runtime = model.swarm
    servers = online_servers(runtime.dht, swarm_model_id, [start for start, _ in STAGES])
    states = []
    for (start, end), block_servers in zip(STAGES, servers, strict=True):
        peer_id = next(
            p for p, info in block_servers.items() if (info.start_block, info.end_block) == (start, end)
        )
        span = swarm_pb2.Span(model_id=swarm_model_id, start_block=start, end_block=end)
        shapes = {name: tuple(p.shape) for name, p in local.model.layers[start:end].named_parameters()}
        states.append(runtime.run(fetch_state(runtime.p2p, peer_id, span, shapes, timeout=30)))
    return states


@pytest.mark.timeout(300)
def test_gradients_through_two_stages_equal_one_local_model(swarm):
    ids = _batch()
    local = AutoModelForCausalLM.from_pretrained(swarm.model)
    local_loss = _loss(local, ids)
    model = _trainer(swarm, "exact")
    try:
        loss = _loss(model, ids)
        assert abs(loss - local_loss) < 1e-5
        for name, p in model.named_parameters():  # the trainer's embeddings, final norm and head
            torch.testing.assert_close(p.grad, local.get_parameter(name).grad, atol=1e-5, rtol=0)
        # each stage has stepped once on the batch's 4 samples: its moments hold the gradients it accumulated
        states = _stage_states(model, run_model_id("exact"), local)
        for (start, end), state in zip(STAGES, states, strict=True):
            assert state.steps == 1
            layers = local.model.layers[start:end]
            for name, m, v in zip(state.names, state.exp_avg, state.exp_avg_sq, strict=True):
                grad = layers.get_parameter(name).grad
                torch.testing.assert_close(m, 0.1 * grad, atol=1e-6, rtol=0)
                torch.testing.assert_close(v, 0.001 * grad**2, atol=1e-8, rtol=1e-3)
    finally:
        model.shutdown()


@pytest.mark.timeout(300)
def test_with_8bit_compression_gradients_stay_close(swarm):
    ids = _batch()
    local = AutoModelForCausalLM.from_pretrained(swarm.model)
    local_loss = _loss(local, ids)
    model = _trainer(swarm, "int8", compression="8bit")
    try:
        loss = _loss(model, ids)
        assert abs(loss - local_loss) <= 0.01 * abs(local_loss), (loss, local_loss)
        grads = [p.grad.flatten() for p in model.parameters()]
        expected = [local.get_parameter(name).grad.flatten() for name, _ in model.named_parameters()]
        states = _stage_states(model, run_model_id("int8"), local)
        for (start, end), state in zip(STAGES, states, strict=True):
            layers = local.model.layers[start:end]
            grads += [m.flatten() / 0.1 for m in state.exp_avg]
            expected += [layers.get_parameter(name).grad.flatten() for name in state.names]
        cosine = torch.nn.functional.cosine_similarity(torch.cat(grads), torch.cat(expected), dim=0)
        assert cosine >= 0.99, cosine
        # the control: hidden states and gradients did travel in 8 bits (not bit-exact, as without compression)
        assert not torch.allclose(torch.cat(grads), torch.cat(expected), atol=1e-6, rtol=0)
    finally:
        model.shutdown()


def _samples(seed: int, n: int = 4) -> tuple[torch.Tensor, ...]:
    """A backward call's tensors for 4 blocks of width 64: hidden states, mask, positions, output gradients."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, T, 64, generator=g),
        torch.ones(n, T, dtype=torch.long),
        torch.arange(T).expand(n, T),
        torch.randn(n, T, 64, generator=g),
    )


@pytest.mark.timeout(300)
def test_a_stages_peers_average_to_identical_weights_and_a_joiner_takes_them(swarm):
    """Two peers of one stage each take two AdamW steps on other samples (8 each: --average-every), then average:
    both hold the mean of what each had (computed here by local copies of the stage), where they differed. A third
    peer that joins the stage then downloads its state and holds the same weights, at the same step."""
    settings = StageSettings(run_id="avg", lr=0.01, target_batch_size=B)
    span = lambda: BlockSpan(resolve_checkpoint(swarm.model), 0, 4)  # noqa: E731
    replicas = [TrainableStage(span(), settings, "local") for _ in range(2)]
    peers = [p for p in swarm.peers if "0:4" in p.name]
    with swarm.runtime() as runtime:
        request = swarm_pb2.Span(model_id=run_model_id("avg"), start_block=0, end_block=4)
        for i, (peer, replica) in enumerate(zip(peers, replicas, strict=True)):
            for call in range(2):
                hidden, mask, positions, grad = _samples(10 * i + call)
                runtime.run(
                    rpc.call_with_tensors(
                        runtime.p2p, PeerID.from_base58(peer.peer_id), rpc.BACKWARD,
                        (swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse), [hidden, mask, positions, grad], 1,
                        span=request,
                    )
                )  # fmt: skip
                replica.backward((hidden, mask, positions), grad)
        apart = [torch.cat([p.detach().flatten() for p in r.module.parameters()]) for r in replicas]
        assert (apart[0] - apart[1]).abs().max() > 1e-3  # the control: without averaging they differ
        mean = (apart[0] + apart[1]) / 2
        shapes = replicas[0].shapes()

        def weights(peer_id: str) -> tuple[torch.Tensor, int]:
            state = runtime.run(
                fetch_state(runtime.p2p, PeerID.from_base58(peer_id), request, shapes, timeout=30)
            )
            return torch.cat([w.flatten() for w in state.weights]), state.steps

        def averaged() -> bool:
            held = [weights(peer.peer_id)[0] for peer in peers]
            return all((w - mean).abs().max() <= 1e-5 for w in held)

        assert wait_until(averaged, timeout=60)
        held = [weights(peer.peer_id) for peer in peers]
        assert (held[0][0] - held[1][0]).abs().max() <= 1e-6 and held[0][1] == held[1][1] == 2
        joiner = swarm.add_peer(0, 4, extra_args=_stage_args("avg", *AVERAGING))
        joined, steps = weights(joiner.peer_id)
        assert steps == 2 and (joined - held[0][0]).abs().max() == 0
