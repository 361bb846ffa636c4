"""Tokens/s of LoRA fine-tuning: local transformers + peft vs the same training through a swarm.

    python benchmarks/finetune_speed.py [--repeats 5] [--batch-size 4] [--seq-len 128]

SmolLM2-135M float32, LoRA r=8 (alpha 16) on q_proj and v_proj, AdamW: one training step is forward, backward
and the optimizer step on a batch of random token ids. Prints one table of medians over repeats (after one
warm-up step), each against the local baseline measured in the same run, the two taking turns:
1. local ``transformers`` + ``peft`` (``get_peft_model``): the baseline;
2. ``DistributedModelForCausalLM`` + ``add_lora`` through 3 peers x 10 blocks, all processes on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from swarm_peer.cli.demo import even_spans  # noqa: E402
from swarm_peer.cli.finetune import train  # noqa: E402
from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402

PEER_THROUGHPUT = "1000"  # a fixed announced throughput: peers skip the probe


def lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def time_interleaved(
    models: dict, blocks_NT: torch.Tensor, batch_size: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per training step of each model, one figure per repeat (after one warm-up step each).

    The models take turns within every repeat, so a slow spell of this shared machine hits them alike (timed
    one after another, the same swarm measured anywhere from 3.0 to 4.4 s/step).
    """
    figures = {name: [] for name in models}
    for repeat in range(1 + repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            train(model, blocks_NT, 1, 1e-4, batch_size)
            if repeat:
                figures[name].append(time.perf_counter() - t0)
    return figures


def swarm_client(stack: contextlib.ExitStack, path: str, spans):
    """A client with a fresh LoRA, of a new local swarm serving ``spans``; both are closed with ``stack``."""
    swarm = stack.enter_context(LocalSwarm(path, spans, peer_args=["--throughput", PEER_THROUGHPUT]))
    model = stack.enter_context(swarm.client())
    model.requires_grad_(False)
    model.add_lora(lora_config())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = str(resolve_checkpoint(DEMO_MODEL).path)
    blocks_NT = torch.randint(100, 10000, (args.batch_size, args.seq_len))
    with contextlib.ExitStack() as stack:
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        models = {
            "local transformers + peft": get_peft_model(local, lora_config()),
            "swarm, 3 peers x 10 blocks": swarm_client(stack, path, even_spans(30, 3)),
        }
        rows = list(time_interleaved(models, blocks_NT, args.batch_size, args.repeats).items())
    tokens = args.batch_size * args.seq_len
    base = statistics.median(rows[0][1])
    print(
        f"\nSmolLM2-135M float32, LoRA r=8 on q_proj,v_proj, batch {args.batch_size} x {args.seq_len} tokens, "
        f"forward + backward + AdamW, median of {args.repeats}"
    )
    print(f"| {'setup':<28} | {'tokens/s':>8} | {'s/step':>8} | {'vs local':>8} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, figures in rows:
        median = statistics.median(figures)
        print(f"| {name:<28} | {tokens / median:8.1f} | {median:8.3f} | {base / median:7.2f}x |")


if __name__ == "__main__":
    main()
