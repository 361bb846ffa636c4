"""One averaging round of 8 peers: robust butterfly all-reduce (CenteredClip) vs hivemind's plain all-reduce.

    python benchmarks/averaging_speed.py [--peers 8] [--size 10000000] [--repeats 5]

Every peer runs a DHT node and an averager (a process each) on 127.0.0.1, holding ``--size`` float32 values near
a common vector. Setups take turns within every repeat (hivemind's ``DecentralizedAverager`` with its weighted mean,
then ours with each codec), so the machine's drift hits them alike; the table gives medians over repeats:
- round time: from the moment all peers ask for a round until the last one has its result (matchmaking included:
  a group of all peers assembles as soon as the last one asks);
- bytes sent per peer: what each averager process wrote (``/proc/PID/io`` wchar: its messages to the p2p daemon,
  which sends them), the median over peers;
- error: the result's distance from the honest mean, relative to a peer's own distance from it.
Then, from the robust round's bytes, DiLoCo's traffic per token trained against data-parallel training's (one
round per step), for the sizes of ``swarm-peer train``'s defaults.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import arguments, held, load, median_written, start_dhts, together, written
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

from swarm_peer.protocols.averaging import RobustAverager

MATCHMAKING = 2.0  # min_matchmaking_time of every setup (a group assembles before it once all peers are in)


def _round(averagers, inputs) -> tuple[float, float, list[torch.Tensor]]:
    """Seconds of one round on all averagers at once, the median of the bytes each wrote, and their results."""
    load(averagers, inputs)
    before = [written(a.pid) for a in averagers]
    done = [0.0] * len(averagers)

    def run(i):
        averagers[i].step(timeout=120, allow_retries=False)
        done[i] = time.perf_counter()

    t0 = together(run, len(averagers))
    return max(done) - t0, median_written([a.pid for a in averagers], before), held(averagers)


def main() -> None:
    parser = arguments(8, 10_000_000, 5)
    args = parser.parse_args()
    n = args.peers
    dhts = start_dhts(n)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.size, generator=g)
    inputs = [base + 0.1 * torch.randn(args.size, generator=g) for _ in range(n)]
    honest = torch.stack(inputs).mean(0)
    own_error = (inputs[0] - honest).norm()
    common = dict(
        min_group_size=n, target_group_size=n, min_matchmaking_time=MATCHMAKING, request_timeout=1.0
    )
    setups = {
        "hivemind all-reduce (mean)": lambda d, i: DecentralizedAverager(
            [torch.zeros(args.size)], d, prefix=f"plain{i}", start=True, **common
        ),
        "robust, CenteredClip": lambda d, i: RobustAverager(
            [torch.zeros(args.size)], d, prefix=f"robust{i}", compression=NoCompression(), **common
        ),
        "robust, CenteredClip, float16": lambda d, i: RobustAverager(
            [torch.zeros(args.size)], d, prefix=f"half{i}", compression=Float16Compression(), **common
        ),
        "robust, CenteredClip, 8-bit": lambda d, i: RobustAverager(
            [torch.zeros(args.size)], d, prefix=f"byte{i}", compression=Uniform8BitQuantization(), **common
        ),
    }
    figures = {name: {"time": [], "sent": [], "error": []} for name in setups}
    for repeat in range(args.repeats):
        for name, make in setups.items():
            # a fresh group each repeat (a prefix of its own): no state carried between rounds
            averagers = [make(d, f"{repeat}") for d in dhts]
            try:
                seconds, sent, results = _round(averagers, inputs)
            finally:
                for averager in averagers:
                    averager.shutdown()
            figures[name]["time"].append(seconds)
            figures[name]["sent"].append(sent)
            figures[name]["error"].append(((results[0] - honest).norm() / own_error).item())
            print(f"repeat {repeat}: {name}: {seconds:.2f} s, {sent / 2**20:.1f} MiB", flush=True)
    base_name = next(iter(setups))
    base_time = statistics.median(figures[base_name]["time"])
    base_sent = statistics.median(figures[base_name]["sent"])
    print(f"\nOne round, {n} peers, {args.size / 1e6:.0f}M float32 values, median of {args.repeats}")
    print(
        f"| {'setup':<30} | {'round s':>7} | {'vs plain':>8} | {'MiB sent/peer':>13} | {'vs plain':>8} | {'error':>7} |"
    )
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 10}|{'-' * 15}|{'-' * 10}|{'-' * 9}|")
    for name, f in figures.items():
        t, s, e = (statistics.median(f[k]) for k in ("time", "sent", "error"))
        print(
            f"| {name:<30} | {t:7.2f} | {t / base_time:7.2f}x | {s / 2**20:13.1f} | {s / base_sent:7.2f}x | {e:7.4f} |"
        )
    robust_sent = statistics.median(figures["robust, CenteredClip"]["sent"])
    tokens_per_step = 8 * 256  # swarm-peer train's default batch: 8 sequences of 256 tokens
    print(
        f"\nBytes sent per token trained, per peer ({tokens_per_step} tokens a step; one round as measured above)"
    )
    print(f"| {'training':<28} | {'rounds/step':>11} | {'bytes/token':>11} | {'vs data parallel':>16} |")
    print(f"|{'-' * 30}|{'-' * 13}|{'-' * 13}|{'-' * 18}|")
    for label, every in (
        ("data parallel (--inner-steps 1)", 1),
        ("DiLoCo, H=50 (default)", 50),
        ("DiLoCo, H=500", 500),
    ):
        per_token = robust_sent / every / tokens_per_step
        print(f"| {label:<28} | {1 / every:11.3f} | {per_token:11.1f} | {every:15.0f}x |")
    for d in dhts:
        d.shutdown()


if __name__ == "__main__":
    main()
