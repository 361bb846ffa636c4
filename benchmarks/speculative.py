"""Speculative decoding through the swarm: plain greedy vs prompt lookup vs a draft model, tokens/s.

    python benchmarks/speculative.py [--repeats 5] [--new-tokens 64] [--draft-layers 6]

SmolLM2-135M float32 on 3 peers x 10 blocks on this machine, greedy, batch 1. The prompt repeats a short function
several times, as code or a chat quoting earlier text does, so its continuation is often found in it. Prompt lookup
(``generate(prompt_lookup_num_tokens=k)``) proposes the k tokens that followed the last n-gram's earlier occurrence;
the draft model (``assistant_model=``) is SmolLM2's own first ``--draft-layers`` blocks with its head, run locally
(an early exit of the target: no second checkpoint to download), its proposals' number adapting to how many
were taken. The swarm verifies all proposals in one step and
every hop rolls back what it refused. The tokens are checked equal to plain greedy's. Setups take turns within
every repeat; medians over repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402

TEXT = '''def area(width, height):
    """The area of a rectangle."""
    return width * height


'''


def early_exit(path: str, layers: int):
    """The checkpoint's first ``layers`` blocks, its final norm and its head: a draft that needs no other download."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    # start from 4 proposals, then 2 more after a step that took them all, 1 fewer after one that did not
    model.generation_config.num_assistant_tokens = 4
    model.generation_config.num_assistant_tokens_schedule = "heuristic"
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-layers", type=int, default=6)
    args = parser.parse_args()
    path = str(resolve_checkpoint(DEMO_MODEL).path)
    prompt = AutoTokenizer.from_pretrained(path)(TEXT * 4, return_tensors="pt").input_ids
    draft = early_exit(path, args.draft_layers)
    setups = {
        "plain greedy": {},
        "prompt lookup, k = 4": {"prompt_lookup_num_tokens": 4},
        "prompt lookup, k = 8": {"prompt_lookup_num_tokens": 8},
        f"draft: first {args.draft_layers} blocks": {"assistant_model": draft},
    }
    n = args.new_tokens
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    refused: dict[str, list[int]] = {name: [] for name in setups}
    steps: dict[str, list[int]] = {name: [] for name in setups}
    with (
        LocalSwarm(path, [(0, 10), (10, 20), (20, 30)], peer_args=["--throughput", "1000"]) as swarm,
        swarm.client() as model,
    ):
        want = model.generate(prompt, **kwargs)
        for _ in range(args.repeats):
            for name, speculation in setups.items():
                length = prompt.shape[1] + n + 64
                with model.inference_session(max_length=length) as session:
                    t0 = time.perf_counter()
                    got = model.generate(prompt, **kwargs, **speculation)
                    seconds[name].append(time.perf_counter() - t0)
                    refused[name].append(session.rolled_back)
                    steps[name].append(session.steps)
                if not torch.equal(got, want):
                    raise AssertionError(f"{name} gave other tokens than plain greedy")

    base = statistics.median(seconds["plain greedy"])
    print(
        f"\nSmolLM2-135M float32, 3 peers x 10 blocks, a {prompt.shape[1]}-token repetitive prompt, {n} new tokens, "
        f"greedy (the same tokens in every setup); median of {args.repeats} interleaved repeats\n"
    )
    print("| setup | tokens/s | speed-up | swarm steps | proposed tokens refused |")
    print("|---|---|---|---|---|")
    for name in setups:
        median = statistics.median(seconds[name])
        print(
            f"| {name} | {n / median:.1f} | {base / median:.2f}x | {statistics.median(steps[name]):.0f} | "
            f"{statistics.median(refused[name]):.0f} |"
        )


if __name__ == "__main__":
    main()
