"""How much fine-tuning clients on the same peer slow a user's generation: decode ms/token alone vs while
``--trainers`` other clients run forward and backward passes through the same peer as fast as they can.

    python benchmarks/inference_first.py [--repeats 5] [--new-tokens 32] [--trainers 3] [--batch-size 2]

SmolLM2-135M float32 on one peer (30 blocks) on this machine. The peer runs a session's steps before other work
(``peer.compute``), so a step waits at most for the backward running when it arrives, not for those queued behind
it. Alone and loaded take turns within every repeat; the slowdown is taken within a repeat, then the median over
repeats is printed. Run it on an older commit for the first-in-first-out peer's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint  # noqa: E402


def ms_per_token(model, input_ids, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (time.perf_counter() - t0) * 1e3 / new_tokens


class Trainer(threading.Thread):
    """Forward and backward through the swarm in a loop, while ``loaded`` is set."""

    def __init__(self, model, batch_NT: torch.Tensor):
        super().__init__(daemon=True)
        self.model, self.batch_NT = model, batch_NT
        self.loaded, self.stop, self.steps = threading.Event(), threading.Event(), 0

    def run(self) -> None:
        self.model.get_input_embeddings().weight.requires_grad_(True)
        while not self.stop.is_set():
            if not self.loaded.wait(0.1):
                continue
            self.model(input_ids=self.batch_NT, labels=self.batch_NT).loss.backward()
            self.steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--trainers", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = str(resolve_checkpoint(DEMO_MODEL).path)
    input_ids = torch.randint(100, 10000, (1, 16))
    with LocalSwarm(path, [(0, 30)], peer_args=["--throughput", "1000"]) as swarm:
        with contextlib.ExitStack() as stack:
            user = stack.enter_context(swarm.client())
            trainers = [
                Trainer(
                    stack.enter_context(swarm.client()),
                    torch.randint(100, 10000, (args.batch_size, args.seq_len)),
                )
                for _ in range(args.trainers)
            ]
            for trainer in trainers:
                trainer.start()
            ms_per_token(user, input_ids, 4)  # warm-up
            alone, loaded, step_s = [], [], []
            for _ in range(args.repeats):
                alone.append(ms_per_token(user, input_ids, args.new_tokens))
                for trainer in trainers:
                    trainer.loaded.set()
                time.sleep(2.0)  # the trainers are under way
                steps, t0 = sum(t.steps for t in trainers), time.perf_counter()
                loaded.append(ms_per_token(user, input_ids, args.new_tokens))
                step_s.append((time.perf_counter() - t0) / max(sum(t.steps for t in trainers) - steps, 1))
                for trainer in trainers:
                    trainer.loaded.clear()
                time.sleep(3.0)  # their last steps end
            for trainer in trainers:
                trainer.stop.set()
                trainer.join(timeout=60)

    slowdown = statistics.median(b / a for a, b in zip(alone, loaded, strict=True))
    print(
        f"\nSmolLM2-135M float32, 1 peer x 30 blocks, {args.new_tokens} new tokens; {args.trainers} other clients: "
        f"forward + backward of {args.batch_size} x {args.seq_len} tokens; median of {args.repeats} repeats\n"
    )
    print("| user's generation | ms/token | slowdown vs alone |")
    print("|---|---|---|")
    print(f"| alone | {statistics.median(alone):.1f} | 1.00x |")
    print(
        f"| beside {args.trainers} fine-tuning clients | {statistics.median(loaded):.1f} | {slowdown:.2f}x |"
    )
    print(
        f"\n(a training step finished every {statistics.median(step_s):.2f} s meanwhile, all clients together)"
    )


if __name__ == "__main__":
    main()
