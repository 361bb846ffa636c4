"""The training run as the DHT lists it, kept fresh off the training thread: its volunteers (``RunInfo`` by peer
id) and the bans they agree on (``dht.ban_record.agreed_bans``).

A volunteer needs both at every round: whom the round waits for, the Moshpit grid, whom to ban. It may not wait
on the DHT there: a lookup can take seconds (a DHT node it asks may be dead), and a volunteer that reaches a
round late misses it. So a daemon thread looks the run up every ``interval`` seconds, or sooner when asked
(``refresh``: a trainer asks as it starts a round's local steps, so the listing is fresh when the round comes),
both listings in one DHT request, and the trainer reads the last result::

    view = RunView(dht, "my-run")
    view.start()
    if view.wait(5.0):  # the first lookup, at most 5 s
        listing = view.latest  # .volunteers {peer id: RunInfo}, .bans {peer id: reason}
    view.stop()

A lookup that fails (the DHT does not answer in ``timeout``) leaves the last listing, and the next one retries.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from swarm_peer.dht.ban_record import agreed_bans
from swarm_peer.dht.catalog import list_runs_and_bans
from swarm_peer.dht.run_record import RunInfo

__all__ = ["RunListing", "RunView"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunListing:
    """One lookup of a run: its volunteers {peer id (base58): RunInfo}, the bans a strict majority of them
    declare {peer id: reason}, and when the lookup began (``time.monotonic``; -inf: never looked up)."""

    volunteers: dict[str, RunInfo] = field(default_factory=dict)
    bans: dict[str, str] = field(default_factory=dict)
    time: float = -float("inf")


class RunView(threading.Thread):
    """A daemon thread that looks up ``run_id``'s listing every ``interval`` seconds (module docstring)."""

    def __init__(
        self, dht, run_id: str, *, interval: float = 5.0, timeout: float = 5.0, min_interval: float = 1.0
    ):
        super().__init__(name=f"swarm-run-view-{run_id}", daemon=True)
        self.dht, self.run_id = dht, run_id
        self.interval, self.timeout = interval, timeout
        self.min_interval = min_interval  # seconds between two lookups, however often ``refresh`` is called
        self.latest = RunListing()  # replaced whole by each lookup: readers of the last one need no lock
        self._changed = threading.Condition()
        self._wakeup = threading.Event()
        self._stop = threading.Event()

    def refresh(self) -> None:
        """Asks for a lookup now (at most one per ``min_interval``); does not wait for it."""
        self._wakeup.set()

    def fresh(self, since: float, timeout: float) -> RunListing:
        """The first listing looked up after ``since`` (``time.monotonic``), waiting for it at most ``timeout``
        seconds (then the last one)."""
        with self._changed:
            self._changed.wait_for(lambda: self.latest.time > since, timeout)
            return self.latest

    def wait(self, timeout: float) -> bool:
        """Waits for the first lookup, at most ``timeout`` seconds; whether one succeeded."""
        return self.fresh(-float("inf"), timeout).time > -float("inf")

    def run(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            began = time.monotonic()
            try:
                runs, bans = list_runs_and_bans(self.dht, self.run_id, timeout=self.timeout)
            except Exception as e:  # TimeoutError, or a DHT shut down under us: the next lookup retries
                logger.debug("Looking up run %s failed: %s: %s", self.run_id, type(e).__name__, e)
            else:
                volunteers = runs.get(self.run_id, {})
                with self._changed:
                    self.latest = RunListing(
                        volunteers, agreed_bans(bans.get(self.run_id, {}), volunteers), began
                    )
                    self._changed.notify_all()
            if not self._stop.wait(self.min_interval):
                self._wakeup.wait(self.interval - self.min_interval)

    def stop(self) -> None:
        """Ends the thread after the lookup under way, if any (it is a daemon: this does not wait)."""
        self._stop.set()
        self._wakeup.set()
