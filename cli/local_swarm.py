"""A real swarm on 127.0.0.1: a bootstrap DHT node and peers, each its own ``swarm-peer`` process.

Used by ``swarm-peer demo``, the tests and the benchmarks. Every process is started in its own session (process
group), so ``stop()`` ends exactly what it started, the peers' p2pd daemons included. Every wait is bounded.

>>> with LocalSwarm("smollm2", spans=[(0, 10), (10, 20), (20, 30)]) as swarm:
...     model = DistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=swarm.initial_peers)
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalSwarm", "SwarmProcess", "wait_for_experts"]

READY_PREFIX = "Serving blocks"
EXPERTS_READY_PREFIX = "Serving experts"


@dataclass
class SwarmProcess:
    """One ``swarm-peer`` subprocess and the lines it printed to stdout."""

    name: str
    process: subprocess.Popen
    log_path: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    ready_line: str = ""

    def wait_line(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None and self.lines.empty():
                raise RuntimeError(
                    f"{self.name} did not become ready in {timeout:.0f} s (exit code {self.process.poll()}); "
                    f"its log ends with:\n{self.log_tail()}"
                )
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if predicate(line):
                return line

    def wait_ready(self, timeout: float, prefix: str = READY_PREFIX) -> str:
        """Waits for a peer's "Serving blocks A:B of MODEL as PEER_ID" line (or another ``prefix``: "Serving
        experts ..."); keeps it as ``ready_line``."""
        self.ready_line = self.wait_line(lambda line: line.startswith(prefix), timeout)
        return self.ready_line

    @property
    def peer_id(self) -> str:
        """A ready peer's id (base58), from its ready line."""
        return self.ready_line.rsplit(" ", 1)[-1]

    @property
    def blocks(self) -> tuple[int, int]:
        """The span a ready peer started with, from its ready line."""
        start, end = self.ready_line[len(READY_PREFIX) :].split()[0].split(":")
        return int(start), int(end)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def terminate(self, timeout: float) -> None:
        """SIGTERM the process, then SIGKILL its group (its DHT process, p2pd) after it exits or ``timeout``.

        Only the leader gets SIGTERM: it still needs its DHT process and p2pd to announce OFFLINE on its way out.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process, signal.SIGKILL)  # the group's leftovers (p2pd), even if the leader exited
        self.process.wait(5)


class LocalSwarm:
    """Bootstrap node + one peer per span, all on 127.0.0.1."""

    def __init__(
        self,
        model: str,
        spans: list[tuple[int, int]],
        *,
        peer_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 120.0,
        log_dir: str | None = None,
        bootstrap_args: list[str] | None = None,
    ):
        """``peer_args`` go to every ``join``, ``bootstrap_args`` to the bootstrap's ``dht`` (e.g. a fixed port)."""
        self.model, self.spans, self.peer_args = model, spans, list(peer_args or [])
        self.bootstrap_args = list(bootstrap_args or [])
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.start_timeout = start_timeout
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="swarm-peer-"))
        self.processes: list[SwarmProcess] = []
        self.initial_peers: list[str] = []
        self.peers: list[SwarmProcess] = []

    def __enter__(self) -> LocalSwarm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            boot = self._spawn(
                "bootstrap", ["dht", "--host", "127.0.0.1", "--port", "0", *self.bootstrap_args]
            )
            self.initial_peers = [boot.wait_line(lambda line: line.startswith("/ip4/"), self.start_timeout)]
            for start, end in self.spans:
                self.add_peer(start, end, wait=False)
            for peer in self.peers:
                peer.wait_ready(self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def add_peer(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        extra_args: list[str] | None = None,
        wait: bool = True,
        model: str | None = None,
    ) -> SwarmProcess:
        """Starts a peer on blocks [start, end), or (no span given) on the blocks it chooses itself.

        ``model``: the checkpoint this peer serves, if not the swarm's own (e.g. another copy of it).
        """
        args = ["join", model or self.model, "--initial-peers", *self.initial_peers]
        if start is not None:
            args += ["--blocks", f"{start}:{end}"]
        name = f"peer {len(self.peers)} {start}:{end}" if start is not None else f"peer {len(self.peers)}"
        peer = self._spawn(name, args + self.peer_args + list(extra_args or []))
        self.peers.append(peer)
        if wait:
            peer.wait_ready(self.start_timeout)
        return peer

    def add_expert_peers(self, *peer_args: list[str]) -> list[SwarmProcess]:
        """Starts one experts peer per list of ``join`` arguments, all at once (``add_experts``), and waits for all."""
        peers = [self.add_experts(*args, wait=False) for args in peer_args]
        for peer in peers:
            peer.wait_ready(self.start_timeout, prefix=EXPERTS_READY_PREFIX)
        return peers

    @contextlib.contextmanager
    def runtime(self, experts: list[str] | tuple[str, ...] = (), timeout: float = 60.0, **settings):
        """A client ``SwarmRuntime`` of this swarm (``ClientSettings(**settings)``), once each uid of ``experts`` has a
        host in the DHT (``RuntimeError`` after ``timeout`` seconds); shut down on exit."""
        from swarm_peer.protocols.runtime import SwarmRuntime
        from swarm_peer.settings import ClientSettings, NetworkSettings

        network = NetworkSettings(initial_peers=tuple(self.initial_peers), client_mode=True)
        runtime = SwarmRuntime(ClientSettings(network=network, **settings))
        try:
            wait_for_experts(runtime.dht, experts, timeout)
            yield runtime
        finally:
            runtime.shutdown()

    def add_experts(self, *args: str, wait: bool = True) -> SwarmProcess:
        """Starts a peer that hosts experts: ``join --initial-peers ... ARGS`` (``--experts PATTERN --hidden D``...),
        and waits for its "Serving experts ... as PEER_ID" line."""
        peer = self._spawn(
            f"experts {len(self.peers)}", ["join", "--initial-peers", *self.initial_peers, *args]
        )
        self.peers.append(peer)
        if wait:
            peer.wait_ready(self.start_timeout, prefix=EXPERTS_READY_PREFIX)
        return peer

    def _spawn(self, name: str, args: list[str]) -> SwarmProcess:
        log_path = self.log_dir / f"{name.replace(' ', '-').replace(':', '_')}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "swarm_peer.cli.main", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env,
                text=True,
                start_new_session=True,
            )
        proc = SwarmProcess(name, process, log_path)
        threading.Thread(target=_pump, args=(process.stdout, proc.lines), daemon=True).start()
        self.processes.append(proc)
        return proc

    @contextlib.contextmanager
    def client(self, **settings):
        """A ``DistributedModelForCausalLM`` of this swarm's model, connected to it; shut down on exit."""
        from swarm_peer.client import DistributedModelForCausalLM
        from swarm_peer.settings import ClientSettings, NetworkSettings

        network = NetworkSettings(initial_peers=tuple(self.initial_peers), client_mode=True)
        model = DistributedModelForCausalLM.from_pretrained(
            self.model, settings=ClientSettings(network=network, **settings)
        )
        try:
            yield model
        finally:
            model.shutdown()

    def stop(self, timeout: float = 15.0) -> None:
        for proc in reversed(self.processes):
            proc.terminate(timeout)
        self.processes.clear()
        self.peers.clear()


def wait_for_experts(dht, uids: list[str] | tuple[str, ...], timeout: float = 60.0) -> None:
    """Returns once each of ``uids`` has a host in ``dht``; ``RuntimeError`` after ``timeout`` seconds."""
    from swarm_peer.dht import get_experts

    deadline = time.monotonic() + timeout
    while uids and not all(get_experts(dht, uids).values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"experts {uids} were not all found in the DHT within {timeout:.0f} s")
        time.sleep(0.2)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
