"""SWARM training (``join --train``, ``client.stages``): a tiny random Llama's 4 blocks as 2 trainable stages on real
peer processes, a trainer with the embeddings and head, checked against one local transformers model.

Oracle: the same checkpoint in transformers, the same tokens, the batch's mean loss. The stages' accumulated
gradients are read back through their state (``swarm.v1.stage_state``): after its first AdamW step a stage's first
moment is exactly (1 - beta1) x its gradient, and its second (1 - beta2) x the gradient squared.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client import DistributedModelForCausalLM
from swarm_peer.client.text_data import TokenStream
from swarm_peer.dht import online_servers, run_model_id
from swarm_peer.errors import PeerError
from swarm_peer.models import resolve_checkpoint
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.stage import TrainableStage
from swarm_peer.protocols import rpc, swarm_pb2
from swarm_peer.protocols.stage_state import fetch_state
from swarm_peer.settings import StageSettings

from .conftest import arithmetic_text, client_settings, run_cli, table_row, wait_until

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


def _stepped_states(model, run: str, local) -> list:
    """Each stage's state once both took their step on the batch (right after its backward calls)."""
    states = []

    def stepped() -> bool:
        try:
            states[:] = _stage_states(model, run_model_id(run), local)
        except PeerError:  # now and then a state stream ends before its first message: look again
            return False
        return all(state.steps == 1 for state in states)

    assert wait_until(stepped, timeout=10)
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
        # each stage steps once on the batch's 4 samples (at once, its only peer): its moments hold the gradients
        states = _stepped_states(model, "exact", local)
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
        states = _stepped_states(model, "int8", local)
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
def test_a_stages_peers_step_together_and_a_joiner_takes_their_state(swarm):
    """Two peers of one stage are each sent other samples, 4 at a time (--target-batch-size): they average their
    gradients and take the same AdamW step on the sum, as one copy of the stage given all the samples (computed here)
    would; they hold identical weights, where each stepping on its own samples would not (the control). A third peer
    that joins the stage then downloads its state and holds the same weights, at the same step."""
    settings = StageSettings(run_id="avg", lr=0.01, target_batch_size=B)
    span = lambda: BlockSpan(resolve_checkpoint(swarm.model), 0, 4)  # noqa: E731
    alone = [TrainableStage(span(), settings, "local") for _ in range(2)]
    together = TrainableStage(span(), settings.model_copy(update={"target_batch_size": 2 * B}), "local")
    peers = [p for p in swarm.peers if "0:4" in p.name]
    shapes = together.shapes()
    with swarm.runtime() as runtime:
        request = swarm_pb2.Span(model_id=run_model_id("avg"), start_block=0, end_block=4)

        def weights(peer_id: str, tries: int = 3) -> tuple[torch.Tensor, int]:
            try:
                state = runtime.run(
                    fetch_state(runtime.p2p, PeerID.from_base58(peer_id), request, shapes, timeout=30)
                )
            except PeerError:  # now and then a state stream ends before its first message
                if tries == 1:
                    raise
                return weights(peer_id, tries - 1)
            return torch.cat([w.flatten() for w in state.weights]), state.steps

        for call in range(2):
            for i, (peer, replica) in enumerate(zip(peers, alone, strict=True)):
                hidden, mask, positions, grad = _samples(10 * i + call)
                runtime.run(
                    rpc.call_with_tensors(
                        runtime.p2p, PeerID.from_base58(peer.peer_id), rpc.BACKWARD,
                        (swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse), [hidden, mask, positions, grad], 1,
                        span=request,
                    )
                )  # fmt: skip
                replica.backward((hidden, mask, positions), grad)
                together.backward((hidden, mask, positions), grad)
            # the next call's samples go into the next step: a step takes what its round found accumulated
            assert wait_until(lambda: all(weights(peer.peer_id)[1] == call + 1 for peer in peers), timeout=60)  # noqa: B023
        flat = lambda stage: torch.cat([p.detach().flatten() for p in stage.module.parameters()])  # noqa: E731
        expected, apart = flat(together), [flat(replica) for replica in alone]
        assert together.steps == 2 and all((w - expected).abs().max() > 1e-3 for w in apart)  # the control
        held = [weights(peer.peer_id) for peer in peers]
        # the same step on the same summed gradient (a weights round between the steps may leave float noise)
        assert (held[0][0] - held[1][0]).abs().max() <= 1e-6
        torch.testing.assert_close(held[0][0], expected, atol=1e-5, rtol=0)
        joiner = swarm.add_peer(0, 4, extra_args=_stage_args("avg", *AVERAGING))
        joined, steps = weights(joiner.peer_id)
        assert steps == 2 and (joined - held[0][0]).abs().max() <= 1e-6
    # swarm-peer status lists the run as a model, each stage peer with its step
    status = run_cli("status", "--initial-peers", *swarm.initial_peers, run_model_id("avg"), timeout=60)
    assert status.returncode == 0, status.stderr
    for peer in [*peers, joiner]:
        row = table_row(status.stdout, peer.peer_id[:6], "0:4")
        assert " 2 " in row, row


