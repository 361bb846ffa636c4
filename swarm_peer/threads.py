"""How many CPU threads torch uses for small steps: one, or all of them, whichever is about as fast.

torch spreads each operation over all cores. That pays for a batch of tokens, but a decode step (one new token)
is a chain of matrix-vector products where waking the other threads can cost more than it saves, and OpenMP's
idle threads then spin on the cores that the next hop, the client or any other process needs. On this project's
2-core test machine that spinning tripled the cost of a hop. ``fastest_threads`` measures a step both ways;
``compute_threads`` runs a block of code with a given number of threads. ``cached_fastest_threads`` keeps the
answer per machine and model in the user's cache, so a restart does not measure again. ``MachineShare`` divides the
machine's cores among the peers running on it.

The measurement must survive load from other processes: peers started together load their weights while each
measures, and a setting timed during such a burst looks slow. Timing each setting several times in a row then
blamed whichever setting ran during the burst (peers that started together picked one thread, and a 16-block span
took 66 ms per token instead of 40). So the two settings take turns, round after round, and each keeps its best
time: a burst slows both alike or only one of several rounds, and the best time is each setting's speed in the
quietest moments they shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from swarm_peer.models import atomic_write, cache_dir, read_json

__all__ = ["MachineShare", "cached_fastest_threads", "compute_threads", "fastest_threads", "running_peers"]

_ROUNDS = 7
_CACHE_FILE = "threads.json"
_PEERS_DIR = "peers"


@contextlib.contextmanager
def compute_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (unchanged for None) inside the block, for the calling thread's
    operations; BLAS libraries may apply it process-wide, so call it from the thread that does the compute."""
    previous = torch.get_num_threads()
    change = n is not None and n != previous
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(previous)


def fastest_threads(step: Callable[[], object], *, margin: float = 1.1, rounds: int = _ROUNDS) -> int:
    """1 if ``step`` (a small CPU computation) runs about as fast on one thread as on ``torch.get_num_threads()``,
    else that number. All threads must be ``margin`` times faster to win: one thread leaves the other cores free.
    The settings take ``rounds`` turns and each keeps its best time (module docstring)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    best = dict.fromkeys((1, threads), math.inf)
    with torch.inference_mode():
        for n in best:
            with compute_threads(n):
                step()  # warm-up
        for _ in range(rounds):
            for n in best:
                with compute_threads(n):
                    t0 = time.perf_counter()
                    step()
                    best[n] = min(best[n], time.perf_counter() - t0)
    return 1 if best[1] <= margin * best[threads] else threads


def cached_fastest_threads(name: str, step: Callable[[], object], *, remeasure: bool = False) -> int:
    """``fastest_threads(step)``, kept in the user's cache under ``name`` (what ``step`` computes: the model, device
    and dtype), torch's version and its thread count; measured when missing or when ``remeasure``."""
    threads = torch.get_num_threads()
    key = f"{name}|torch-{torch.__version__}|threads-{threads}"
    path = cache_dir() / _CACHE_FILE
    entries = read_json(path)
    if not isinstance(entries, dict):
        entries = {}
    cached = entries.get(key)
    if not remeasure and cached in (1, threads):
        return cached
    entries[key] = chosen = fastest_threads(step)
    atomic_write(path, json.dumps(entries, indent=1).encode())
    return chosen


class MachineShare:
    """This process's share of the machine's cores among the swarm-peer peers running on it: each peer registers
    itself in a folder of the user's cache (``peers/<pid>``) and takes ``cores // peers`` threads (at least one), so
    two peers on one machine do not each spread every operation over all its cores and fight over them. ``threads()``
    looks again (peers come and go: ``running_peers``). ``close()`` unregisters."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or cache_dir() / _PEERS_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cores = len(os.sched_getaffinity(0))
        self._entry = self.directory / str(os.getpid())
        self._entry.write_text(_started(os.getpid()) or "")

    def threads(self) -> int:
        return max(1, self.cores // max(1, running_peers(self.directory)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._entry.unlink()


def running_peers(directory: Path | None = None) -> int:
    """Peers registered on this machine (``MachineShare``) and still running; entries of processes that are gone
    (died without unregistering, or whose pid is another process's now) are removed."""
    directory = directory or cache_dir() / _PEERS_DIR
    alive = 0
    for entry in directory.iterdir() if directory.is_dir() else ():
        try:
            running = entry.name.isdigit() and _started(int(entry.name)) == entry.read_text()
        except OSError:
            running = False
        if running:
            alive += 1
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return alive


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if there is no such process: with
    the pid, it tells a running process from a later one that reuses its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
