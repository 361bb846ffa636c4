"""The peer's compute queue (``peer.compute``): inference steps before other work, oldest first, no starvation;
steps of one batch key run together."""

from __future__ import annotations

import threading
import time

import pytest

from swarm_peer.peer.compute import Batch, ComputeQueue, Priority

INFERENCE, OTHER = Priority.INFERENCE, Priority.OTHER


def _run_queued(queue: ComputeQueue, tasks: list[tuple[Priority, str]]) -> list[str]:
    """Queues ``tasks`` while the worker is held by a running task, then lets it go; the order they ran in."""
    ran, running, gate = [], threading.Event(), threading.Event()
    held = queue.submit(OTHER, lambda: running.set() or gate.wait())
    assert running.wait(10)
    futures = [queue.submit(priority, ran.append, name) for priority, name in tasks]
    gate.set()
    held.result(timeout=10)
    for future in futures:
        future.result(timeout=10)
    return ran


def test_inference_steps_go_first_and_oldest_first_within_a_class():
    queue = ComputeQueue(burst=8)
    try:
        tasks = [(OTHER, "backward 1"), (INFERENCE, "step a"), (OTHER, "backward 2"), (INFERENCE, "step b")]
        assert _run_queued(queue, tasks) == ["step a", "step b", "backward 1", "backward 2"]
    finally:
        queue.shutdown()


def test_a_plain_fifo_queue_would_make_the_step_wait_for_the_backward():
    """The control: one class for all (what the peer had) runs the backward queued first before the step."""
    queue = ComputeQueue(burst=8)
    try:
        assert _run_queued(queue, [(OTHER, "backward"), (OTHER, "step")]) == ["backward", "step"]
    finally:
        queue.shutdown()


def test_a_backward_behind_a_stream_of_steps_waits_at_most_burst_steps():
    queue = ComputeQueue(burst=3)
    try:
        tasks = [(OTHER, "backward")] + [(INFERENCE, f"step {i}") for i in range(7)]
        ran = _run_queued(queue, tasks)
        assert ran.index("backward") == 3, ran
        assert [name for name in ran if name != "backward"] == [f"step {i}" for i in range(7)]
    finally:
        queue.shutdown()


def test_a_queued_backward_delays_the_next_step_by_at_most_the_running_slice():
    """Measured on the worker: a step submitted while a backward runs and another is queued starts as soon as the
    running one ends, not after the queued one."""
    queue = ComputeQueue(burst=8)
    slice_s = 0.5  # a first-in-first-out queue would start the step after two slices
    try:
        started = {}

        def work(name: str, seconds: float):
            started[name] = time.perf_counter()
            time.sleep(seconds)

        running = queue.submit(OTHER, work, "backward 1", slice_s)
        queued = queue.submit(OTHER, work, "backward 2", slice_s)
        while "backward 1" not in started:
            time.sleep(0.001)
        submitted = time.perf_counter()
        queue.submit(INFERENCE, work, "step", 0.0).result(timeout=10)
        running.result(timeout=10), queued.result(timeout=10)
        assert started["step"] - submitted <= slice_s + 0.3
        assert started["step"] < started["backward 2"]
    finally:
        queue.shutdown()


def test_errors_reach_the_caller_and_the_worker_keeps_going():
    queue = ComputeQueue()
    try:
        with pytest.raises(ZeroDivisionError):
            queue.submit(INFERENCE, lambda: 1 / 0).result(timeout=10)
        assert queue.submit(OTHER, lambda: 42).result(timeout=10) == 42
        assert queue.idle
    finally:
        queue.shutdown()
    with pytest.raises(RuntimeError):
        queue.submit(OTHER, print)


def test_shutdown_cancels_what_is_queued():
    queue = ComputeQueue()
    running, gate = threading.Event(), threading.Event()
    held = queue.submit(OTHER, lambda: running.set() or gate.wait())
    assert running.wait(10)
    queued = queue.submit(OTHER, print, "never")
    threading.Timer(0.2, gate.set).start()
    queue.shutdown()
    assert held.result(timeout=1) and queued.cancelled()


def _solo(name: str) -> str:
    return f"{name} alone"


class _Steps:
    """A batch's run: records each batch it ran; fails (as a bad batch would) if one of its steps is "bad"."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def __call__(self, many: list[tuple]) -> list[str]:
        names = [name for (name,) in many]
        if "bad" in names:
            raise RuntimeError("a bad batch")
        self.batches.append(names)
        return [f"{name} batched" for name in names]


def test_steps_of_one_key_queued_together_run_as_one_batch_and_others_alone():
    queue, steps = ComputeQueue(), _Steps()
    ran, running, gate = [], threading.Event(), threading.Event()
    try:
        held = queue.submit(OTHER, lambda: running.set() or gate.wait())
        assert running.wait(10)
        futures = {
            name: queue.submit(INFERENCE, _solo, name, batch=Batch(key, steps) if key else None)
            for name, key in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("plain", None), ("a3", "a")]
        }
        gate.set()
        held.result(timeout=10)
        ran = {name: future.result(timeout=10) for name, future in futures.items()}
    finally:
        queue.shutdown()
    assert steps.batches == [["a1", "a2", "a3"]]  # oldest first; "b1" had no other step of its key
    assert ran == {
        "a1": "a1 batched", "a2": "a2 batched", "a3": "a3 batched", "b1": "b1 alone", "plain": "plain alone"
    }  # fmt: skip
    assert (queue.batches, queue.batched) == (1, 3)


def test_a_batch_waits_a_bounded_time_for_the_steps_it_expects():
    """A step waits up to ``batch_wait`` for the steps ``batch_goal`` expects; the control: no wait, no batch."""
    for wait, expected in ((0.5, [["first", "second"]]), (0.0, [])):
        queue, steps = ComputeQueue(batch_wait=wait, batch_goal=lambda key: 2), _Steps()
        try:
            first = queue.submit(INFERENCE, _solo, "first", batch=Batch("k", steps))
            time.sleep(0.1)
            second = queue.submit(INFERENCE, _solo, "second", batch=Batch("k", steps))
            first.result(timeout=10), second.result(timeout=10)
        finally:
            queue.shutdown()
        assert steps.batches == expected, wait
    # the goal met, a step does not wait out the time
    queue = ComputeQueue(batch_wait=30, batch_goal=lambda key: 1)
    try:
        started = time.perf_counter()
        queue.submit(INFERENCE, _solo, "only", batch=Batch("k", _Steps())).result(timeout=10)
        assert time.perf_counter() - started < 5
    finally:
        queue.shutdown()


def test_a_failed_batch_runs_its_steps_one_by_one():
    queue, steps = ComputeQueue(batch_wait=0.5, batch_goal=lambda key: 2), _Steps()
    try:
        futures = [queue.submit(INFERENCE, _solo, name, batch=Batch("k", steps)) for name in ("bad", "good")]
        assert [f.result(timeout=10) for f in futures] == ["bad alone", "good alone"]
        assert steps.batches == [] and queue.batches == 0 and queue.idle
    finally:
        queue.shutdown()
