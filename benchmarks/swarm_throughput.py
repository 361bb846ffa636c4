"""Samples/s of SWARM training through stages served by peers of different speeds, against the ideal (the slowest
stage's summed capacity) and one process; stochastic wiring against round-robin.

    python benchmarks/swarm_throughput.py [--seconds 15] [--repeats 3] [--in-flight 16] [--quick]

Then the accuracy cost of compressing the hidden states and gradients between stages (``--compression`` of the
trainer and of the stage peers): on one batch of 8 sequences of 32 tokens through 2 stages of the same model, the
loss and every gradient (the trainer's layers', and each stage's, read back from its AdamW moments after its first
step) against one local transformers model: the relative loss difference and the gradients' cosine.

Every stage peer (``swarm-peer join --train``, on 127.0.0.1) emulates the speed of its device with the hidden
``--emulated-speed S``: on its compute thread, a forward sleeps 1/3 of 1/S per sample and a backward 2/3, on top
of the real compute of a small model (4 blocks of width 64). Its capacity is then S samples/s of forward and
backward whatever this machine's cores do, so a stage's capacity is the sum of its peers' speeds and the pipeline
can do at most the smallest stage capacity: the ideal. One process is a machine as fast as the fastest peer holding
every stage: that speed divided by the number of stages.

A trainer (``RemoteStages`` of ``DistributedModelForCausalLM``, as ``train --swarm`` uses it) keeps ``--in-flight``
micro-batches of 4 sequences of 16 tokens in the pipeline, each a forward and a backward through every stage; the
table gives the samples/s over ``--seconds`` after a warm-up, median over ``--repeats``, with SWARM's wiring
(``client.wiring``) and with round-robin (each stage's peers in turn, whatever their speed).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client import DistributedModelForCausalLM
from swarm_peer.client.wiring import StageWiring
from swarm_peer.settings import ClientSettings, NetworkSettings

# each stage's peers' speeds, samples/s: one slow peer in the first stage; the ideal is 40 samples/s in both
PIPELINES = {"2 stages": [[30, 10], [20, 20]], "3 stages": [[30, 10], [20, 20], [40]]}
BLOCKS = 6  # 2 stages of 3 blocks, or 3 of 2
MICRO, SEQ = 4, 16


class RoundRobin(StageWiring):
    """The control: each stage's usable peers in turn, whatever their speed or load."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._turn = itertools.count()

    def choose(
        self, task_size: float, exclude: Collection[str] = (), sizes: Mapping[str, float] | None = None
    ):
        peers = [p for p in self.peers if p not in exclude]
        peer = peers[next(self._turn) % len(peers)] if peers else super().choose(task_size, exclude, sizes)
        with self._lock:
            state = self._peers[peer]
            state.queued += (sizes or {}).get(peer, task_size)
            state.calls += 1
        return peer


