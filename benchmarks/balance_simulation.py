"""How close the block-choice and rebalancing rules keep a churning swarm to its best possible throughput.

    python benchmarks/balance_simulation.py [--blocks 80] [--peers 1000] [--periods 30] [--seed 0]
    python benchmarks/balance_simulation.py --outage 10      # and a region outage at period 10
    python benchmarks/balance_simulation.py --joins random   # control: joiners ignore choose_span

A discrete simulation of ``swarm_peer.peer.balance`` (no network): ``--peers`` peers join one by one
(``choose_span``), each with a throughput ~ log-normal(0, 1) tokens/s through its whole span and a span
length uniform in 4..16 blocks (what fits in its memory). Then, each period: ``--churn`` of the peers
leave at random, as many new ones join (``choose_span``), and every peer, in random order, runs
``plan_move`` once and moves at once if told to (rebalancing periods are randomized per peer). Period 0 is
the initial swarm and one rebalancing pass, without churn. With ``--outage K``, period K has no churn:
instead every peer hosting one random block leaves and nobody replaces them, so the swarm has a gap that only
rebalancing can close (the later periods' joiners then see a smaller swarm). With ``--joins random``, a
control, joiners take a random start instead of ``choose_span``'s, so rebalancing has to do all the work
(slower: near the quality margin most ``plan_move`` calls run the full settling estimate, ~0.15 s each).

Columns: the bottleneck (smallest per-block throughput) after churn and after rebalancing, the optimum, their
ratio, and the moves. The optimum is an upper bound: the best bottleneck of a *fractional* placement,
where a peer may split its throughput over any starts of its span length (a linear program, scipy's HiGHS;
scipy comes with hivemind). It is at most the plain bound sum(throughput * length) / blocks (a perfect even
spread); with lengths 4..16 on 80 blocks the two agree, and the table shows both where they differ. No
integral placement beats it, so ratio <= 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy.optimize import linprog

from swarm_peer.peer.balance import SpanLoad, choose_span, plan_move, swarm_throughput


def optimum(spans: dict[int, SpanLoad], num_blocks: int) -> tuple[float, float]:
    """(LP bound, even-spread bound) on the bottleneck of any placement of these peers' spans."""
    even = sum(span.throughput * span.length for span in spans.values()) / num_blocks
    capacity: dict[int, float] = {}  # span length -> summed throughput of the peers of that length
    for span in spans.values():
        capacity[span.length] = capacity.get(span.length, 0.0) + span.throughput
    # variables: x[length, start] >= 0 (throughput placed at that start), then z (the bottleneck)
    columns = [(length, start) for length in capacity for start in range(num_blocks - length + 1)]
    covers = np.zeros((num_blocks, len(columns) + 1))
    for c, (length, start) in enumerate(columns):
        covers[start : start + length, c] = 1.0
    covers[:, -1] = -1.0  # z <= throughput of every block  <=>  z - sum(x covering b) <= 0
    placed = np.zeros((len(capacity), len(columns) + 1))
    for row, length in enumerate(capacity):
        placed[row, [c for c, (other, _) in enumerate(columns) if other == length]] = 1.0
    cost = np.zeros(len(columns) + 1)
    cost[-1] = -1.0  # maximize z
    result = linprog(
        cost,
        A_ub=-covers,
        b_ub=np.zeros(num_blocks),
        A_eq=placed,
        b_eq=list(capacity.values()),
        method="highs",
    )
    assert result.success, f"the LP bound failed: {result.message}"
    return min(-result.fun, even), even


def rebalance(spans: dict[int, SpanLoad], num_blocks: int, quality: float, rng: np.random.Generator) -> int:
    """Every peer, in random order, runs ``plan_move`` once and moves at once; returns the number of moves."""
    moves = 0
    for peer in rng.permutation(list(spans)).tolist():
        start = plan_move(peer, spans, num_blocks, quality=quality, rng=rng)
        if start is not None:
            span = spans[peer]
            spans[peer] = SpanLoad(start, start + span.length, span.throughput)
            moves += 1
    return moves


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=80, help="transformer blocks in the model")
    parser.add_argument("--peers", type=int, default=1000, help="peers in the swarm")
    parser.add_argument("--periods", type=int, default=30, help="periods of churn and rebalancing")
    parser.add_argument("--churn", type=float, default=0.1, help="fraction of peers replaced per period")
    parser.add_argument("--quality", type=float, default=0.75, help="plan_move's quality margin")
    parser.add_argument(
        "--outage",
        type=int,
        default=0,
        help="at this period, instead of churn, every peer hosting one random block leaves and no one joins",
    )
    parser.add_argument(
        "--joins",
        choices=("weakest", "random"),
        default="weakest",
        help="where joiners go: choose_span's weakest window, or a random one (a control)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    next_id = 0

    def join() -> None:
        nonlocal next_id
        throughput = float(rng.lognormal(0.0, 1.0))
        length = int(rng.integers(4, 17))
        if args.joins == "weakest":
            start, end = choose_span(spans, args.blocks, length)
        else:
            start = int(rng.integers(0, args.blocks - length + 1))
            end = start + length
        spans[next_id] = SpanLoad(start, end, throughput)
        next_id += 1

    spans: dict[int, SpanLoad] = {}
    for _ in range(args.peers):
        join()

    print(
        f"\n{args.blocks} blocks, {args.peers} peers, {args.churn:.0%} churn per period, "
        f"quality {args.quality}, joins {args.joins}, outage at period {args.outage or 'none'}, "
        f"seed {args.seed}"
    )
    print(
        f"| {'period':>6} | {'peers':>5} | {'after churn':>11} | {'rebalanced':>10} | {'optimum':>9} "
        f"| {'ratio':>6} | {'moves':>5} | {'s':>5} |"
    )
    print(f"|{'-' * 8}|{'-' * 7}|{'-' * 13}|{'-' * 12}|{'-' * 11}|{'-' * 8}|{'-' * 7}|{'-' * 7}|")
    ratios, moves_per_period = [], []
    for period in range(args.periods + 1):
        period_started = time.perf_counter()
        if period > 0 and period == args.outage:
            block = int(rng.integers(args.blocks))
            for peer in [peer for peer, span in spans.items() if span.start <= block < span.end]:
                del spans[peer]
        elif period > 0:
            leaving = rng.choice(list(spans), size=round(args.churn * len(spans)), replace=False)
            for peer in leaving.tolist():
                del spans[peer]
            for _ in leaving:
                join()
        after_churn = swarm_throughput(spans, args.blocks)
        moves = rebalance(spans, args.blocks, args.quality, rng)
        throughput = swarm_throughput(spans, args.blocks)
        best, even = optimum(spans, args.blocks)
        ratio = throughput / best
        ratios.append(ratio)
        moves_per_period.append(moves)
        shown = f"{best:9.2f}" if even - best < 1e-6 * even else f"{best:.1f}<{even:.1f}"
        print(
            f"| {period:>6} | {len(spans):>5} | {after_churn:>11.2f} | {throughput:>10.2f} | {shown:>9} "
            f"| {ratio:>6.3f} | {moves:>5} | {time.perf_counter() - period_started:>5.1f} |"
        )

    steady = slice(len(ratios) // 2, None)  # the last half of the periods
    print(
        f"\nsteady state (periods {len(ratios) // 2}..{args.periods}): median ratio "
        f"{statistics.median(ratios[steady]):.3f} (min {min(ratios[steady]):.3f}); moves per period: "
        f"median {statistics.median(moves_per_period[steady]):g}, max {max(moves_per_period[steady])} "
        f"(max {max(moves_per_period)} over all periods); {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
