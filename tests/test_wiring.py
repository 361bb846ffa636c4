"""swarm_peer.client.wiring: SWARM's stochastic wiring, checked on a discrete-event simulation with a fake clock.

The simulation: ``concurrency`` trainer tasks each push one call at a time through one stage; a call goes to the
peer the balancer chooses, waits behind the peer's earlier calls (each peer serves one call at a time, in order),
takes ``size / speed`` seconds of service, and is reported with its whole elapsed time, as a real trainer would.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from swarm_peer.client.wiring import StageWiring
from swarm_peer.errors import RoutingError, ValidationError


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Balancer(Protocol):
    def choose(self, task_size: float, exclude: Collection[str] = ()) -> str: ...

    def done(self, peer: str, task_size: float, seconds: float) -> None: ...


class RoundRobin:
    """The control: peers in turn, blind to their speed."""

    def __init__(self, peers: list[str]):
        self._cycle = itertools.cycle(peers)

    def choose(self, task_size: float, exclude: Collection[str] = ()) -> str:
        return next(self._cycle)

    def done(self, peer: str, task_size: float, seconds: float) -> None:
        pass


@dataclass
class Outcome:
    picks: list[str] = field(default_factory=list)  # the peer of each call, in the order they were chosen
    makespan: float = 0.0  # simulated seconds until the last call finished

    def fractions(self, sizes: list[float], start: int = 0) -> dict[str, float]:
        """Each peer's share of the work (``sizes`` of the calls) chosen from index ``start`` on."""
        work: dict[str, float] = {}
        for peer, size in zip(self.picks[start:], sizes[start:], strict=True):
            work[peer] = work.get(peer, 0.0) + size
        total = sum(work.values())
        return {peer: w / total for peer, w in work.items()}


def simulate(
    balancer: Balancer,
    clock: FakeClock,
    speeds: dict[str, float],
    sizes: list[float],
    concurrency: int,
    on_pick: dict[int, Callable[[], object]] | None = None,
) -> Outcome:
    """Runs ``len(sizes)`` calls through one stage with ``concurrency`` calls in flight; ``on_pick[i]()`` runs just
    before the ``i``-th call is chosen (to change the swarm mid-run)."""
    on_pick = on_pick or {}
    outcome = Outcome()
    free_at = dict.fromkeys(speeds, 0.0)  # when each peer finishes the calls it already has
    events: list[tuple[float, int, str, float, float]] = []  # (finish, index, peer, size, start)

    def dispatch(index: int) -> None:
        if index in on_pick:
            on_pick[index]()
        size = sizes[index]
        peer = balancer.choose(size)
        outcome.picks.append(peer)
        finish = max(clock.now, free_at[peer]) + size / speeds[peer]  # FIFO: behind the peer's earlier calls
        free_at[peer] = finish
        heapq.heappush(events, (finish, index, peer, size, clock.now))

    next_index = 0
    for _ in range(min(concurrency, len(sizes))):
        dispatch(next_index)
        next_index += 1
    while events:
        finish, _, peer, size, start = heapq.heappop(events)
        clock.now = finish
        balancer.done(peer, size, finish - start)
        if next_index < len(sizes):  # the trainer task whose call finished sends its next one
            dispatch(next_index)
            next_index += 1
    outcome.makespan = clock.now
    return outcome


SPEEDS = {"slow": 1.0, "mid": 2.0, "fast": 4.0}


def task_sizes(n: int, seed: int = 0) -> list[float]:
    """Micro-batch calls of somewhat different sizes (forward and backward calls differ in cost)."""
    rng = random.Random(seed)
    return [rng.uniform(0.5, 1.5) for _ in range(n)]