def _model(root: Path) -> Path:
    config = LlamaConfig(
        num_hidden_layers=BLOCKS, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    return root / "model"


def _add_stage_peers(swarm: LocalSwarm, speeds: list[list[float]]) -> None:
    length = BLOCKS // len(speeds)
    common = [
        "--throughput",
        "1000",
        "--compute-threads",
        "1",
        "--rebalance-period",
        "0",
        "--announce-period",
        "2",
    ]
    train = ["--train", "--run-id", "bench", "--target-batch-size", "1000000", "--average-every", "1000000"]
    for stage, stage_speeds in enumerate(speeds):
        for speed in stage_speeds:
            span = (stage * length, (stage + 1) * length)
            swarm.add_peer(*span, extra_args=common + train + ["--emulated-speed", str(speed)], wait=False)
    for peer in swarm.peers:
        peer.wait_ready(swarm.start_timeout)


def _samples_per_second(model, seconds: float, in_flight: int) -> float:
    """Samples/s of forward+backward through the stages, ``in_flight`` micro-batches at once."""
    done, stop, counting = [0], threading.Event(), threading.Event()
    ids = torch.randint(0, 128, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))

    def work():
        while not stop.is_set():
            model(input_ids=ids, labels=ids).loss.backward()
            if counting.is_set():
                done[0] += MICRO

    threads = [threading.Thread(target=work, daemon=True) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    time.sleep(min(5.0, seconds / 3))  # warm-up: every peer measured
    counting.set()
    start = time.monotonic()
    time.sleep(seconds)
    rate = done[0] / (time.monotonic() - start)
    stop.set()
    for thread in threads:
        thread.join(60)
    return rate


def _compression_cost(model_dir: Path, codec: str) -> tuple[float, float]:
    """(relative loss difference, gradient cosine) of one batch through 2 stages with ``codec``, against local."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    local = AutoModelForCausalLM.from_pretrained(model_dir)
    local_loss = local(input_ids=ids, labels=ids).loss
    local_loss.backward()
    half = BLOCKS // 2
    args = [
        "--throughput",
        "1000",
        "--compute-threads",
        "1",
        "--rebalance-period",
        "0",
        "--announce-period",
        "2",
    ]
    args += ["--train", "--run-id", codec, "--target-batch-size", "8", "--compression", codec]
    with LocalSwarm(str(model_dir), spans=[(0, half), (half, BLOCKS)], peer_args=args) as swarm:
        network = NetworkSettings(initial_peers=tuple(swarm.initial_peers), client_mode=True)
        model = DistributedModelForCausalLM.from_pretrained(
            str(model_dir), settings=ClientSettings(network=network), run_id=codec, compression=codec
        )
        try:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            ours = [p.grad.flatten() for p in model.parameters()]
            theirs = [local.get_parameter(name).grad.flatten() for name, _ in model.named_parameters()]
            stages = model.remote.blocks
            time.sleep(2)  # the stages step on the batch's 8 samples at once
            for start, end in stages.stages:
                layers = local.model.layers[start:end]
                state = stages.download(
                    (start, end), {n: tuple(p.shape) for n, p in layers.named_parameters()}
                )
                ours += [
                    m.flatten() / 0.1 for m in state.exp_avg
                ]  # AdamW's first moment after one step: 0.1 x grad
                theirs += [layers.get_parameter(name).grad.flatten() for name in state.names]
        finally:
            model.shutdown()
    cosine = torch.nn.functional.cosine_similarity(torch.cat(ours), torch.cat(theirs), dim=0).item()
    return abs(loss.item() - local_loss.item()) / local_loss.item(), cosine


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 s, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats = 4.0, 1
    rows = []
    with tempfile.TemporaryDirectory() as root:
        model_dir = _model(Path(root))
        for name, speeds in PIPELINES.items():
            ideal = min(sum(stage) for stage in speeds)
            one_process = max(max(stage) for stage in speeds) / len(speeds)
            with LocalSwarm(str(model_dir), spans=[]) as swarm:
                _add_stage_peers(swarm, speeds)
                network = NetworkSettings(initial_peers=tuple(swarm.initial_peers), client_mode=True)
                settings = ClientSettings(network=network)
                rates = {}
                for wiring in (StageWiring, RoundRobin):
                    model = DistributedModelForCausalLM.from_pretrained(
                        str(model_dir), settings=settings, run_id="bench"
                    )
                    model.remote.blocks.wiring = wiring
                    try:
                        rates[wiring] = statistics.median(
                            _samples_per_second(model, args.seconds, args.in_flight)
                            for _ in range(args.repeats)
                        )
                    finally:
                        model.shutdown()
            rows.append((name, speeds, ideal, one_process, rates[StageWiring], rates[RoundRobin]))
        costs = {codec: _compression_cost(model_dir, codec) for codec in ("none", "float16", "8bit")}
    print(
        f"\nSWARM pipeline throughput, samples/s (micro-batches of {MICRO}x{SEQ} tokens, {args.in_flight} in flight, "
        f"median of {args.repeats} x {args.seconds:.0f} s)"
    )
    print(
        "| pipeline | peers' speeds | ideal | one process | SWARM wiring | x ideal | round-robin | x ideal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, speeds, ideal, one, ours, robin in rows:
        print(
            f"| {name} | {speeds} | {ideal:.0f} | {one:.1f} | {ours:.1f} | {ours / ideal:.2f} | {robin:.1f} | "
            f"{robin / ideal:.2f} |"
        )
    print("\nCompression between stages: one batch of 8x32 tokens through 2 stages, against one local model")
    print("| codec | loss, relative difference | gradients' cosine |")
    print("|---|---|---|")
    for codec, (loss_diff, cosine) in costs.items():
        print(f"| {codec} | {loss_diff:.2e} | {cosine:.6f} |")


if __name__ == "__main__":
    main()
