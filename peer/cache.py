"""The KV-cache budget, in bytes: sessions are charged for the cache they hold, and no client may hold most of it.

A session over blocks ``[a, b)`` holds ``batch_size * S * bytes_per_token`` of keys and values after S tokens
(``BlockSpan.cache_bytes_per_token(a, b)``: a key and a value per block, in the span's dtype). It is charged for
exactly that, step by step (``SessionCharge.grow`` before each step), not for the ``max_length`` it announced at
open: a session that opens and sends nothing holds nothing, so it cannot lock others out. Each client (by its
libp2p peer id) may hold at most ``client_share`` of the budget over all its sessions, so one client cannot take
the whole cache either; the rest stays for everyone else. A step that does not fit is refused with ``BusyError``
(the client fails that hop over to another peer and replays); the peer never runs out of memory. Everything a
session holds is given back when it ends.

Single-threaded: used from the peer's event loop only (the announcer reads ``bytes_left``, a plain int).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

from swarm_peer.errors import BusyError, ValidationError

__all__ = ["CacheBudget", "SessionCharge"]

_MiB = 2**20


class CacheBudget:
    """Cache bytes held by sessions, against ``max_bytes``; at most ``client_share`` of it by one client."""

    def __init__(self, max_bytes: int, client_share: float = 1.0):
        self.max_bytes = max_bytes
        self.client_bytes = max(1, int(max_bytes * client_share))
        self.used = 0
        self.tokens = 0  # what ``used`` holds, in tokens (batch x length) of the sessions' own spans
        self._by_client: defaultdict[str, int] = defaultdict(int)
        self._closed = False

    @property
    def bytes_left(self) -> int:
        return self.max_bytes - self.used

    def close(self) -> None:
        """Refuse every later session (the peer is leaving)."""
        self._closed = True

    @contextmanager
    def session(self, client: str, bytes_per_token: int, max_tokens: int):
        """A new session of ``client`` whose tokens (batch * length) cost ``bytes_per_token`` each, at most
        ``max_tokens`` of them; what it holds is given back when the block exits."""
        if bytes_per_token * max_tokens > self.max_bytes:
            raise ValidationError(
                f"a session of {max_tokens} cache tokens ({bytes_per_token * max_tokens / _MiB:.1f} MiB) can "
                f"never fit this peer's {self.max_bytes / _MiB:.1f} MiB cache"
            )
        if self._closed:
            raise BusyError("this peer is shutting down and takes no new sessions")
        self._check(client, bytes_per_token)  # a session is admitted only if its first token would fit
        charge = SessionCharge(self, client, bytes_per_token)
        try:
            yield charge
        finally:
            charge.release()

    def _check(self, client: str, nbytes: int) -> None:
        held = self._by_client.get(client, 0)
        if held + nbytes > self.client_bytes:
            raise BusyError(
                f"cache share exhausted: this client holds {held / _MiB:.1f} of its {self.client_bytes / _MiB:.1f}"
                f" MiB and asks {nbytes / _MiB:.2f} more"
            )
        if self.used + nbytes > self.max_bytes:
            raise BusyError(
                f"cache budget exhausted: {nbytes / _MiB:.2f} MiB asked, {self.bytes_left / _MiB:.1f} of "
                f"{self.max_bytes / _MiB:.1f} free"
            )

    def _take(self, client: str, nbytes: int) -> None:
        self._check(client, nbytes)
        self.used += nbytes
        self._by_client[client] += nbytes

    def _give(self, client: str, nbytes: int) -> None:
        if nbytes:
            self.used -= nbytes
            self._by_client[client] -= nbytes
            if not self._by_client[client]:
                del self._by_client[client]


class SessionCharge:
    """What one session holds of a ``CacheBudget``."""

    def __init__(self, budget: CacheBudget, client: str, bytes_per_token: int):
        self.budget, self.client, self.bytes_per_token = budget, client, bytes_per_token
        self.nbytes = self.tokens = 0

    def grow(self, tokens: int) -> None:
        """Charges ``tokens`` more (a step's batch * new tokens), or raises ``BusyError`` if they do not fit."""
        nbytes = tokens * self.bytes_per_token
        self.budget._take(self.client, nbytes)
        self.nbytes += nbytes
        self.tokens += tokens
        self.budget.tokens += tokens

    def shrink(self, tokens: int) -> None:
        """Gives back ``tokens`` (batch * tokens the session dropped from its cache: a rollback)."""
        tokens = min(tokens, self.tokens)
        nbytes = tokens * self.bytes_per_token
        self.budget._give(self.client, nbytes)
        self.nbytes -= nbytes
        self.tokens -= tokens
        self.budget.tokens -= tokens

    def release(self) -> None:
        self.shrink(self.tokens)
