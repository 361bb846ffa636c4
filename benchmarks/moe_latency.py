"""A mixture-of-experts layer on peers against the same experts in-process and against hivemind's layer and servers;
and the samples/s of the digits example with and without failures.

    python benchmarks/moe_latency.py [--peers 4] [--experts-per-peer 16] [--hidden 512] [--k 4] [--batch 32]
                                     [--repeats 20] [--digits-steps 300] [--quick]

1. Latency (issue #21's setup by default: 4 peers x 16 ``ffn`` experts, hidden 512, k = 4 of 64, batch 32): one
   forward+backward of a batch through
   - ``ours``: ``RemoteMixtureOfExperts`` over ``--peers`` expert peers on 127.0.0.1 (``swarm-peer join --experts
     'ffn.P.[0:E]'``: peer P hosts row P of a P x E grid; ``--update-every`` so large that they never step), made
     from ``initial_peers`` alone;
   - ``in-process``: the same gate (``proj``) and the same experts in this process, the exact top k of the summed
     scores, one batched call per chosen expert;
   - ``hivemind``: ``hivemind.moe.RemoteMixtureOfExperts`` over as many ``hivemind.moe.Server`` processes with the
     same grid (``hm.P.[0:E]``; their ``ffn`` adds a LayerNorm to ours, the same two matrices; no optimizer, 4
     connection handlers each: its default of 8 per expert would be 128 processes per server).
   Every peer and server computes on ``cores // peers`` torch threads (one each on 2 cores), the in-process layer on
   torch's default; our layer reuses its grid lookups for 5 s (``search_cache_seconds``), as it does by default.
   All three are up at once and take turns within every repeat, after one warm-up call each; each ratio is taken
   within a repeat and the table gives medians over ``--repeats`` (this shared machine drifts over minutes). The
   issue asks for ``ours`` within 1.5x of in-process; hivemind 1.1.12 measured 864 ms against 229 ms (3.8x).
2. Samples/s of ``examples/dmoe_digits.py`` (``--peers`` peers, batch 8, ``--digits-steps`` steps, ``--k-min 0``)
   with no failures and with every peer refusing 10% of its requests (``--fail-rate 0.1``), and its accuracy.

``--quick``: a smoke run (2 peers x 4 experts, hidden 64, batch 8, 3 repeats, 30 digits steps).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hivemind
import torch
from hivemind.moe import RemoteMixtureOfExperts as HivemindMixture
from hivemind.moe.server import background_server
from torch import nn

from swarm_peer.cli.local_swarm import LocalSwarm, wait_for_experts
from swarm_peer.moe import RemoteMixtureOfExperts, create_expert

EXAMPLE = Path(__file__).parent.parent / "examples" / "dmoe_digits.py"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class LocalMixture(nn.Module):
    """The layer's computation with every expert here: exact top k of the summed scores, softmax over them."""

    def __init__(self, proj: nn.Linear, grid_size: tuple[int, int], k: int, hidden: int):
        super().__init__()
        self.proj, self.grid_size, self.k = proj, grid_size, k
        rows, cols = grid_size
        self.experts = nn.ModuleList(
            create_expert("ffn", hidden, f"ffn.{i}.{j}") for i in range(rows) for j in range(cols)
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        s0, s1 = self.proj(x_BD).split(self.grid_size, dim=-1)
        logits_BE = (s0[:, :, None] + s1[:, None, :]).flatten(1)
        top_BK, index_BK = logits_BE.topk(self.k, dim=-1)
        out_BKD = torch.zeros(*index_BK.shape, x_BD.shape[1])
        for e in index_BK.unique().tolist():
            rows, slots = (index_BK == e).nonzero(as_tuple=True)
            out_BKD = out_BKD.index_put((rows, slots), self.experts[e](x_BD[rows]))
        return (top_BK.softmax(-1).unsqueeze(-1) * out_BKD).sum(1)


def forward_backward(layer: nn.Module, x_BD: torch.Tensor) -> float:
    """Seconds of one forward+backward of ``layer`` on ``x_BD``."""
    x = x_BD.clone().requires_grad_(True)
    t0 = time.perf_counter()
    layer(x).square().mean().backward()
    return time.perf_counter() - t0


def time_interleaved(
    layers: dict[str, nn.Module], x_BD: torch.Tensor, repeats: int
) -> dict[str, list[float]]:
    """Seconds of a forward+backward of each layer, one figure per repeat (after one warm-up each), the layers
    taking turns within every repeat."""
    for layer in layers.values():
        forward_backward(layer, x_BD)
    figures: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            figures[name].append(forward_backward(layer, x_BD))
    return figures


def latency(args) -> dict[str, list[float]]:
    grid, E = (args.peers, args.experts_per_peer), args.experts_per_peer
    # the peers share this machine's cores: each computes on its share (torch's default, every core, in each of
    # them made ours 5x slower and hivemind's 3x on 2 cores, as their threads spun against each other)
    threads = max(1, (os.cpu_count() or 1) // args.peers)
    with contextlib.ExitStack() as stack:
        swarm = stack.enter_context(LocalSwarm("", []))
        swarm.add_expert_peers(
            *(
                ["--experts", f"ffn.{p}.[0:{E}]", "--hidden", str(args.hidden), "--update-every", str(10**9),
                 "--compute-threads", str(threads)]
                for p in range(args.peers)
            )
        )  # fmt: skip
        boot = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
        stack.callback(boot.shutdown)
        hm_peers = [str(maddr) for maddr in boot.get_visible_maddrs()]
        own_threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # the servers' processes are forked from this one: they keep it
        for p in range(args.peers):
            stack.enter_context(
                background_server(
                    expert_uids=[f"hm.{p}.{j}" for j in range(E)],
                    expert_cls="ffn",
                    hidden_dim=args.hidden,
                    optim_cls=None,
                    num_handlers=4,
                    device="cpu",
                    initial_peers=hm_peers,
                    host_maddrs=LOOPBACK,
                )
            )
        torch.set_num_threads(own_threads)
        hm_client = hivemind.DHT(start=True, initial_peers=hm_peers, client_mode=True)
        stack.callback(hm_client.shutdown)

        torch.manual_seed(0)
        ours = RemoteMixtureOfExperts(
            in_features=args.hidden,
            grid_size=grid,
            uid_prefix="ffn.",
            k_best=args.k,
            initial_peers=swarm.initial_peers,
        )
        wait_for_experts(ours.runtime.dht, [f"ffn.{p}.0" for p in range(args.peers)])
        theirs = HivemindMixture(
            in_features=args.hidden, grid_size=grid, dht=hm_client, uid_prefix="hm.", k_best=args.k
        )
        theirs.proj.load_state_dict(ours.proj.state_dict())  # the same gate: the same choices
        layers = {
            "ours": ours,
            "in-process": LocalMixture(ours.proj, grid, args.k, args.hidden),
            "hivemind": theirs,
        }
        x_BD = torch.randn(args.batch, args.hidden)
        return time_interleaved(layers, x_BD, args.repeats)


def digits(args, fail_rate: float) -> tuple[float, float]:
    """(samples/s, accuracy) of the digits example with every peer refusing ``fail_rate`` of its requests."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--peers", str(args.peers), "--steps", str(args.digits_steps),
         "--k-min", "0", "--fail-rate", str(fail_rate)],
        capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    match = re.search(r"accuracy (\S+) after \d+ steps \((\d+) samples/s\)", result.stdout)
    if result.returncode or match is None:
        raise RuntimeError(f"the digits example failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return float(match[2]), float(match[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--experts-per-peer", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a smoke run of small sizes")
    args = parser.parse_args()
    if args.quick:
        args.peers, args.experts_per_peer, args.hidden, args.batch = 2, 4, 64, 8
        args.repeats, args.digits_steps = 3, 30

    figures = latency(args)
    median = {name: statistics.median(seconds) for name, seconds in figures.items()}
    ratio = {
        name: statistics.median(s / b for s, b in zip(figures[name], figures["in-process"], strict=True))
        for name in ("ours", "hivemind")
    }
    experts = args.peers * args.experts_per_peer
    print(
        f"\nforward+backward, k = {args.k} of {experts} experts on {args.peers} peers, hidden {args.hidden}, "
        f"batch {args.batch}; medians of {args.repeats} repeats"
    )
    print("| layer | ms | x in-process |")
    print("|---|---|---|")
    for name in ("ours", "in-process", "hivemind"):
        times = f"{ratio[name]:.2f}x" if name in ratio else "1x"
        print(f"| {name} | {median[name] * 1000:.1f} | {times} |")

    print(f"\ndigits example, {args.peers} peers, batch 8, {args.digits_steps} steps, k_min 0")
    print("| failed requests | samples/s | accuracy |")
    print("|---|---|---|")
    for fail_rate in (0.0, 0.1):
        samples_per_s, accuracy = digits(args, fail_rate)
        print(f"| {fail_rate:.0%} | {samples_per_s:.0f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
