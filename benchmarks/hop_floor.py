"""The floor under the swarm's generation speed on this machine: the same split, with no network stack at all.

    python benchmarks/hop_floor.py [--repeats 5] [--new-tokens 64] [--threads 1]

The model's blocks are split over N worker processes exactly as ``benchmarks/generation_speed.py`` splits them over
peers (``BlockSpan``, one KV cache each). Each worker reads a step's hidden states from an OS pipe, runs its blocks
and writes its output straight into the next worker's pipe; the last one writes back to the client process, which
holds the embeddings, the final norm and the LM head and picks each token greedily. No hivemind, p2pd, asyncio,
protobuf or validation is involved: what this costs over local transformers is what splitting a model over
processes costs on this machine (cold caches when a process wakes, process switches), which no change to the
swarm's code can remove. The gap between these figures and ``generation_speed.py``'s is the swarm's own overhead.

Part of a hop here is waking a process on the other vCPU of the 2-vCPU test VM. With every process on one core
(``taskset -c 0 python benchmarks/hop_floor.py``), two runs on 2026-12-04 gave a tiny model's hop as 0.29-0.41
and 0.26-1.10 ms, and 3 workers at 0.97x and 0.95x local; unpinned, 0.75-0.78 and 0.65-0.77 ms, 0.92x and 0.95x.
Pinning does not help the swarm, whose p2pd daemons and event loops then share that core with the compute.

Both sides run the same plain greedy loop (no ``generate()``), so only the split differs. Prints, against local
transformers measured in the same run (all setups take turns within each repeat):
1. SmolLM2-135M float32, batch 1: 1 worker x 30 blocks and 3 workers x 10 blocks;
2. a tiny 8-block Llama through 1, 2, 4 and 8 workers, and the cost of each extra hop.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from generation_speed import save_tiny_llama  # noqa: E402  (this folder is on sys.path when run as a script)
from transformers import AutoModelForCausalLM  # noqa: E402

from swarm_peer.cli.demo import even_spans  # noqa: E402
from swarm_peer.compat import CACHE  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402

_RESET, _STOP = b"reset", b"stop"


def _worker(model: str, a: int, b: int, threads: int, inbox, outbox, ready) -> None:
    """Runs blocks [a, b) on every step read from ``inbox``; writes the output to ``outbox``."""
    from swarm_peer.peer.blocks import BlockSpan

    torch.set_num_threads(threads)
    span = BlockSpan(resolve_checkpoint(model), a, b)
    cache, past = span.new_cache(a, b), 0
    ready.put((a, b))
    with torch.inference_mode():
        while (message := inbox.recv_bytes()) != _STOP:
            if message == _RESET:  # a new sequence: a fresh cache, passed on down the chain
                cache, past = span.new_cache(a, b), 0
                outbox.send_bytes(_RESET)
                continue
            hidden_BTD = torch.frombuffer(bytearray(message), dtype=torch.float32).view(
                1, -1, span.hidden_size
            )
            T = hidden_BTD.shape[1]
            mask_BS = torch.ones(1, past + T, dtype=torch.long)
            out_BTD = span.forward(hidden_BTD, mask_BS, torch.arange(past, past + T)[None], a, b, cache)
            past += T
            outbox.send_bytes(out_BTD.numpy().tobytes())
    outbox.send_bytes(_STOP)


class _Chain:
    """Worker processes for ``spans`` of ``model``, piped one into the next; generates greedily through them."""

    def __init__(self, context, model: str, spans, threads: int, ready):
        pipes = [context.Pipe(duplex=False) for _ in range(len(spans) + 1)]  # (read end, write end)
        for i, (a, b) in enumerate(spans):
            args = (model, a, b, threads, pipes[i][0], pipes[i + 1][1], ready)
            context.Process(target=_worker, args=args, daemon=True).start()
        self.send, self.receive = pipes[0][1], pipes[-1][0]

    def seconds_per_token(self, local, input_ids: torch.Tensor, new_tokens: int) -> float:
        self.send.send_bytes(_RESET)
        assert self.receive.recv_bytes() == _RESET
        ids, D = input_ids, local.config.hidden_size
        with torch.inference_mode():
            for i in range(new_tokens + 1):
                if i == 1:  # the prompt's step is not timed, as in generation_speed.py's per-token figures
                    t0 = time.perf_counter()
                self.send.send_bytes(local.model.embed_tokens(ids).numpy().tobytes())
                out_BTD = torch.frombuffer(bytearray(self.receive.recv_bytes()), dtype=torch.float32)
                ids = local.lm_head(local.model.norm(out_BTD.view(1, -1, D)[:, -1:])).argmax(-1)
        return (time.perf_counter() - t0) / new_tokens

    def close(self) -> None:
        self.send.send_bytes(_STOP)
        self.receive.recv_bytes()


def _local_seconds_per_token(local, input_ids: torch.Tensor, new_tokens: int) -> float:
    with torch.inference_mode():
        out = local(input_ids, use_cache=True)
        cache, ids = getattr(out, CACHE), out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = local(ids, use_cache=True, **{CACHE: cache})
            ids = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new_tokens


def measure(model: str, worker_counts, args) -> dict[str, list[float]]:
    """Seconds per token, one figure per repeat: local, then each chain; all take turns within each repeat."""
    checkpoint = resolve_checkpoint(model)
    local = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), dtype=torch.float32).eval()
    context = mp.get_context("spawn")
    ready = context.Queue()
    chains = {
        n: _Chain(context, model, even_spans(checkpoint.num_blocks, n), args.threads, ready)
        for n in worker_counts
    }
    for _ in range(sum(worker_counts)):
        ready.get(timeout=300)
    input_ids = torch.randint(0, min(10000, checkpoint.config.vocab_size), (1, 16))
    runs = {"local transformers": lambda: _local_seconds_per_token(local, input_ids, args.new_tokens)}
    for n, chain in chains.items():
        runs[f"{n} worker(s)"] = lambda chain=chain: chain.seconds_per_token(
            local, input_ids, args.new_tokens
        )
    try:
        for run in runs.values():  # warm-up
            run()
        figures = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                figures[name].append(run())
    finally:
        for chain in chains.values():
            chain.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every process, the client's too"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    figures = measure(DEMO_MODEL, (1, 3), args)
    base = statistics.median(figures["local transformers"])
    print(
        f"\nSmolLM2-135M float32, batch 1, {args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"| {'setup':<20} | {'ms/token':>8} | {'vs local':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 10}|")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"| {name:<20} | {median * 1e3:8.2f} | {base / median:7.2f}x |")

    tiny_dir = save_tiny_llama()
    figures = measure(tiny_dir, (1, 2, 4, 8), args)
    one = statistics.median(figures["1 worker(s)"])
    print(f"\nTiny 8-block Llama, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"| {'setup':<20} | {'ms/token':>8} | {'ms/hop':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 10}|")
    for name, values in figures.items():
        median = statistics.median(values)
        n = int(name.split()[0]) if name[0].isdigit() else 0
        per_hop = f"{(median - one) * 1e3 / (n - 1):.2f}" if n > 1 else ("baseline" if n == 1 else "")
        print(f"| {name:<20} | {median * 1e3:8.2f} | {per_hop:>8} |")


if __name__ == "__main__":
    main()
