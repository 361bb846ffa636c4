"""A hosting peer's life: join the DHT, load a span of blocks, serve RPCs, announce, leave cleanly.

Order matters (DESIGN.md, "what is known to bite"): the DHT forks its own process, so it is created first, from
the main thread, before torch starts threads. Then the blocks are loaded, the handlers registered on a replica
of the DHT's P2P daemon, and the span announced as ONLINE every ``announce_period``.

On SIGTERM or SIGINT the peer announces OFFLINE (clients stop routing to it), refuses new sessions, waits up to
``shutdown_grace`` seconds for in-flight work, and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable

import hivemind
import torch

import swarm_peer
from swarm_peer.dht import Announcer, ServerInfo, ServerState, create_dht, online_servers
from swarm_peer.errors import ValidationError
from swarm_peer.models import Checkpoint, resolve_checkpoint
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.handlers import BlockHandlers
from swarm_peer.settings import PeerSettings

__all__ = ["Peer", "choose_span"]

logger = logging.getLogger(__name__)


class Peer:
    """``Peer(settings).run()`` serves until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, settings: PeerSettings):
        self.settings = settings
        self.checkpoint: Checkpoint = resolve_checkpoint(settings.model)
        self.model_id = self.checkpoint.model_id
        self.dht: hivemind.DHT = create_dht(**settings.network.model_dump())
        if settings.compute_threads:
            torch.set_num_threads(settings.compute_threads)
        start, end = settings.blocks or choose_span(self.dht, self.checkpoint, settings.num_blocks)
        if end > self.checkpoint.num_blocks:
            raise ValidationError(
                f"blocks {start}:{end} exceed the model's {self.checkpoint.num_blocks} blocks"
            )
        self.state = ServerState.JOINING
        t0 = time.perf_counter()
        self.span = BlockSpan(self.checkpoint, start, end, dtype=settings.dtype, device=settings.device)
        logger.info(
            "Loaded blocks %d:%d of %s in %.1f s", start, end, self.model_id, time.perf_counter() - t0
        )
        self.handlers = BlockHandlers(self.span, self.model_id, settings, self._info_json)
        self.announcer = Announcer(self.dht, self.model_id, self.server_info, period=settings.announce_period)
        self._stop = asyncio.Event()

    def server_info(self) -> ServerInfo:
        return ServerInfo(
            state=self.state,
            start_block=self.span.start,
            end_block=self.span.end,
            cache_tokens_left=self.handlers.budget.tokens_left,
            version=swarm_peer.__version__,
            dtype=self.settings.dtype,
            public_name=self.settings.public_name,
        )

    def _info_json(self) -> bytes:
        info = json.loads(self.server_info().model_dump_json())
        return json.dumps(
            {"model_id": self.model_id, "peer_id": self.dht.peer_id.to_base58(), **info}
        ).encode()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serves until SIGTERM/SIGINT; ``on_ready`` is called once the span is announced."""
        asyncio.run(self._serve(on_ready))

    async def _serve(self, on_ready: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        p2p = await self.dht.replicate_p2p()
        await self.handlers.register(p2p)
        self.state = ServerState.ONLINE
        self.announcer.start()
        logger.info(
            "Serving blocks %d:%d of %s as %s", self.span.start, self.span.end, self.model_id, p2p.peer_id
        )
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            await self._leave()

    async def _leave(self) -> None:
        logger.info("Leaving: announcing offline and finishing in-flight work")
        self.state = ServerState.OFFLINE
        self.handlers.budget.close()
        await asyncio.get_running_loop().run_in_executor(None, self.announcer.stop)
        deadline = time.monotonic() + self.settings.shutdown_grace
        while (self.handlers.in_flight or self.handlers.open_sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.handlers.shutdown()
        self.dht.shutdown()

    def stop(self) -> None:
        self._stop.set()


def choose_span(dht: hivemind.DHT, checkpoint: Checkpoint, num_blocks: int | None) -> tuple[int, int]:
    """The ``num_blocks`` contiguous blocks where the swarm has the fewest live peers (earliest on ties)."""
    total = checkpoint.num_blocks
    size = min(num_blocks or total, total)
    servers = online_servers(dht, checkpoint.model_id, range(total))
    coverage = [len(peers) for peers in servers]
    best = min(range(total - size + 1), key=lambda s: (sum(coverage[s : s + size]), s))
    return best, best + size
