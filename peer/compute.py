"""The peer's compute thread: one worker runs every computation, inference steps first.

Blocks never run two requests at once (adapter hooks and the blocks' renumbering are private to one request), so a
peer computes on one thread. What waits for it is served by class, then by age:

    INFERENCE  a session's step: a user waits for its next token
    OTHER      forward and backward calls of fine-tuning and training, stage and expert calls, state transfers

so a backward queued behind a stream of decode steps delays the next token by at most the computation running
when it arrives (one slice), never by the queue's training work. Other work is not starved: after
``burst`` inference steps in a row while other work waits, the oldest other task runs.

>>> queue = ComputeQueue(burst=8)
>>> future = queue.submit(Priority.INFERENCE, step, hidden_BTD)     # a concurrent.futures.Future
>>> queue.shutdown()
"""

from __future__ import annotations

import enum
import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future

__all__ = ["ComputeQueue", "Priority"]


class Priority(enum.IntEnum):
    INFERENCE = 0
    OTHER = 1


class ComputeQueue:
    """One worker thread over a priority queue (module docstring). ``submitted`` and ``finished`` count tasks."""

    def __init__(self, *, burst: int = 8, name: str = "compute"):
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.burst = burst
        self.submitted = self.finished = 0
        self._heaps: dict[Priority, list] = {priority: [] for priority in Priority}
        self._order = itertools.count()  # oldest first within a class
        self._in_a_row = 0  # inference steps run in a row while other work waited
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Whether nothing is queued or running."""
        return self.submitted == self.finished

    def submit(self, priority: Priority, fn: Callable, *args) -> Future:
        """Queues ``fn(*args)``; its future. Raises ``RuntimeError`` after ``shutdown``."""
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the compute queue is shut down")
            self.submitted += 1
            heapq.heappush(self._heaps[priority], (next(self._order), future, fn, args))
            self._ready.notify()
        return future

    def _next(self):
        """The task to run now (module docstring), or None once shut down and drained."""
        with self._ready:
            while not any(self._heaps.values()):
                if self._closed:
                    return None
                self._ready.wait()
            inference, other = self._heaps[Priority.INFERENCE], self._heaps[Priority.OTHER]
            if inference and not (other and self._in_a_row >= self.burst):
                self._in_a_row = self._in_a_row + 1 if other else 0
                return heapq.heappop(inference)
            self._in_a_row = 0
            return heapq.heappop(other)

    def _work(self) -> None:
        while (task := self._next()) is not None:
            _, future, fn, args = task
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:  # handed to the caller
                        future.set_exception(e)
            finally:
                self.finished += 1

    def shutdown(self, *, cancel: bool = True) -> None:
        """Stops taking tasks; cancels those queued (``cancel``) or lets them run; waits for the worker."""
        with self._ready:
            self._closed = True
            if cancel:
                for heap in self._heaps.values():
                    for _, future, _, _ in heap:
                        future.cancel()
            self._ready.notify()
        self._thread.join()
