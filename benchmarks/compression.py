"""What ``ClientSettings(compression=...)`` saves and costs: bytes per generated token, tokens/s and greedy
agreement with local transformers, for each codec of hidden states on the wire.

    python benchmarks/compression.py [--repeats 5] [--new-tokens 32] [--agreement-tokens 200]

SmolLM2-135M float32 on 3 peers x 10 blocks (separate processes on this machine, peers pushing each step to the
next), batch 1, greedy. Bytes: what the peers sent, answers to the client and pushes to the next peer, as their
``sent_bytes_total`` counters (``join --metrics-port``) count them, per generated token (the prompt's step
included). The codecs take turns within every repeat, each ratio is taken within a repeat, then the median over
repeats is printed. Agreement: how often the next token the swarm's logits pick over a local greedy continuation of
``--agreement-tokens`` tokens is local transformers' (teacher-forced), and the largest logit error.
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

CODECS = ("none", "float16", "bfloat16", "8bit")
SENT = "swarm_peer_peer_sent_bytes_total"


def sent_bytes(urls: list[str]) -> float:
    return sum(value for url in urls for (name, _), value in scrape(url).items() if name == SENT)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--agreement-tokens", type=int, default=200)
    args = parser.parse_args()

    path = str(resolve_checkpoint(DEMO_MODEL).path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(100, 10000, (1, 16), generator=torch.Generator().manual_seed(0))
    n = args.agreement_tokens
    with torch.no_grad():
        reference = local.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        reference_logits = local(reference).logits
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    peer_args = ["--throughput", "1000", "--metrics-port", "0"]
    with LocalSwarm(path, even_spans(30, 3), peer_args=peer_args) as swarm, contextlib.ExitStack() as stack:
        urls = [re.search(r"http://\S+/metrics", peer.log_tail(100_000)).group(0) for peer in swarm.peers]
        models = {name: stack.enter_context(swarm.client(compression=name)) for name in CODECS}
        agreement, error = {}, {}
        for name, model in models.items():
            model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            with torch.no_grad():
                logits = model(reference).logits
            picked = logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
            agreement[name] = (picked == reference[0, prompt.shape[1] :]).float().mean().item()
            error[name] = (logits - reference_logits).abs().max().item()
        per_token = {name: [] for name in CODECS}
        seconds = {name: [] for name in CODECS}
        for _ in range(args.repeats):
            for name, model in models.items():
                before, t0 = sent_bytes(urls), time.perf_counter()
                model.generate(prompt, **kwargs)
                seconds[name].append((time.perf_counter() - t0) / args.new_tokens)
                per_token[name].append((sent_bytes(urls) - before) / args.new_tokens)

    print(
        f"\nSmolLM2-135M float32, 3 peers x 10 blocks, {args.new_tokens} new tokens, greedy; median of "
        f"{args.repeats} interleaved repeats; agreement over {n} tokens\n"
    )
    print(
        "| compression | bytes sent / token | vs none | tokens/s | vs none | greedy agreement | max logit error |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in CODECS:
        bytes_ratio = statistics.median(
            a / b for a, b in zip(per_token[name], per_token["none"], strict=True)
        )
        speed_ratio = statistics.median(b / a for a, b in zip(seconds[name], seconds["none"], strict=True))
        print(
            f"| {name} | {statistics.median(per_token[name]):.0f} | {bytes_ratio:.2f} | "
            f"{1 / statistics.median(seconds[name]):.1f} | {speed_ratio:.2f} | {agreement[name]:.3f} | "
            f"{error[name]:.3g} |"
        )


if __name__ == "__main__":
    main()
