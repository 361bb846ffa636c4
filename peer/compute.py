"""The peer's compute thread: one worker runs every computation, inference steps first.

Blocks never run two requests at once (adapter hooks and the blocks' renumbering are private to one request), so a
peer computes on one thread. What waits for it is served by class, then by age:

    INFERENCE  a session's step: a user waits for its next token
    OTHER      forward and backward calls of fine-tuning and training, stage and expert calls, state transfers

so a backward queued behind a stream of decode steps delays the next token by at most the computation running
when it arrives (one slice), never by the queue's training work. Other work is not starved: after
``burst`` inference steps in a row while other work waits, the oldest other task runs.

Tasks submitted with the same ``Batch`` key (single-token steps of different sessions over the same blocks) run
together: when the worker takes one, it takes every other of that key queued in the same class, and, while fewer
than ``batch_goal(key)`` (the sessions that could send one) are there, waits up to ``batch_wait`` seconds for more.
The batch's ``run`` computes them all at once (one batched forward over their separate caches: the weights are read
once for all); if it fails, each runs alone, so one session's trouble is not the others'.

>>> queue = ComputeQueue(burst=8, batch_wait=0.002, batch_goal=lambda key: sessions_decoding[key])
>>> future = queue.submit(Priority.INFERENCE, step, hidden_BTD)     # a concurrent.futures.Future
>>> future = queue.submit(Priority.INFERENCE, step, hidden_BTD, batch=Batch(key, steps))  # steps([args, ...])
>>> queue.shutdown()
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

__all__ = ["Batch", "ComputeQueue", "Priority"]

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    INFERENCE = 0
    OTHER = 1


@dataclass(frozen=True)
class Batch:
    """Tasks that may run together: those of equal ``key``; ``run(list of their args)`` -> their results, in order."""

    key: Hashable
    run: Callable[[Sequence[tuple]], list]


class ComputeQueue:
    """One worker thread over a priority queue (module docstring). ``submitted`` and ``finished`` count tasks;
    ``batches`` the batches of two or more tasks run, ``batched`` the tasks in them."""

    def __init__(
        self,
        *,
        burst: int = 8,
        batch_wait: float = 0.0,
        batch_goal: Callable[[Hashable], int] = lambda key: 1,
        name: str = "compute",
    ):
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.burst, self.batch_wait, self.batch_goal = burst, batch_wait, batch_goal
        self.submitted = self.finished = 0
        self.batches = self.batched = 0
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

    def submit(self, priority: Priority, fn: Callable, *args, batch: Batch | None = None) -> Future:
        """Queues ``fn(*args)``, or its ``batch``'s run with others of its key; its future. Raises
        ``RuntimeError`` after ``shutdown``."""
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the compute queue is shut down")
            self.submitted += 1
            heapq.heappush(self._heaps[priority], (next(self._order), future, fn, args, batch))
            self._ready.notify_all()
        return future

    def _next(self) -> list | None:
        """The tasks to run now, together (module docstring), or None once shut down and drained."""
        with self._ready:
            while not any(self._heaps.values()):
                if self._closed:
                    return None
                self._ready.wait()
            inference, other = self._heaps[Priority.INFERENCE], self._heaps[Priority.OTHER]
            if inference and not (other and self._in_a_row >= self.burst):
                self._in_a_row = self._in_a_row + 1 if other else 0
                heap = inference
            else:
                self._in_a_row, heap = 0, other
            first = heapq.heappop(heap)
            batch = first[-1]
            if batch is None:
                return [first]
            tasks = [first, *self._take(heap, batch.key)]
            deadline = time.monotonic() + self.batch_wait
            while len(tasks) < self.batch_goal(batch.key) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
                tasks += self._take(heap, batch.key)
            return tasks

    @staticmethod
    def _take(heap: list, key: Hashable) -> list:
        """Removes and returns the tasks of batch ``key`` from ``heap``."""
        taken = [task for task in heap if task[-1] is not None and task[-1].key == key]
        if taken:
            heap[:] = [task for task in heap if task[-1] is None or task[-1].key != key]
            heapq.heapify(heap)
        return taken

    def _work(self) -> None:
        while (tasks := self._next()) is not None:
            try:
                running = [task for task in tasks if task[1].set_running_or_notify_cancel()]
                if len(running) > 1:
                    self._run_batch(running)
                for _, future, fn, args, _ in running:
                    if not future.done():
                        try:
                            future.set_result(fn(*args))
                        except BaseException as e:  # handed to the caller
                            future.set_exception(e)
            finally:
                self.finished += len(tasks)

    def _run_batch(self, tasks: list) -> None:
        """Runs ``tasks`` (two or more of one batch key) at once; leaves them all undone if that failed."""
        try:
            results = tasks[0][-1].run([args for _, _, _, args, _ in tasks])
        except Exception:
            logger.warning("A batch of %d steps failed; running them one by one", len(tasks), exc_info=True)
            return
        self.batches += 1
        self.batched += len(tasks)
        for (_, future, _, _, _), result in zip(tasks, results, strict=True):
            future.set_result(result)

    def shutdown(self, *, cancel: bool = True) -> None:
        """Stops taking tasks; cancels those queued (``cancel``) or lets them run; waits for the worker."""
        with self._ready:
            self._closed = True
            if cancel:
                for heap in self._heaps.values():
                    for task in heap:
                        task[1].cancel()
            self._ready.notify_all()
        self._thread.join()
