"""The KV-cache budget: a peer admits an inference session only if its cache fits.

A session's worst case is ``batch_size * max_length`` tokens of keys and values in every block of its span, so
that is what it reserves at open, and releases when it closes or idles out. A session that does not fit is
refused with ``BusyError`` (the client may wait or go elsewhere); it never runs the peer out of memory.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from swarm_peer.errors import BusyError, ValidationError

__all__ = ["CacheBudget"]


class CacheBudget:
    """Counts reserved cache tokens against ``max_tokens``. Thread-safe."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._used = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - self._used

    def close(self) -> None:
        """Refuse every later reservation (the peer is leaving)."""
        self._closed = True

    @contextmanager
    def reserve(self, tokens: int):
        if tokens > self.max_tokens:
            raise ValidationError(
                f"a session of {tokens} cache tokens can never fit this peer's {self.max_tokens}"
            )
        with self._lock:
            if self._closed:
                raise BusyError("this peer is shutting down and takes no new sessions")
            if self._used + tokens > self.max_tokens:
                raise BusyError(
                    f"cache budget exhausted: {tokens} tokens asked, {self.max_tokens - self._used} of "
                    f"{self.max_tokens} free"
                )
            self._used += tokens
        try:
            yield
        finally:
            with self._lock:
                self._used -= tokens
