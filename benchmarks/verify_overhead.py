"""What ``--verify`` costs a round: 8 peers averaging 10M values with CenteredClip, with and without BTARD's checks.

    python benchmarks/verify_overhead.py [--peers 8] [--size 10000000] [--repeats 3] [--rate 0.25]

Every peer runs a DHT node and an averager (a process each) on 127.0.0.1; the checks after the all-reduce (commit,
reveal, check, accuse on the DHT board, and judging) run for all peers at once in this process, one thread each,
as each trainer would run its own. Setups take turns within every repeat; the table gives medians over repeats:
- all-reduce s: from the moment all peers ask for a round until the last one has its result;
- checks s: from then until the last peer has judged the round (validators recompute with a stand-in that
  returns the peer's update at once: a trainer's recomputation costs what its ``--inner-steps`` cost);
- MiB sent/peer: what each peer's averager and DHT processes wrote (``/proc/PID/io`` wchar), median over peers.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import arguments, load, start_dhts, together, written
from hivemind.compression import NoCompression

from swarm_peer.dht.node import local_identity, local_peer_id
from swarm_peer.protocols.averaging import RobustAverager
from swarm_peer.protocols.board import run_round
from swarm_peer.protocols.verification import MemberRound

MATCHMAKING = 2.0


def _round(averagers, dhts, inputs, verify: bool, rate: float) -> tuple[float, float, float, int]:
    """(all-reduce seconds, check seconds, median MiB written per peer, peers banned) of one round."""
    load(averagers, inputs)
    pids = [(a.pid, d.pid) for a, d in zip(averagers, dhts, strict=True)]
    before = [written(a) + written(d) for a, d in pids]
    reduced, checked, banned = [0.0] * len(averagers), [0.0] * len(averagers), [0] * len(averagers)

    def run(i):
        result = averagers[i].average(timeout=120, tau=1.0)
        reduced[i] = time.perf_counter()
        if verify and result is not None:
            with averagers[i].get_tensors() as (tensor,):
                got = tensor.clone()
            member = MemberRound.from_transcript(result.transcript, local_identity(dhts[i]), inputs[i], got)
            ranks = _ranks(result, dhts)  # member m of the round is peer ranks[m] here
            verdict = run_round(
                dhts[i],
                "bench",
                member,
                rate=rate,
                recompute=lambda m: inputs[ranks[m]],
                evidence=(averagers[i].keep_evidence, averagers[i].fetch_evidence),  # as the trainer does
                timeout=60,
            )
            banned[i] = len(verdict)
        checked[i] = time.perf_counter()

    t0 = together(run, len(averagers))
    sent = statistics.median(written(a) + written(d) - b for (a, d), b in zip(pids, before, strict=True))
    return max(reduced) - t0, max(checked) - max(reduced), sent / 2**20, max(banned)


def _ranks(result, dhts) -> list[int]:
    """For each member of the round (group order), the index of its DHT among ``dhts``."""
    ids = [local_peer_id(d).to_base58() for d in dhts]
    return [ids.index(peer) for peer in result.peers]


def main() -> None:
    parser = arguments(8, 10_000_000, 3)
    parser.add_argument("--rate", type=float, default=0.25)
    args = parser.parse_args()
    n = args.peers
    dhts = start_dhts(n)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.size, generator=g)
    inputs = [base + 0.1 * torch.randn(args.size, generator=g) for _ in range(n)]
    common = dict(
        min_group_size=n,
        target_group_size=n,
        min_matchmaking_time=MATCHMAKING,
        request_timeout=1.0,
        compression=NoCompression(),
    )
    figures = {
        name: {"reduce": [], "check": [], "sent": []} for name in ("CenteredClip", "CenteredClip + verify")
    }
    for repeat in range(args.repeats):
        for name in figures:
            verify = name.endswith("verify")
            averagers = [
                RobustAverager(
                    [torch.zeros(args.size)],
                    d,
                    prefix=f"{name[-6:]}{repeat}",
                    verify_key=local_identity(d) if verify else None,
                    **common,
                )
                for d in dhts
            ]
            try:
                reduce_s, check_s, sent, banned = _round(averagers, dhts, inputs, verify, args.rate)
            finally:
                for averager in averagers:
                    averager.shutdown()
            assert banned == 0, "an honest round banned someone"
            for key, value in (("reduce", reduce_s), ("check", check_s), ("sent", sent)):
                figures[name][key].append(value)
            print(f"repeat {repeat}: {name}: {reduce_s:.2f} + {check_s:.2f} s, {sent:.1f} MiB", flush=True)
    plain = {k: statistics.median(v) for k, v in figures["CenteredClip"].items()}
    print(f"\nOne round, {n} peers, {args.size / 1e6:.0f}M float32 values, validation rate {args.rate}, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"| {'setup':<22} | {'all-reduce s':>12} | {'checks s':>8} | {'total vs plain':>14} | "
          f"{'MiB sent/peer':>13} | {'vs plain':>8} |")  # fmt: skip
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 10}|{'-' * 16}|{'-' * 15}|{'-' * 10}|")
    for name, f in figures.items():
        r, c, s = (statistics.median(f[k]) for k in ("reduce", "check", "sent"))
        total = (r + c) / (plain["reduce"] + plain["check"])
        print(
            f"| {name:<22} | {r:12.2f} | {c:8.2f} | {total:13.2f}x | {s:13.1f} | {s / plain['sent']:7.2f}x |"
        )
    for d in dhts:
        d.shutdown()


if __name__ == "__main__":
    main()