# ---------------------------------------------------------------- trainers from the command line, on text

TEXT_STAGES = [(0, 1), (0, 1), (1, 2), (1, 2)]  # a 2-block model: 2 stages x 2 peers
TEXT_STEPS, TEXT_BATCH, TEXT_LEN, TEXT_LR = 24, 4, 32, 3e-3  # the trainers': their layers step on every batch
# the stages step once the two trainers' batches brought 16 samples: every 2 steps
STAGE_TARGET, STAGE_LR = 16, 1e-2


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm-text")
    return root, arithmetic_text(root, layers=2, weights=True)


def _text_swarm(model_dir, run: str) -> LocalSwarm:
    stage = ["--train", "--run-id", run, "--target-batch-size", str(STAGE_TARGET), "--lr", str(STAGE_LR)]
    return LocalSwarm(str(model_dir), spans=TEXT_STAGES, peer_args=PEER_ARGS + stage)


def _text_trainer(
    root, model_dir, swarm: LocalSwarm, run: str, i: int, *args: str, steps: int = TEXT_STEPS, log=None
) -> subprocess.Popen:
    """Trainer ``i`` of ``run``; ``log``: a file its stderr (its progress bar) goes to."""
    command = [
        sys.executable, "-m", "swarm_peer.cli.main", "train", str(model_dir), "--swarm", "--run-id", run,
        "--data", str(root / f"shard{i}.txt"), "--initial-peers", *swarm.initial_peers, "--seed", str(i),
        "--batch-size", str(TEXT_BATCH), "--micro-batches", "2", "--seq-len", str(TEXT_LEN), "--lr", str(TEXT_LR),
        "--weight-decay", "0.01", "--steps", str(steps), "--checkpoint-dir", str(root / run / f"trainer{i}"),
        *args,
    ]  # fmt: skip
    stderr = subprocess.PIPE if log is None else log
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)


def _finish(trainer: subprocess.Popen, timeout: float = 240, log=None) -> str:
    """The trainer's stdout once it exited 0; ``log``: the file its stderr went to (shown if it failed)."""
    try:
        out, err = trainer.communicate(timeout=timeout)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    if log is not None:
        err = log.read_text()
    assert trainer.returncode == 0, (err or "")[-3000:]
    return out


def _heldout_loss(model, root, tokenizer) -> float:
    ids = TokenStream.from_file(root / "heldout.txt", tokenizer).batch(
        32, TEXT_LEN, torch.Generator().manual_seed(9)
    )
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.timeout(400)
def test_two_trainers_through_two_stages_of_two_peers_train_as_one_process(text):
    """Two trainers (batches of 4, in 2 micro-batches; their embeddings and head averaged at every step) through 2
    stages of 2 peers (stepping together on every 16 samples): the held-out loss of the model the first trainer
    assembles at exit is within 10% of one process's, trained with AdamW on the same samples on the same schedule
    (both trainers' batches as one batch of 8 per step, the blocks stepping every 2 steps); both have learnt (the
    control: the untrained model's loss)."""
    root, model_dir = text
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with _text_swarm(model_dir, "duo") as swarm:
        trainers = [_text_trainer(root, model_dir, swarm, "duo", i, "--inner-steps", "1") for i in range(2)]
        for trainer in trainers:
            _finish(trainer)
    swarm_model = AutoModelForCausalLM.from_pretrained(root / "duo" / "trainer0")
    local = AutoModelForCausalLM.from_pretrained(model_dir)
    untrained = _heldout_loss(local, root, tokenizer)
    blocks = list(local.model.layers.parameters())
    own = [p for p in local.parameters() if all(p is not b for b in blocks)]
    optimizers = [
        torch.optim.AdamW(own, lr=TEXT_LR, weight_decay=0.01),
        torch.optim.AdamW(blocks, lr=STAGE_LR, weight_decay=0.01),
    ]
    streams = [TokenStream.from_file(root / f"shard{i}.txt", tokenizer) for i in range(2)]
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    for step in range(TEXT_STEPS):
        ids = torch.cat([s.batch(TEXT_BATCH, TEXT_LEN, g) for s, g in zip(streams, generators, strict=True)])
        local(input_ids=ids, labels=ids).loss.backward()
        for optimizer in optimizers[: 1 + ((step + 1) * 2 * TEXT_BATCH % STAGE_TARGET == 0)]:
            optimizer.step()
            optimizer.zero_grad()
    ours, reference = _heldout_loss(swarm_model, root, tokenizer), _heldout_loss(local, root, tokenizer)
    assert reference < 0.8 * untrained  # the oracle learnt
    assert abs(ours - reference) <= 0.1 * reference, (ours, reference, untrained)


