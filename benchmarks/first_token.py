"""Time to first token: local transformers vs the swarm, for short and long prompts, and where the swarm's time goes.

    python benchmarks/first_token.py [--repeats 7] [--prompts 32,512]

SmolLM2-135M float32, batch 1: ``generate(max_new_tokens=1)`` (the prompt's forward and the first token) locally
and through 3 peers x 10 blocks (separate processes on this machine, pushing). Of the swarm's time, the peers'
compute is what their ``request_seconds{rpc="inference_step"}`` histograms add up over the call (``--metrics-port``);
the rest is the client (embeddings, final norm and head, opening the session's streams) and the path between
processes. Local and swarm take turns within every repeat, the ratio is taken within a repeat, then the median over
repeats is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from swarm_peer.cli.demo import even_spans  # noqa: E402
from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402
from swarm_peer.peer.metrics import scrape  # noqa: E402

STEP_SECONDS = ("swarm_peer_peer_request_seconds_sum", (("rpc", "inference_step"),))


def seconds(model, input_ids) -> float:
    t0 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    return time.perf_counter() - t0


def peers_compute(urls: list[str]) -> float:
    return sum(scrape(url).get(STEP_SECONDS, 0.0) for url in urls)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", default="32,512", help="prompt lengths in tokens, comma-separated")
    args = parser.parse_args()
    lengths = [int(n) for n in args.prompts.split(",")]

    path = str(resolve_checkpoint(DEMO_MODEL).path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(100, 10000, (1, n), generator=generator) for n in lengths}
    peer_args = ["--throughput", "1000", "--metrics-port", "0"]
    rows = {n: [] for n in lengths}
    with LocalSwarm(path, even_spans(30, 3), peer_args=peer_args) as swarm, contextlib.ExitStack() as stack:
        urls = [re.search(r"http://\S+/metrics", peer.log_tail(100_000)).group(0) for peer in swarm.peers]
        model = stack.enter_context(swarm.client())
        for ids in prompts.values():  # warm-up
            seconds(local, ids), seconds(model, ids)
        for _ in range(args.repeats):
            for n, ids in prompts.items():
                alone = seconds(local, ids)
                before = peers_compute(urls)
                through = seconds(model, ids)
                rows[n].append((alone, through, peers_compute(urls) - before))

    print(
        f"\nSmolLM2-135M float32, 3 peers x 10 blocks, batch 1, generate(max_new_tokens=1); median of "
        f"{args.repeats} interleaved repeats\n"
    )
    print("| prompt tokens | local (ms) | swarm (ms) | swarm / local | peers' compute (ms) | the rest (ms) |")
    print("|---|---|---|---|---|---|")
    for n, figures in rows.items():
        local_s, swarm_s, compute_s = (statistics.median(column) for column in zip(*figures, strict=True))
        ratio = statistics.median(through / alone for alone, through, _ in figures)
        rest = statistics.median(through - compute for _, through, compute in figures)
        print(
            f"| {n} | {local_s * 1e3:.1f} | {swarm_s * 1e3:.1f} | {ratio:.2f} | {compute_s * 1e3:.1f} | "
            f"{rest * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
