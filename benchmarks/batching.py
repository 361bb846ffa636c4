"""Aggregate decode speed of 1, 4, 8, 16 concurrent sessions on one peer, over that of one session.

    python benchmarks/batching.py [--repeats 5] [--new-tokens 32] [--sessions 1 4 8 16] [--batch-wait-ms 5]
                                  [--long-prompt 512]

SmolLM2-135M float32, one peer serving all 30 blocks on this machine. Then one session decodes while another sends a
long prompt, which the peer computes in chunks of 128 tokens: the decoding session's longest step while the prompt
is computed is printed beside the prompt's whole time (what that step would wait if the prompt ran in one go). Each session (one client process, a thread
per session) prefills 16 tokens, then all step one token at a time together; the figure is new tokens of all
sessions per second of their decode. The sessions send hidden states (what a client sends after its embeddings),
so the client's own head does not compete with the peer for the 2 cores. The peer runs single-token steps of
sessions that are ready together as one batched forward (``peer.compute``); the mean batch it formed is read from its
/metrics. Session counts take turns within every repeat; the median over repeats is printed. Run it on an older
commit for the figures of a peer that computes one step at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.client.session import InferenceSession  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402
from swarm_peer.peer.metrics import scrape  # noqa: E402

PROMPT = 16


def decode(model, sessions: int, new_tokens: int, hidden_size: int) -> float:
    """New tokens per second of ``sessions`` sessions decoding together."""
    together = threading.Barrier(sessions + 1, timeout=300)
    errors: list[BaseException] = []

    def session() -> None:
        try:
            with InferenceSession(
                model.swarm, model.router, model.model_id, max_length=PROMPT + new_tokens
            ) as s:
                s.step(
                    torch.randn(1, PROMPT, hidden_size),
                    torch.ones(1, PROMPT, dtype=torch.long),
                    torch.arange(PROMPT)[None],
                )
                together.wait()
                for t in range(PROMPT, PROMPT + new_tokens):
                    s.step(
                        torch.randn(1, 1, hidden_size),
                        torch.ones(1, t + 1, dtype=torch.long),
                        torch.tensor([[t]]),
                    )
                together.wait()
        except BaseException as e:
            errors.append(e)
            together.abort()

    threads = [threading.Thread(target=session, daemon=True) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    together.wait()
    t0 = time.perf_counter()
    together.wait()
    seconds = time.perf_counter() - t0
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return sessions * new_tokens / seconds


def stall(model, prompt_tokens: int, hidden_size: int) -> tuple[float, float, float]:
    """A session decodes while another sends a ``prompt_tokens`` prompt: the decoding session's median and longest
    step while the prompt is computed, and the prompt's time (what the longest step would be if the prompt ran in
    one go), in ms."""
    steps_ms: list[float] = []
    prompt_s: list[float] = []
    started = threading.Event()

    def prompt() -> None:
        with InferenceSession(model.swarm, model.router, model.model_id, max_length=prompt_tokens) as s:
            started.set()
            t0 = time.perf_counter()
            s.step(
                torch.randn(1, prompt_tokens, hidden_size),
                torch.ones(1, prompt_tokens, dtype=torch.long),
                torch.arange(prompt_tokens)[None],
            )
            prompt_s.append(time.perf_counter() - t0)

    with InferenceSession(model.swarm, model.router, model.model_id, max_length=PROMPT + 256) as s:
        s.step(
            torch.randn(1, PROMPT, hidden_size),
            torch.ones(1, PROMPT, dtype=torch.long),
            torch.arange(PROMPT)[None],
        )
        other = threading.Thread(target=prompt, daemon=True)
        other.start()
        started.wait(60)
        t = PROMPT
        while not prompt_s and t < PROMPT + 256:
            t0 = time.perf_counter()
            s.step(
                torch.randn(1, 1, hidden_size), torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]])
            )
            steps_ms.append((time.perf_counter() - t0) * 1e3)
            t += 1
        other.join(timeout=120)
    return statistics.median(steps_ms), max(steps_ms), prompt_s[0] * 1e3


def counters(url: str) -> tuple[float, float]:
    """The peer's steps computed in batches, and its batches, so far."""
    samples = scrape(url)
    return samples[("swarm_peer_peer_batched_steps", ())], samples[("swarm_peer_peer_step_batches", ())]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--long-prompt", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)

    checkpoint = resolve_checkpoint(DEMO_MODEL)
    peer_args = ["--throughput", "1000", "--metrics-port", "0", "--batch-wait-ms", str(args.batch_wait_ms)]
    speeds: dict[int, list[float]] = {n: [] for n in args.sessions}
    batch_sizes: dict[int, list[float]] = {n: [] for n in args.sessions}
    with LocalSwarm(str(checkpoint.path), [(0, 30)], peer_args=peer_args) as swarm, swarm.client() as model:
        url = re.search(r"http://\S+/metrics", swarm.peers[0].log_tail(100_000)).group(0)
        decode(model, 1, 4, checkpoint.config.hidden_size)  # warm-up
        for _ in range(args.repeats):
            for n in args.sessions:
                batched, batches = counters(url)
                speeds[n].append(decode(model, n, args.new_tokens, checkpoint.config.hidden_size))
                after = counters(url)
                steps = n * (args.new_tokens + 1)  # the prefill's step too
                # the mean number of steps in a forward: batched ones over their batches, the rest alone
                alone = steps - (after[0] - batched)
                batch_sizes[n].append(steps / max(alone + after[1] - batches, 1))

        stalls = [stall(model, args.long_prompt, checkpoint.config.hidden_size) for _ in range(args.repeats)]

    base = statistics.median(speeds[args.sessions[0]])
    print(
        f"\nSmolLM2-135M float32, 1 peer x 30 blocks, {PROMPT}-token prompts then {args.new_tokens} new tokens per "
        f"session, --batch-wait-ms {args.batch_wait_ms:g}; median of {args.repeats} interleaved repeats\n"
    )
    print(f"| sessions | tokens/s, all together | vs {args.sessions[0]} session | steps per forward |")
    print("|---|---|---|---|")
    for n in args.sessions:
        speed = statistics.median(speeds[n])
        print(f"| {n} | {speed:.1f} | {speed / base:.2f}x | {statistics.median(batch_sizes[n]):.1f} |")
    print(
        f"\nA session decoding while another sends a {args.long_prompt}-token prompt (median of {args.repeats}):\n"
    )
    print("| decode step, median ms | decode step, longest ms | the prompt's step, ms |")
    print("|---|---|---|")
    median_step, longest, prompt_ms = (statistics.median(column) for column in zip(*stalls, strict=True))
    print(f"| {median_step:.1f} | {longest:.1f} | {prompt_ms:.1f} |")


if __name__ == "__main__":
    main()