@pytest.mark.timeout(400)
def test_a_stage_peer_killed_mid_training_loses_no_micro_batch(text):
    """kill -9 a peer of the first stage while a trainer runs: every step's micro-batches finish (calls on the dead
    peer are retried on the other peer of the stage), the dead peer is banned after its first failures rather than
    tried for every call, and the loss keeps falling."""
    root, model_dir = text
    steps, log_path = 120, root / "churn.log"
    with _text_swarm(model_dir, "churn") as swarm, log_path.open("w") as log:
        trainer = _text_trainer(
            root,
            model_dir,
            swarm,
            "churn",
            0,
            "--min-peers",
            "1",
            "--inner-steps",
            "10",
            steps=steps,
            log=log,
        )
        done = lambda: max(map(int, re.findall(rf"(\d+)/{steps}", log_path.read_text())), default=0)  # noqa: E731
        assert wait_until(lambda: done() >= 20 or trainer.poll() is not None, timeout=120)
        assert trainer.poll() is None and done() < steps // 2, log_path.read_text()[-2000:]
        with swarm.runtime() as runtime:  # the first stage's busiest peer, by the samples/s it announces
            (first_stage,) = online_servers(runtime.dht, run_model_id("churn"), [0])
        busiest = str(max(first_stage, key=lambda peer: first_stage[peer].samples_per_second))
        victim = next(peer for peer in swarm.peers if peer.peer_id == busiest)
        os.killpg(victim.process.pid, signal.SIGKILL)  # its p2pd and DHT process too
        out = _finish(trainer, log=log_path)
    retried = int(re.search(r"(\d+) stage calls retried", out).group(1))
    assert 1 <= retried <= 8, out  # micro-batches in flight on the dead peer when it died; then it is banned
    losses = [json.loads(line)["loss"] for line in (root / "churn" / "trainer0" / "train_log.jsonl").open()]
    assert len(losses) == steps and sum(losses[-10:]) < sum(losses[:10]), losses


@pytest.mark.timeout(300)
def test_stage_peers_move_from_an_over_served_stage_to_the_bottlenecks_and_stay(tiny_checkpoints):
    """Three one-block stages served 1 / 4 / 1 by equal peers (--rebalance-period 2): two peers of the middle stage
    move, one to each end, taking the stage's state as they go; the pipeline then stays 2 / 2 / 2."""
    stage = ["--train", "--run-id", "moves", "--rebalance-period", "2", "--target-batch-size", "1000"]
    spans = [(0, 1)] + [(1, 2)] * 4 + [(2, 3)]
    args = [*PEER_ARGS[:-2], *stage]  # PEER_ARGS without --rebalance-period 0
    with (
        LocalSwarm(tiny_checkpoints["llama"], spans=spans, peer_args=args) as swarm,
        swarm.runtime() as runtime,
    ):
        started = {peer.peer_id: peer.blocks for peer in swarm.peers}

        def served() -> dict[str, tuple[int, int]]:
            servers = online_servers(runtime.dht, run_model_id("moves"), range(3))
            return {
                str(p): (info.start_block, info.end_block) for block in servers for p, info in block.items()
            }

        def counts() -> list[int]:
            spans_now = served()
            return [sum(1 for span in spans_now.values() if span == (b, b + 1)) for b in range(3)]

        assert wait_until(lambda: counts() == [2, 2, 2], timeout=120), counts()
        time.sleep(10)  # five more rebalancing periods: nobody moves again
        assert counts() == [2, 2, 2]
        moved = [peer for peer, span in served().items() if span != started[peer]]
        assert len(moved) == 2 and all(started[peer] == (1, 2) for peer in moved)
