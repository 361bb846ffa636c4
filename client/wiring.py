"""Stochastic wiring: which peer of a pipeline stage takes a trainer's next call.

SWARM parallelism (Ryabinin et al., "SWARM Parallelism: Training Large Models Can Be Surprisingly
Communication-Efficient", ICML 2023; "Stochastic wiring") serves each pipeline stage with several peers of different,
unknown speeds, and lets every trainer pick a peer per call. The trainer keeps, for each peer of a stage, the work
it has in flight there and an estimate of the peer's throughput, and sends each call where it is expected to finish
first::

    expected_finish(p) = (queued(p) + task_size) / throughput(p)

- ``queued(p)``: the sizes of this trainer's calls in flight on ``p`` (forward and backward are separate calls);
- ``throughput(p)``: an exponential moving average of ``task_size / seconds`` over ``p``'s finished calls, where
  ``seconds`` is the wall time of the whole remote call (network and queueing included), so a peer that is busy
  with other trainers looks slower; a peer not yet measured counts as fast as the fastest measured one (or
  ``initial_throughput``), so it gets work at once and its first measurement corrects the guess. An estimate
  that no call refreshed for ``probe_seconds`` is forgotten the same way: a peer that looked slow once (its first
  call was a cold start) is not starved of the calls that would show it is not.

Ties are broken at random. With calls from many micro-batches in flight this keeps every peer busy, and each peer's
share of the work converges to its share of the stage's throughput; plain round-robin would instead hold the stage
to the pace of its slowest peer. A failed call may ban its peer (the trainer bans it until its DHT record would
expire); a ban outlives re-announcements and ends by the clock or by ``unban``.

>>> wiring = StageWiring()
>>> wiring.update(["peer-a", "peer-b"])
>>> with wiring.call(task_size=8.0) as peer:
...     outputs = remote_forward(peer, inputs)  # timed; done() on success, failed() and re-raise on error

Failure modes: ``choose`` raises ``RoutingError`` when every announced peer is banned or excluded (or none is
announced); a non-positive ``task_size`` or ``seconds`` raises ``ValidationError``. Thread-safe: one lock per stage.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from swarm_peer.errors import RoutingError, ValidationError

__all__ = ["StageWiring"]

logger = logging.getLogger(__name__)


@dataclass
class _PeerState:
    """What one trainer knows about one announced peer."""

    queued: float = 0.0  # sizes of this trainer's calls in flight on the peer
    calls: int = 0  # number of those calls
    throughput: float | None = None  # EMA of task_size / seconds; None until the first call finishes
    measured_at: float = 0.0  # when ``throughput`` last took a sample, by the clock


class StageWiring:
    """The peer choice for one pipeline stage of one trainer (see the module docstring for the rule).

    ``clock`` measures call times and bans (inject a fake one in tests); ``alpha`` is the weight of a new sample in
    the throughput EMA; ``initial_throughput`` is the estimate of a peer not yet measured (default: the highest
    measured estimate, or 1.0); ``probe_seconds``: an estimate not refreshed for this long is forgotten, so a peer
    that once looked slow (a cold start, a passing load) is tried again; ``rng`` breaks ties; ``name`` names the
    stage in errors and logs.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        alpha: float = 0.1,
        initial_throughput: float | None = None,
        *,
        probe_seconds: float = 10.0,
        rng: random.Random | None = None,
        name: str = "stage",
    ):
        if not 0 < alpha <= 1:
            raise ValidationError(f"alpha must be in (0, 1], got {alpha}")
        if initial_throughput is not None and not initial_throughput > 0:
            raise ValidationError(f"initial_throughput must be positive, got {initial_throughput}")
        self.clock, self.alpha, self.initial_throughput = clock, alpha, initial_throughput
        self.probe_seconds = probe_seconds
        self.name = name
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._peers: dict[str, _PeerState] = {}  # announced peers, in announcement order
        self._banned_until: dict[str, float] = {}  # by the clock; kept while a peer is not announced

    @property
    def peers(self) -> tuple[str, ...]:
        """The peers currently announced for the stage, banned ones included, in announcement order."""
        with self._lock:
            return tuple(self._peers)

    def update(self, peers: Iterable[str]) -> None:
        """Sets the peers announced for the stage: new ones are added (not yet measured), absent ones dropped.

        Results of a dropped peer's calls still in flight are ignored. Bans are kept: a banned peer announced again
        stays banned until its ban ends (or ``unban``).
        """
        announced = list(dict.fromkeys(peers))
        with self._lock:
            self._peers = {peer: self._peers.get(peer) or _PeerState() for peer in announced}

    def choose(
        self, task_size: float, exclude: Collection[str] = (), sizes: Mapping[str, float] | None = None
    ) -> str:
        """Returns the usable peer with the smallest expected finish time for a call of ``task_size`` and counts
        the call as in flight there; the caller must then report it with ``done`` or ``failed`` (with the peer's
        size). ``sizes``: the call's size on particular peers, where it differs (a backward costs less on the peer
        that kept its forward's graph).

        Usable: announced, not banned, not in ``exclude``. Raises ``RoutingError`` when no peer is usable.
        """
        sizes = sizes or {}
        if not task_size > 0 or not all(size > 0 for size in sizes.values()):
            raise ValidationError(f"task sizes must be positive, got {task_size} and {dict(sizes)}")
        with self._lock:
            now = self.clock()
            self._banned_until = {p: until for p, until in self._banned_until.items() if until > now}
            usable = [p for p in self._peers if p not in self._banned_until and p not in exclude]
            if not usable:
                raise RoutingError(self._no_peer_message(exclude, now))
            for state in self._peers.values():  # estimates gone stale: measured again as new peers' are
                if state.calls == 0 and state.measured_at < now - self.probe_seconds:
                    state.throughput = None
            default = self._default_throughput()
            finish = {p: self._finish_time(self._peers[p], sizes.get(p, task_size), default) for p in usable}
            best = min(finish.values())
            peer = self._rng.choice([p for p in usable if math.isclose(finish[p], best, rel_tol=1e-9)])
            state = self._peers[peer]
            state.queued += sizes.get(peer, task_size)
            state.calls += 1
            return peer

    def done(self, peer: str, task_size: float, seconds: float) -> None:
        """A call of ``task_size`` chosen on ``peer`` finished after ``seconds`` of wall time (network and queueing
        included): it leaves the in-flight work, and ``task_size / seconds`` updates the peer's throughput EMA."""
        if not seconds > 0:
            raise ValidationError(f"seconds must be positive, got {seconds}")
        self._finish(peer, task_size, sample=task_size / seconds)

    def failed(self, peer: str, task_size: float, ban_seconds: float | None) -> None:
        """A call of ``task_size`` chosen on ``peer`` failed: it leaves the in-flight work; with ``ban_seconds``,
        ``peer`` is not chosen again until that many seconds pass by the clock (even if announced again)."""
        self._finish(peer, task_size, sample=None)
        if ban_seconds is not None:
            self.ban(peer, ban_seconds)

    def ban(self, peer: str, seconds: float) -> None:
        """Keeps ``peer`` from being chosen for ``seconds`` from now; a longer ban already in place is kept."""
        with self._lock:
            until = max(self._banned_until.get(peer, -math.inf), self.clock() + seconds)
            self._banned_until[peer] = until
        logger.info("Stage %s: peer %s banned for %.1f s", self.name, peer, seconds)

    def unban(self, peer: str) -> None:
        """Lifts ``peer``'s ban, if any."""
        with self._lock:
            self._banned_until.pop(peer, None)

    def throughputs(self) -> dict[str, float]:
        """The throughput estimate of each announced peer (work per second), the default for unmeasured ones."""
        with self._lock:
            default = self._default_throughput()
            return {p: s.throughput if s.throughput is not None else default for p, s in self._peers.items()}

    def queued(self) -> dict[str, float]:
        """The work this trainer has in flight on each announced peer."""
        with self._lock:
            return {p: s.queued for p, s in self._peers.items()}

    @contextmanager
    def call(self, task_size: float, exclude: Collection[str] = ()) -> Iterator[str]:
        """Chooses a peer and yields it; times the body with the clock and reports ``done``, or ``failed`` without
        a ban if the body raises (the exception propagates; the caller decides on bans)."""
        peer = self.choose(task_size, exclude)
        start = self.clock()
        try:
            yield peer
        except BaseException:
            self.failed(peer, task_size, None)
            raise
        seconds = self.clock() - start
        # A clock too coarse to see the call gives no measurement, but the call still leaves the in-flight work.
        self._finish(peer, task_size, sample=task_size / seconds if seconds > 0 else None)

    def _finish(self, peer: str, task_size: float, sample: float | None) -> None:
        with self._lock:
            state = self._peers.get(peer)
            if state is None or state.calls == 0:
                return  # the peer was dropped (and maybe announced again) since the call was chosen
            state.calls -= 1
            # Reset exactly when nothing is left, so rounding errors in the sum do not pile up.
            state.queued = state.queued - task_size if state.calls > 0 else 0.0
            if sample is not None:
                ema = state.throughput
                state.throughput = sample if ema is None else self.alpha * sample + (1 - self.alpha) * ema
                state.measured_at = self.clock()

    def _default_throughput(self) -> float:
        if self.initial_throughput is not None:
            return self.initial_throughput
        measured = [s.throughput for s in self._peers.values() if s.throughput is not None]
        return max(measured, default=1.0)

    @staticmethod
    def _finish_time(state: _PeerState, task_size: float, default: float) -> float:
        throughput = state.throughput if state.throughput is not None else default
        return (state.queued + task_size) / throughput

    def _no_peer_message(self, exclude: Collection[str], now: float) -> str:
        if not self._peers:
            return f"No peer serves {self.name}: none is announced"
        banned = [
            f"{p} (for {self._banned_until[p] - now:.1f} s more)"
            for p in self._peers
            if p in self._banned_until
        ]
        excluded = [p for p in self._peers if p in exclude and p not in self._banned_until]
        return (
            f"No usable peer for {self.name}: {len(self._peers)} announced, "
            f"banned: {', '.join(banned) or 'none'}; excluded: {', '.join(excluded) or 'none'}"
        )
