"""The OpenAI-compatible API's overhead: time to first token and tokens/s through ``swarm-peer api`` (streamed, with
the official ``openai`` client) vs the client library's own ``generate`` on the same swarm.

    python benchmarks/api_overhead.py [--repeats 7] [--new-tokens 32] [--peers 3]

SmolLM2-135M float32 on a swarm of ``--peers`` peers (bootstrap, peers and the API server: separate processes on
this machine), batch 1, greedy. Both ways generate the same tokens (checked). The two take turns within every
repeat and each ratio is taken within a repeat, then the median over repeats is printed, so the drift of this shared
machine hits both alike. Time to first token: from the call to the first generated token's text (the library: a
streamer's first token; the API: the first chunk with text). Tokens/s: generated tokens / the whole call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from swarm_peer.cli.demo import even_spans  # noqa: E402
from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"
READY = "API listening on "


class _FirstToken:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.prompt_seen, self.at = False, None

    def put(self, value) -> None:
        if self.prompt_seen and self.at is None:
            self.at = time.perf_counter()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def library(model, input_ids, new_tokens: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, tokens/s, the tokens) of one streamed generate() of the client library."""
    streamer = _FirstToken()
    t0 = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    seconds = time.perf_counter() - t0
    tokens = out[0, input_ids.shape[1] :].tolist()
    return streamer.at - t0, len(tokens) / seconds, tokens


def through_api(client: openai.OpenAI, new_tokens: int) -> tuple[float, float, str, int]:
    """(seconds to the first text, tokens/s, the text, tokens) of one streamed completion through the API."""
    t0 = time.perf_counter()
    first, pieces, tokens = None, [], 0
    stream = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=new_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    seconds = time.perf_counter() - t0
    return first - t0, tokens / seconds, "".join(pieces), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(DEMO_MODEL)
    path = str(checkpoint.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with LocalSwarm(path, even_spans(checkpoint.num_blocks, args.peers)) as swarm:
        api = swarm._spawn(
            "api",
            ["api", path, "--name", "smollm2", "--initial-peers", swarm.initial_peers[0], "--port", "0"],
        )
        url = api.wait_line(lambda line: line.startswith(READY), 180)[len(READY) :].strip()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        with swarm.client() as model:
            library(model, input_ids, 4)  # warm-up: routes, sessions, threads
            through_api(client, 4)
            rows = {"library": [], "api": []}
            for _ in range(args.repeats):
                first_l, rate_l, tokens = library(model, input_ids, args.new_tokens)
                first_a, rate_a, text, count = through_api(client, args.new_tokens)
                expected = tokenizer.decode(tokens, skip_special_tokens=True)
                assert (text, count) == (expected, len(tokens)), (
                    f"the API generated {text!r}, not {expected!r}"
                )
                rows["library"].append((first_l, rate_l))
                rows["api"].append((first_a, rate_a, first_a / first_l, rate_l / rate_a))

    print(
        f"\nSmolLM2-135M float32, {args.peers} peers on 127.0.0.1, {args.new_tokens} new tokens, greedy, "
        f"median of {args.repeats} repeats (ratios within a repeat)\n"
    )
    print("| way | time to first token (ms) | tokens/s | TTFT vs library | time/token vs library |")
    print("|---|---|---|---|---|")
    lib, api_rows = rows["library"], rows["api"]
    print(
        f"| client library `generate` | {statistics.median(r[0] for r in lib) * 1e3:.1f} | "
        f"{statistics.median(r[1] for r in lib):.2f} | 1.000 | 1.000 |"
    )
    print(
        f"| API, streamed (`openai` client) | {statistics.median(r[0] for r in api_rows) * 1e3:.1f} | "
        f"{statistics.median(r[1] for r in api_rows):.2f} | {statistics.median(r[2] for r in api_rows):.3f} | "
        f"{statistics.median(r[3] for r in api_rows):.3f} |"
    )


if __name__ == "__main__":
    main()
