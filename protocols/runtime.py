"""A caller's connection to the swarm: a DHT node, a P2P replica, and an event loop on a background thread.

hivemind's P2P is asyncio; the callers' APIs (``generate``, autograd through remote blocks or experts) are
synchronous. ``SwarmRuntime.run(coro)`` runs a coroutine on the runtime's loop and waits for it with a deadline, so
every remote call is bounded.

It lives here, below ``client`` and ``moe``, because both call peers through it (``client``: blocks; ``moe``: experts)
and neither may import the other. ``SwarmRuntime.shared(settings)`` is one runtime per settings for the whole process
(e.g. every mixture-of-experts layer built from the same ``initial_peers``), shut down when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import hivemind
import uvloop
from hivemind.p2p import P2P, PeerID

from swarm_peer.dht import create_dht
from swarm_peer.protocols import rpc, swarm_pb2
from swarm_peer.settings import ClientSettings

__all__ = ["SwarmRuntime"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SwarmRuntime:
    """Owns the client's DHT and P2P handle. Create it from the main thread (hivemind forks the DHT)."""

    _shared: dict[ClientSettings, SwarmRuntime] = {}
    _shared_lock = threading.Lock()

    def __init__(self, settings: ClientSettings, dht: hivemind.DHT | None = None):
        self.settings = settings
        self.owns_dht = dht is None
        self.dht = dht or create_dht(**settings.network.model_dump())
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client-loop", daemon=True)
        self._thread.start()
        self.p2p: P2P = self.run(self.dht.replicate_p2p(), timeout=30)

    @classmethod
    def shared(cls, settings: ClientSettings) -> SwarmRuntime:
        """The process's runtime of ``settings``, started at the first call (a DHT node: ~1 s; from the main thread,
        before CUDA or threads, as any DHT), shut down at exit (``atexit``); callers must not shut it down."""
        with cls._shared_lock:
            runtime = cls._shared.get(settings)
            if runtime is None or runtime.loop.is_closed():
                runtime = cls._shared[settings] = cls(settings)
                atexit.register(runtime.shutdown)
            return runtime

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs ``coro`` on the runtime loop; raises ``TimeoutError`` after ``timeout`` seconds (default: request)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.settings.request_timeout if timeout is None else timeout)
        except TimeoutError:
            future.cancel()
            raise

    def ping(self, peers: Iterable[PeerID], timeout: float = 2.0) -> dict[PeerID, float | None]:
        """Round-trip seconds of an info call to each peer, in parallel; None for a peer that did not answer."""
        peers = list(peers)
        return dict(
            zip(peers, self.run(_ping_all(self.p2p, peers, timeout), timeout=timeout + 5), strict=True)
        )

    def shutdown(self) -> None:
        """Cancels the loop's tasks (open streams, the P2P replica's connections), stops it, and the DHT."""
        if self.loop.is_closed():
            return
        try:
            self.run(_cancel_other_tasks(), timeout=5)
        except TimeoutError:
            logger.warning("Some client tasks did not finish cancelling within 5 s")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
        if self.owns_dht:
            self.dht.shutdown()


async def _ping_all(p2p: P2P, peers: list[PeerID], timeout: float) -> list[float | None]:
    async def ping(peer: PeerID) -> float | None:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await p2p.call_protobuf_handler(
                    peer, rpc.INFO, swarm_pb2.InfoRequest(), swarm_pb2.InfoResponse
                )
        except Exception as e:
            logger.debug("Ping to %s failed: %r", peer, e)
            return None
        return time.perf_counter() - t0

    return list(await asyncio.gather(*map(ping, peers)))


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