@pytest.mark.parametrize("concurrency", [8, 16])
def test_work_split_follows_throughput(concurrency: int):
    clock = FakeClock()
    wiring = StageWiring(clock=clock, rng=random.Random(1))
    wiring.update(list(SPEEDS))
    sizes = task_sizes(7000)
    outcome = simulate(wiring, clock, SPEEDS, sizes, concurrency)

    fractions = outcome.fractions(sizes)
    total_speed = sum(SPEEDS.values())
    for peer, speed in SPEEDS.items():
        assert fractions[peer] == pytest.approx(speed / total_speed, abs=0.03), fractions
    # No peer idles: the stage runs at nearly the sum of its peers' speeds.
    assert outcome.makespan == pytest.approx(sum(sizes) / total_speed, rel=0.02)
    assert wiring.queued() == dict.fromkeys(SPEEDS, 0.0)
    # Any rule that never lets a peer idle would split the work so; this one also learned who is fast. (The
    # estimates are below the true speeds: the measured times include waiting behind this trainer's own calls.)
    estimates = wiring.throughputs()
    assert estimates["slow"] < estimates["mid"] < estimates["fast"], estimates
    assert wiring.choose(1.0) == "fast"  # on an idle stage


def test_new_peer_gets_work_at_once_and_then_its_share():
    clock = FakeClock()
    wiring = StageWiring(clock=clock, rng=random.Random(2))
    wiring.update(list(SPEEDS))
    speeds = {**SPEEDS, "new": 2.0}
    sizes = task_sizes(6000, seed=3)
    join_at = 3000
    outcome = simulate(
        wiring, clock, speeds, sizes, concurrency=12, on_pick={join_at: lambda: wiring.update(speeds)}
    )

    assert "new" not in outcome.picks[:join_at]
    assert "new" in outcome.picks[join_at : join_at + 3]
    # Its first measurements correct the optimistic guess: from then on it gets its share of the work.
    fractions = outcome.fractions(sizes, start=join_at + 500)
    assert fractions["new"] == pytest.approx(2.0 / 9.0, abs=0.03), fractions


def test_unmeasured_peer_counts_as_fast_as_the_fastest():
    clock = FakeClock()
    wiring = StageWiring(clock=clock)
    assert wiring.throughputs() == {}
    wiring.update(["a", "b"])
    assert wiring.throughputs() == {"a": 1.0, "b": 1.0}
    wiring.done(wiring.choose(1.0, exclude={"b"}), 1.0, 0.25)
    assert wiring.throughputs() == {"a": 4.0, "b": 4.0}
    wiring.done("a", 1.0, 1.0)  # not in flight any more: ignored
    assert wiring.throughputs()["a"] == 4.0
    assert StageWiring(clock=clock, initial_throughput=0.5).throughputs() == {}
    given = StageWiring(clock=clock, initial_throughput=0.5)
    given.update(["a"])
    assert given.throughputs() == {"a": 0.5}


def test_throughput_is_an_ema_of_size_over_seconds():
    clock = FakeClock()
    wiring = StageWiring(clock=clock, alpha=0.25)
    wiring.update(["a"])
    for seconds, expected in [(2.0, 2.0), (1.0, 0.25 * 4.0 + 0.75 * 2.0)]:
        wiring.choose(4.0)
        wiring.done("a", 4.0, seconds)
        assert wiring.throughputs()["a"] == pytest.approx(expected)


def test_ban_holds_until_it_ends_by_the_clock():
    clock = FakeClock()
    wiring = StageWiring(clock=clock, rng=random.Random(0))
    wiring.update(["a", "b"])
    peer = wiring.choose(1.0, exclude={"b"})
    wiring.failed(peer, 1.0, ban_seconds=10.0)
    assert wiring.queued() == {"a": 0.0, "b": 0.0}

    for now in [0.0, 5.0, 9.99]:
        clock.now = now
        wiring.update(["a", "b"])  # re-announced with a fresh record: still banned
        assert wiring.choose(1.0) == "b"  # even though b's queue keeps growing
    with pytest.raises(RoutingError, match=r"banned: a \(for 0\.0 s more\); excluded: b"):
        wiring.choose(1.0, exclude={"b"})

    clock.now = 10.0
    assert wiring.choose(1.0) == "a"  # ban over; b has 3 calls queued, a none
    assert wiring.choose(1.0, exclude=["a"]) == "b"


