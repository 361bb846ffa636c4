"""Tokens/s of generation: local transformers vs the swarm, and the cost of each extra hop.

    python benchmarks/generation_speed.py [--repeats 7] [--new-tokens 64]

Prints two tables, each against a baseline measured in the same run:
1. SmolLM2-135M float32, batch 1, greedy: local ``generate`` vs a swarm of 1 peer (30 blocks) and of
   3 peers x 10 blocks, all processes on this machine; the 3-peer swarm twice: with peers pushing each step to
   the next peer (the default), and with the client relaying every hop (``ClientSettings(push=False)``).
2. Per-hop overhead on a tiny 8-block Llama (compute is small, so time is mostly the path between processes):
   the same generation through 1, 2, 4 and 8 peers; overhead per extra hop = (ms/token(n) - ms/token(1)) / (n - 1),
   with push and with the client relaying.

All setups of a table are up at once and take turns within every repeat (``time_interleaved``), and every ratio
or difference is taken within a repeat, then the median over repeats is printed: this shared machine drifts by
10% over minutes, which hits the figures of one repeat alike but would skew a ratio of separate medians. Idle
peers cost next to nothing (their announcers wake every few seconds), so the 15 tiny peers can all be up at once.
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


def save_tiny_llama() -> str:
    """A random-weight 8-block Llama (hidden size 64) saved to a new temp dir: a model whose compute is small, so
    generation time is mostly the path between processes."""
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
    return tiny_dir


def swarm_clients(stack: contextlib.ExitStack, path: str, spans) -> tuple:
    """Clients of a new local swarm serving ``spans``: with push, and (if there are several hops) relaying every
    hop; closed with ``stack``."""
    swarm = stack.enter_context(LocalSwarm(path, spans))
    push = stack.enter_context(swarm.client())
    return push, (stack.enter_context(swarm.client(push=False)) if len(spans) > 1 else push)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = str(resolve_checkpoint(DEMO_MODEL).path)
    input_ids = torch.randint(100, 10000, (1, 16))
    with contextlib.ExitStack() as stack:
        three_push, three_relay = swarm_clients(stack, path, even_spans(30, 3))
        models = {
            "local transformers": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            "swarm, 1 peer x 30 blocks": swarm_clients(stack, path, [(0, 30)])[0],
            "swarm, 3 peers x 10 blocks": three_push,
            "3 peers, client relays hops": three_relay,
        }
        rows = list(time_interleaved(models, input_ids, args.new_tokens, args.repeats).items())
    base = rows[0][1]
    print(f"\nSmolLM2-135M float32, batch 1, {args.new_tokens} new tokens, median of {args.repeats}")
    print(
        "(vs local: the median of each repeat's local ms/token over the setup's; range: lowest-highest of those)"
    )
    print(f"| {'setup':<28} | {'tokens/s':>8} | {'ms/token':>8} | {'vs local':>8} | {'range':>11} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for name, figures in rows:
        median = statistics.median(figures)
        ratios = [b / x for x, b in zip(figures, base, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(
            f"| {name:<28} | {1 / median:8.1f} | {median * 1e3:8.2f} | {statistics.median(ratios):7.2f}x"
            f" | {spread:>11} |"
        )

    tiny_dir = save_tiny_llama()
    tiny_ids = torch.randint(0, 128, (1, 8))
    counts = (1, 2, 4, 8)
    with contextlib.ExitStack() as stack:
        clients = {}
        for n in counts:
            push, relay = swarm_clients(stack, tiny_dir, even_spans(8, n))
            # one peer has nothing to relay: its one client is timed once as each mode's baseline
            clients[(n, "push")], clients[(n, "relay")] = push, relay
        hops = time_interleaved(clients, tiny_ids, args.new_tokens, args.repeats)
    print(f"\nPer-hop overhead, tiny 8-block Llama, {args.new_tokens} new tokens, median of {args.repeats}")
    print(
        f"| {'peers':>5} | {'push ms/token':>13} | {'push ms/hop':>11} | {'relay ms/token':>14} | {'relay ms/hop':>12} |"
    )
    print(f"|{'-' * 7}|{'-' * 15}|{'-' * 13}|{'-' * 16}|{'-' * 14}|")
    for n in counts:
        cells = []
        for mode, width in (("push", 13), ("relay", 14)):
            figures, one = hops[(n, mode)], hops[(1, mode)]
            per_hop = "baseline"
            if n > 1:
                diffs = [(x - b) * 1e3 / (n - 1) for x, b in zip(figures, one, strict=True)]
                per_hop = f"{statistics.median(diffs):.2f}"
            cells += [f"{statistics.median(figures) * 1e3:{width}.2f}", f"{per_hop:>{width - 2}}"]
        print(f"| {n:>5} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
