"""Moshpit groups against one group of all: 16 peers averaging 1M values in groups of 4 on a 4x4 grid, or all 16 in
one group.

    python benchmarks/moshpit.py [--peers 16] [--group-size 4] [--size 1000000] [--repeats 3]

Every peer runs a DHT node and a ``RobustAverager`` (the plain mean, so that the exact mean is the target; a process
each) on 127.0.0.1. On the grid, each round's group and key come from ``protocols.moshpit`` (the rows, then the
columns), given to ``average(group_bits=, group_size=)`` as ``swarm-peer train`` does; one group of all is one round
of ``--peers``. Setups take turns within every repeat, on fresh averagers, after a first repeat that is not counted
(the first rounds between fresh peers are slow to connect: a group of 4 once missed its 120 s round); the table
gives medians over repeats:
- s/round: from the moment all peers ask for a round until the last one has its result (matchmaking included: a
  group assembles as soon as its last member asks);
- MiB sent/peer/round: what each averager process wrote (``/proc/PID/io`` wchar), the median over peers;
- deviation: the mean squared distance of the peers' values from the exact mean of the inputs (inputs: standard
  normal, so about 1 before any round), after round 1 and after round d (the grid's dimensions).
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import arguments, held, load, median_written, start_dhts, together, written

from swarm_peer.dht.node import local_peer_id
from swarm_peer.protocols.averaging import RobustAverager
from swarm_peer.protocols.moshpit import grid_shape, moshpit_group

MATCHMAKING = 2.0  # min_matchmaking_time: a group assembles before it once all its members are in


def _round(averagers, ids: list[str], group_size: int, t: int) -> tuple[float, float, int]:
    """Seconds, median bytes written per peer, and peers whose group did not form whole, of round ``t``: every peer
    in its group of the grid of ``group_size`` (one group when it holds them all)."""
    groups = [moshpit_group(ids, me, group_size, t) for me in ids]
    before = [written(a.pid) for a in averagers]
    done, missed = [0.0] * len(averagers), [False] * len(averagers)

    def run(i):
        result = averagers[i].average(
            timeout=120, group_bits=groups[i].key_bits, group_size=len(groups[i].members)
        )
        missed[i] = result is None or set(result.peers) != set(groups[i].members)
        done[i] = time.perf_counter()

    t0 = together(run, len(averagers))
    return max(done) - t0, median_written([a.pid for a in averagers], before), sum(missed)


def _deviation(averagers, mean_D: torch.Tensor) -> float:
    return torch.stack([x - mean_D for x in held(averagers)]).pow(2).mean().item()


def main() -> None:
    parser = arguments(16, 1_000_000, 3)
    parser.add_argument("--group-size", type=int, default=4)
    args = parser.parse_args()
    n = args.peers
    dhts = start_dhts(n)
    ids = [str(local_peer_id(d)) for d in dhts]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(args.size, generator=g) for _ in range(n)]
    mean_D = torch.stack(inputs).mean(0)
    _, dims = grid_shape(n, args.group_size)
    setups = {
        f"groups of {args.group_size}, {dims} rounds": (args.group_size, dims),
        f"one group of {n}": (n, 1),
    }
    figures = {name: {"time": [], "sent": [], "first": [], "last": []} for name in setups}
    for repeat in range(-1, args.repeats):  # repeat -1: the warm-up
        for name, (group_size, rounds) in setups.items():
            averagers = [
                RobustAverager(
                    [torch.zeros(args.size)],
                    d,
                    prefix=f"{group_size}-{repeat}",
                    aggregator="mean",
                    min_group_size=min(group_size, n),
                    min_matchmaking_time=MATCHMAKING,
                    request_timeout=1.0,
                )
                for d in dhts
            ]
            try:
                load(averagers, inputs)
                for t in range(rounds):
                    seconds, sent, missed = _round(averagers, ids, group_size, t)
                    deviation = _deviation(averagers, mean_D)
                    print(f"repeat {repeat}: {name}, round {t + 1}: {seconds:.2f} s, {sent / 2**20:.1f} MiB, "
                          f"deviation {deviation:.2e}, {missed} peers out of their group", flush=True)  # fmt: skip
                    if repeat >= 0:
                        figures[name]["time"].append(seconds)
                        figures[name]["sent"].append(sent)
                        figures[name]["first" if t == 0 else "last"].append(deviation)
            finally:
                for averager in averagers:
                    averager.shutdown()
    print(f"\n{n} peers, {args.size / 1e6:g}M float32 values (mean), median of {args.repeats} repeats")
    print(f"| {'setup':<22} | {'s/round':>7} | {'MiB sent/peer/round':>19} | {'total s':>7} | "
          f"{'deviation after round 1':>23} | {f'after round {dims}':>14} |")  # fmt: skip
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 21}|{'-' * 9}|{'-' * 25}|{'-' * 16}|")
    for name, (_, rounds) in setups.items():
        f = figures[name]
        t, s = statistics.median(f["time"]), statistics.median(f["sent"])
        last = f"{statistics.median(f['last']):14.1e}" if f["last"] else f"{'(exact)':>14}"
        print(f"| {name:<22} | {t:7.2f} | {s / 2**20:19.1f} | {t * rounds:7.2f} | "
              f"{statistics.median(f['first']):23.1e} | {last} |")  # fmt: skip
    for d in dhts:
        d.shutdown()


if __name__ == "__main__":
    main()