def test_unban_and_dropped_peers():
    clock = FakeClock()
    wiring = StageWiring(clock=clock, name="stage 3")
    wiring.update(["a", "b"])
    wiring.failed(wiring.choose(1.0, exclude={"b"}), 1.0, ban_seconds=60.0)
    wiring.unban("a")
    assert wiring.choose(1.0, exclude={"b"}) == "a"

    wiring.update(["b"])  # a is dropped; its call in flight finishes later and is ignored
    assert wiring.peers == ("b",)
    wiring.done("a", 1.0, 0.5)
    wiring.failed("a", 1.0, None)
    assert wiring.throughputs() == {"b": 1.0}

    wiring.ban("b", 5.0)
    with pytest.raises(RoutingError, match=r"No usable peer for stage 3: 1 announced, banned: b"):
        wiring.choose(1.0)
    wiring.update([])
    with pytest.raises(RoutingError, match="No peer serves stage 3: none is announced"):
        wiring.choose(1.0)


def test_call_times_the_body_and_reports_failures():
    clock = FakeClock()
    wiring = StageWiring(clock=clock)
    wiring.update(["a"])
    with wiring.call(2.0) as peer:
        assert wiring.queued() == {peer: 2.0}
        clock.now += 4.0
    assert wiring.throughputs() == {"a": 0.5}
    assert wiring.queued() == {"a": 0.0}

    with pytest.raises(ConnectionError), wiring.call(2.0):
        raise ConnectionError("lost")
    assert wiring.queued() == {"a": 0.0}
    assert wiring.choose(1.0) == "a"  # a failure in the body does not ban: the caller decides
    with pytest.raises(ValidationError):
        wiring.choose(0.0)
    with pytest.raises(ValidationError):
        wiring.done("a", 1.0, 0.0)


def test_concurrent_calls_keep_the_books():
    wiring = StageWiring()  # the real clock
    wiring.update(["a", "b", "c"])

    def trainer() -> None:
        for _ in range(300):
            with wiring.call(1.0):
                pass

    threads = [threading.Thread(target=trainer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wiring.queued() == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_round_robin_control_is_held_to_the_slowest_peer():
    """Without the balancer the split is even, so the slow peer sets the pace: the balancer is what does it."""
    sizes = task_sizes(7000)
    clock = FakeClock()
    robin = simulate(RoundRobin(list(SPEEDS)), clock, SPEEDS, sizes, concurrency=12)
    clock = FakeClock()
    wiring = StageWiring(clock=clock, rng=random.Random(1))
    wiring.update(list(SPEEDS))
    balanced = simulate(wiring, clock, SPEEDS, sizes, concurrency=12)

    assert robin.picks.count("slow") / len(sizes) == pytest.approx(1 / 3, abs=0.01)
    assert robin.fractions(sizes)["slow"] == pytest.approx(1 / 3, abs=0.03)
    # Round robin finishes when the slow peer has served a third of the work; the balancer near sum/7.
    assert robin.makespan == pytest.approx(sum(sizes) / 3, rel=0.03)
    assert robin.makespan > 2 * balanced.makespan


def test_a_peer_that_looked_slow_once_is_tried_again_after_probe_seconds():
    clock = FakeClock()
    wiring = StageWiring(clock=clock, probe_seconds=10.0, rng=random.Random(0))
    wiring.update(["cold", "warm"])
    for peer, seconds in (("cold", 100.0), ("warm", 1.0)):  # cold's first call was a cold start: 100x slower
        wiring.done(wiring.choose(1.0, exclude={"cold", "warm"} - {peer}), 1.0, seconds)
    picks = []
    for _ in range(20):  # one call at a time, a second each: the fast peer takes them all...
        clock.now += 1.0
        picks.append(wiring.choose(1.0))
        wiring.done(picks[-1], 1.0, 1.0)
    assert "cold" not in picks[:8]
    # ...until cold's estimate is 10 s old: forgotten, it is tried again, and its real speed is measured
    assert "cold" in picks[9:12], picks
    assert wiring.throughputs()["cold"] == 1.0
