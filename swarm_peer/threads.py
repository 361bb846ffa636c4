"""How many CPU threads torch uses for small steps: one, or all of them, whichever is about as fast.

torch spreads each operation over all cores. That pays for a batch of tokens, but a decode step (one new token)
is a chain of matrix-vector products where waking the other threads can cost more than it saves, and OpenMP's
idle threads then spin on the cores that the next hop, the client or any other process needs. On this project's
2-core test machine that spinning tripled the cost of a hop. ``fastest_threads`` measures a step both ways;
``compute_threads`` runs a block of code with a given number of threads.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

__all__ = ["compute_threads", "fastest_threads"]

_REPEATS = 5


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


def fastest_threads(step: Callable[[], object], *, margin: float = 1.1) -> int:
    """1 if ``step`` (a small CPU computation) runs about as fast on one thread as on ``torch.get_num_threads()``,
    else that number. All threads must be ``margin`` times faster to win: one thread leaves the other cores free."""
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    seconds = {}
    with torch.inference_mode():
        for n in (1, threads):
            with compute_threads(n):
                step()  # warm-up
                figures = []
                for _ in range(_REPEATS):
                    t0 = time.perf_counter()
                    step()
                    figures.append(time.perf_counter() - t0)
                seconds[n] = statistics.median(figures)
    return 1 if seconds[1] <= margin * seconds[threads] else threads
