"""Tokens/s of generation: local transformers vs the swarm, and the cost of each extra hop.

    python benchmarks/generation_speed.py [--repeats 5] [--new-tokens 64]

Prints two tables of medians over repeats, each against a baseline measured in the same run:
1. SmolLM2-135M float32, batch 1, greedy: local ``generate`` vs a swarm of 1 peer (30 blocks) and of
   3 peers x 10 blocks, all processes on this machine.
2. Per-hop overhead on a tiny 8-block Llama (compute is negligible, so time is the network path): the same
   generation through 1, 2, 4 and 8 peers; overhead per extra hop = (ms/token(n) - ms/token(1)) / (n - 1).

In table 1 all setups are up at once and take turns within each repeat (``time_interleaved``); table 2 runs
one swarm at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from swarm_peer.cli.demo import even_spans  # noqa: E402
from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402


def time_interleaved(models: dict, input_ids, new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per generated token of each model, one figure per repeat (after one warm-up each).

    The models take turns within every repeat, so a slow spell of this shared machine hits them all alike
    instead of skewing the ratio of whichever ran during it.
    """
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for model in models.values():
        model.generate(input_ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    figures = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            figures[name].append((time.perf_counter() - t0) / (out.shape[1] - input_ids.shape[1]))
    return figures


def swarm_client(stack: contextlib.ExitStack, path: str, spans):
    """A client of a new local swarm serving ``spans``; both are closed with ``stack``."""
    swarm = stack.enter_context(LocalSwarm(path, spans))
    return stack.enter_context(swarm.client())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = str(resolve_checkpoint(DEMO_MODEL).path)
    input_ids = torch.randint(100, 10000, (1, 16))
    with contextlib.ExitStack() as stack:
        models = {
            "local transformers": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            "swarm, 1 peer x 30 blocks": swarm_client(stack, path, [(0, 30)]),
            "swarm, 3 peers x 10 blocks": swarm_client(stack, path, even_spans(30, 3)),
        }
        rows = list(time_interleaved(models, input_ids, args.new_tokens, args.repeats).items())
    base = statistics.median(rows[0][1])
    print(f"\nSmolLM2-135M float32, batch 1, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"| {'setup':<28} | {'tokens/s':>8} | {'ms/token':>8} | {'vs local':>8} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, figures in rows:
        median = statistics.median(figures)
        print(f"| {name:<28} | {1 / median:8.1f} | {median * 1e3:8.2f} | {base / median:7.2f}x |")

    tiny_dir = tempfile.mkdtemp(prefix="tiny-llama-")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny_dir)
    tiny_ids = torch.randint(0, 128, (1, 8))
    hops = {}
    for n in (1, 2, 4, 8):  # one swarm at a time: 15 idle peers would load the machine more than the hops do
        with contextlib.ExitStack() as stack:
            client = swarm_client(stack, tiny_dir, even_spans(8, n))
            hops[n] = time_interleaved({n: client}, tiny_ids, args.new_tokens, args.repeats)[n]
    one = statistics.median(hops[1])
    print(f"\nPer-hop overhead, tiny 8-block Llama, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"| {'peers':>5} | {'ms/token':>8} | {'extra ms/token per added hop':>28} |")
    print(f"|{'-' * 7}|{'-' * 10}|{'-' * 30}|")
    for n, figures in hops.items():
        median = statistics.median(figures)
        per_hop = "baseline" if n == 1 else f"{(median - one) * 1e3 / (n - 1):.2f}"
        print(f"| {n:>5} | {median * 1e3:8.2f} | {per_hop:>28} |")


if __name__ == "__main__":
    main()
