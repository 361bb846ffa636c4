"""Train a small classifier with a decentralized mixture-of-experts layer on sklearn's bundled digits, its experts
on peers of a local swarm, and print its accuracy.

    python examples/dmoe_digits.py [--peers 4] [--steps 600] [--batch 8] [--kill-one] [--fail-rate 0.1] [--k-min 1]

Model: Linear(64 -> 32), then x + RemoteMixtureOfExperts(x) (an 8 x 8 grid of ``ffn`` experts of width 32, the
best 4 of them per sample), LayerNorm, Linear(32 -> 10). The peers (``swarm-peer join --experts``) split the grid's
rows; the experts learn on their peers from the gradients this trainer sends back (their own AdamW, after
``--update-every`` samples), the rest of the model here (Adam). The layer joins the swarm from its multiaddrs alone
(``initial_peers``).

Faults: ``--kill-one`` kills one peer (kill -9) before the first step: its experts fail, the layer leaves them out,
and training goes on with the others. ``--fail-rate P`` makes every peer refuse a share P of its requests (as busy,
at random; ``join --fail-rate``): with ``--k-min 0`` a sample none of whose experts answered passes through the
residual alone, with ``--k-min 1`` it is an error. It stops with an error at the first loss that is not finite, and
if any weight of the model is not finite at the end. The last line reads::

    accuracy 0.967 after 600 steps (95 samples/s); 12 of 4409 expert requests failed
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from swarm_peer.cli.local_swarm import LocalSwarm, wait_for_experts
from swarm_peer.moe import RemoteMixtureOfExperts

GRID, WIDTH = (8, 8), 32


class Classifier(nn.Module):
    def __init__(self, initial_peers: list[str], k_min: int, avoid_seconds: float):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(64, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 10)
        self.moe = RemoteMixtureOfExperts(
            in_features=WIDTH,
            grid_size=GRID,
            uid_prefix="ffn.",
            k_best=4,
            k_min=k_min,
            timeout_after_k_min=1.0,
            avoid_seconds=avoid_seconds,
            initial_peers=initial_peers,
        )

    def forward(self, pixels_B64: torch.Tensor) -> torch.Tensor:
        h_BD = self.embed(pixels_B64)
        return self.head(self.norm(h_BD + self.moe(h_BD)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=4, help="expert peers; they split the grid's 8 rows")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's here and the experts' AdamW")
    parser.add_argument("--seed", type=int, default=0, help="of the model here and of the batches")
    parser.add_argument("--kill-one", action="store_true", help="kill -9 one peer before training")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of requests each peer refuses")
    parser.add_argument("--k-min", type=int, default=1, help="answers each sample needs (0: none)")
    parser.add_argument(
        "--avoid-seconds", type=float, default=30.0, help="how long the layer avoids a peer after it failed"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    pixels, labels = load_digits(return_X_y=True)
    pixels = torch.tensor(pixels / 16.0, dtype=torch.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, torch.tensor(labels), test_size=0.3, random_state=0
    )

    rows = [GRID[0] * p // args.peers for p in range(args.peers + 1)]
    with LocalSwarm("", [], env={"OMP_NUM_THREADS": "1"}) as swarm:
        peers = swarm.add_expert_peers(
            *(
                ["--experts", f"ffn.[{a}:{b}].[0:{GRID[1]}]", "--hidden", str(WIDTH), "--update-every", "4",
                 "--lr", str(args.lr), "--fail-rate", str(args.fail_rate)]
                for a, b in zip(rows, rows[1:], strict=False)
            )
        )  # fmt: skip
        model = Classifier(swarm.initial_peers, args.k_min, args.avoid_seconds)
        wait_for_experts(model.moe.runtime.dht, [f"ffn.{a}.0" for a in rows[:-1]])
        if args.kill_one:
            os.killpg(peers[0].process.pid, signal.SIGKILL)
            print(f"killed {peers[0].name} (experts ffn.[{rows[0]}:{rows[1]}].*)")
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        t0 = time.perf_counter()
        for step in range(args.steps):
            batch = torch.randint(0, len(x_train), (args.batch,))
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            if not torch.isfinite(loss):
                raise SystemExit(f"step {step}: the loss is {loss.item()}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                print(f"step {step}: loss {loss.item():.3f}")
        seconds = time.perf_counter() - t0
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise SystemExit("some of the model's weights are not finite")
        # in batches as in training, so that failures hit the test set as they hit training
        with torch.no_grad():
            logits = torch.cat([model(x) for x in x_test.split(args.batch)])
            accuracy = (logits.argmax(1) == y_test).float().mean().item()
        requests = model.moe.requests
        sent = requests["forward"] + requests["backward"]
        failed = requests["forward_failed"] + requests["backward_failed"]
        print(
            f"accuracy {accuracy:.3f} after {args.steps} steps ({args.steps * args.batch / seconds:.0f} samples/s); "
            f"{failed} of {sent} expert requests failed"
        )


if __name__ == "__main__":
    main()
