"""Serving a FastAPI app with uvicorn on a socket bound first, so ``--port 0`` works and the real address is known.

>>> serve(app, "127.0.0.1", 0, ready=lambda url: print(f"API listening on {url}"))   # blocks until SIGINT/SIGTERM
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn

__all__ = ["serve"]

logger = logging.getLogger(__name__)


def serve(app, host: str, port: int, *, ready: Callable[[str], None] | None = None) -> None:
    """Runs ``app`` on ``host:port`` (0: any free port) until SIGINT or SIGTERM, then returns (a second signal
    stops waiting for open requests); calls ``ready(url)`` once the socket listens. Raises ``OSError`` when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound_port}"
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    _Server(config, lambda: ready(url) if ready is not None else None).run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it has started (the app's lifespan ran and the socket accepts)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self._on_started = on_started

    def handle_exit(self, sig: int, frame) -> None:
        # stop serving and return from serve(), so the caller's cleanup runs (uvicorn would re-raise the signal)
        self.force_exit = self.should_exit
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()
