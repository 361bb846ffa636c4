"""What the averaging benchmarks share: their common options, a swarm of DHT nodes on 127.0.0.1, the bytes a
process wrote, rounds run by all peers at once, and the tensors averagers hold."""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

from swarm_peer.dht import create_dht
from swarm_peer.dht.node import visible_maddrs


def arguments(peers: int, size: int, repeats: int) -> argparse.ArgumentParser:
    """A parser of the options every averaging benchmark takes, with these defaults: ``--peers``, ``--size``
    (float32 values each peer averages), ``--repeats``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=peers)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def start_dhts(n: int) -> list:
    """``n`` DHT nodes on 127.0.0.1 (a process each), all bootstrapped from the first."""
    first = create_dht()
    return [first] + [create_dht(initial_peers=visible_maddrs(first)) for _ in range(n - 1)]


def written(pid: int) -> int:
    """Bytes the process has written (``/proc/PID/io`` wchar): an averager's messages to its p2p daemon."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def median_written(pids: Sequence[int], before: Sequence[int]) -> float:
    """The median over processes of the bytes each wrote since ``before``."""
    return statistics.median(written(pid) - b for pid, b in zip(pids, before, strict=True))


def together(run: Callable[[int], None], n: int) -> float:
    """Runs ``run(0)``, ..., ``run(n - 1)`` in threads started at once, waits for all; their start time
    (``time.perf_counter``)."""
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return t0


def load(averagers, inputs: Sequence[torch.Tensor]) -> None:
    """Puts each input in its averager's (single) tensor."""
    for averager, x in zip(averagers, inputs, strict=True):
        with averager.get_tensors() as (tensor,):
            tensor.copy_(x)


def held(averagers) -> list[torch.Tensor]:
    """A copy of each averager's (single) tensor."""
    values = []
    for averager in averagers:
        with averager.get_tensors() as (tensor,):
            values.append(tensor.clone())
    return values
