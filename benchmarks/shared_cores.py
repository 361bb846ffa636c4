"""Two peers on one machine: each on its share of the cores (the default) vs each on all of them.

    python benchmarks/shared_cores.py [--repeats 5] [--new-tokens 32] [--sessions 4] [--prompt 256]

SmolLM2-135M float32, 2 peers x 15 blocks on this machine, for each setting: a 256-token prompt's step (time to
its answer), one session decoding alone, and 4 sessions decoding together (new tokens of all per second). Both
settings' swarms are up at once and take turns within every repeat; medians over repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from batching import decode  # noqa: E402

from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.client.session import InferenceSession  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402


def prompt_ms(model, tokens: int, hidden_size: int) -> float:
    with InferenceSession(model.swarm, model.router, model.model_id, max_length=tokens) as s:
        t0 = time.perf_counter()
        s.step(
            torch.randn(1, tokens, hidden_size),
            torch.ones(1, tokens, dtype=torch.long),
            torch.arange(tokens)[None],
        )
        return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = resolve_checkpoint(DEMO_MODEL)
    path, hidden = str(checkpoint.path), checkpoint.config.hidden_size
    cores = len(os.sched_getaffinity(0))
    settings = {
        "a share each (default)": ["--throughput", "1000"],
        f"all {cores} cores each": ["--throughput", "1000", "--compute-threads", str(cores)],
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"prompt": [], "one": [], "many": []} for name in settings
    }
    with contextlib.ExitStack() as stack:
        models = {}
        for name, peer_args in settings.items():
            swarm = stack.enter_context(LocalSwarm(path, [(0, 15), (15, 30)], peer_args=peer_args))
            models[name] = stack.enter_context(swarm.client())
            decode(models[name], 1, 4, hidden)  # warm-up
        for _ in range(args.repeats):
            for name, model in models.items():
                results[name]["prompt"].append(prompt_ms(model, args.prompt, hidden))
                results[name]["one"].append(decode(model, 1, args.new_tokens, hidden))
                results[name]["many"].append(decode(model, args.sessions, args.new_tokens, hidden))

    print(
        f"\nSmolLM2-135M float32, 2 peers x 15 blocks on one {cores}-core machine (4 processes with the other "
        f"setting's swarm idle beside); median of {args.repeats} interleaved repeats\n"
    )
    print(
        f"| threads per peer | {args.prompt}-token prompt, ms | 1 session, tokens/s | {args.sessions} sessions, tokens/s |"
    )
    print("|---|---|---|---|")
    for name, figures in results.items():
        prompt, one, many = (statistics.median(figures[key]) for key in ("prompt", "one", "many"))
        print(f"| {name} | {prompt:.1f} | {one:.1f} | {many:.1f} |")


if __name__ == "__main__":
    main()
