"""What the client has learned about peers by talking to them (round trips, bans), and how it retries.

Round trips are measured (``SwarmRuntime.ping``), smoothed, and go stale after ``ping_ttl`` seconds, so the router
pings again instead of trusting an old figure. A peer that fails a call is banned: for ``ban_seconds`` after its
first failure, twice as long after each further one, at most ``max_ban_seconds``. A successful call forgives it.
A peer that only refused for now (busy, stale blocks) is avoided for ``ban_seconds``, without counting a failure.
``Retries`` is one call's policy: retry what another peer may do better, with growing pauses, until a deadline;
what is retried and who is banned follows the error's kind alone (``policy``).

>>> health = PeerHealth(ban_seconds=2, max_ban_seconds=300, ping_ttl=60)
>>> health.ban(peer_id); health.is_banned(peer_id)
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from swarm_peer.errors import PeerError, RoutingError

__all__ = ["PeerHealth", "Retries", "policy"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SMOOTHING = 0.3  # weight of a new round-trip measurement in the moving average


class PeerHealth:
    """Round-trip times and bans, keyed by peer id. Thread-safe enough for one client: plain dict updates."""

    def __init__(self, *, ban_seconds: float, max_ban_seconds: float, ping_ttl: float):
        self.ban_seconds, self.max_ban_seconds, self.ping_ttl = ban_seconds, max_ban_seconds, ping_ttl
        self._rtt: dict[Hashable, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self._failures: dict[Hashable, int] = {}
        self._banned_until: dict[Hashable, float] = {}
        self.setbacks = (
            0  # bans and avoidances so far: a view of the swarm taken before the last one is stale
        )

    def record_rtt(self, peer: Hashable, seconds: float) -> None:
        old = self._rtt.get(peer)
        if old is not None and time.monotonic() - old[1] < self.ping_ttl:
            seconds = (1 - _SMOOTHING) * old[0] + _SMOOTHING * seconds
        self._rtt[peer] = (seconds, time.monotonic())

    def rtt(self, peer: Hashable) -> float | None:
        """The smoothed round trip in seconds, or None if never measured or stale."""
        entry = self._rtt.get(peer)
        if entry is None or time.monotonic() - entry[1] >= self.ping_ttl:
            return None
        return entry[0]

    def stale(self, peers: Iterable[Hashable]) -> list[Hashable]:
        """The peers whose round trip should be measured (again)."""
        return [peer for peer in peers if self.rtt(peer) is None]

    def ban(self, peer: Hashable) -> float:
        """Bans ``peer`` after a failure; returns the ban's length in seconds."""
        failures = self._failures.get(peer, 0) + 1
        self._failures[peer] = failures
        seconds = min(self.ban_seconds * 2 ** (failures - 1), self.max_ban_seconds)
        self._banned_until[peer] = time.monotonic() + seconds
        self.setbacks += 1
        return seconds

    def avoid(self, peer: Hashable) -> float:
        """Keeps routes off ``peer`` for ``ban_seconds`` after it refused for now (busy); not a failure."""
        until = max(self._banned_until.get(peer, 0.0), time.monotonic() + self.ban_seconds)
        self._banned_until[peer] = until
        self.setbacks += 1
        return self.ban_seconds

    def forgive(self, peer: Hashable) -> None:
        """A call to ``peer`` succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(peer, None)

    def failures(self, peer: Hashable) -> int:
        """Failures of ``peer`` since its last success."""
        return self._failures.get(peer, 0)

    def is_banned(self, peer: Hashable) -> bool:
        return self._banned_until.get(peer, 0.0) > time.monotonic()


class Retries:
    """The retry policy of one call: which errors are worth another try, bans, bounded backoff, a deadline.

    >>> retries = Retries(health, timeout=120)
    >>> try: ...
    ... except Exception as e: retries.failed(peer_id, e)   # raises e when it is not worth retrying
    """

    def __init__(
        self, health: PeerHealth, *, timeout: float, first_backoff: float = 0.1, max_backoff: float = 2.0
    ):
        self.health, self.first_backoff, self.max_backoff = health, first_backoff, max_backoff
        self.deadline = time.monotonic() + timeout
        self.attempts = 0
        self.last_error: BaseException | None = None

    def plan(self, plan: Callable[..., T], *args, **kwargs) -> T:
        """Calls a route planner; if no route is left after failures, raises the last failure (busy, dead...)."""
        try:
            return plan(*args, **kwargs)
        except RoutingError as e:
            if self.last_error is None:
                raise
            raise self.last_error from e

    def failed(self, peer: Hashable, error: BaseException) -> None:
        """Bans or avoids ``peer`` (as ``error``'s kind says) and waits before the next try; re-raises ``error`` if
        retrying cannot help or time is up."""
        retry, ban = policy(error)
        if not retry:
            raise error
        self.last_error = error
        seconds = self.health.ban(peer) if ban else self.health.avoid(peer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise error
        what = "banned" if ban else "avoided"
        logger.warning("Peer %s failed (%s); %s for %.0f s, retrying", peer, error, what, seconds)
        time.sleep(min(self.first_backoff * 2**self.attempts, self.max_backoff, left))
        self.attempts += 1


def policy(error: BaseException) -> tuple[bool, bool]:
    """(retry, ban) for a failed call, by the error's kind only: a ``PeerError`` says it itself
    (``swarm_peer.errors``); no answer in time or a lost connection is the peer's failure; anything else (the
    caller's own mistake, a bug) is raised at once."""
    if isinstance(error, PeerError):
        return error.retry, error.ban
    if isinstance(error, TimeoutError | ConnectionError):
        return True, True
    return False, False
