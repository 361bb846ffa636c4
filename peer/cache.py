"""The KV-cache budget: sessions are charged for the cache tokens they hold, and no client may hold most of it.

A session's cache holds ``batch_size * S`` tokens of keys and values in every block of its span after S tokens.
It is charged for exactly that, step by step (``SessionCharge.grow`` before each step), not for the
``max_length`` it announced at open: a session that opens and sends nothing holds nothing, so it cannot lock others
out. Each client (by its libp2p peer id) may hold at most ``client_share`` of the budget over all its sessions,
so one client cannot take the whole cache either; the rest stays for everyone else. A step that does not fit is
refused with ``BusyError`` (the client fails that hop over to another peer and replays); the peer never runs out
of memory. Everything a session holds is given back when it ends.

Single-threaded: used from the peer's event loop only (the announcer reads ``tokens_left``, a plain int).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

from swarm_peer.errors import BusyError, ValidationError

__all__ = ["CacheBudget", "SessionCharge"]


class CacheBudget:
    """Cache tokens held by sessions, against ``max_tokens``; at most ``client_share`` of it by one client."""

    def __init__(self, max_tokens: int, client_share: float = 1.0):
        self.max_tokens = max_tokens
        self.client_tokens = max(1, int(max_tokens * client_share))
        self.used = 0
        self._by_client: defaultdict[str, int] = defaultdict(int)
        self._closed = False

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - self.used

    def close(self) -> None:
        """Refuse every later session (the peer is leaving)."""
        self._closed = True

    @contextmanager
    def session(self, client: str, max_tokens: int):
        """A new session of ``client`` that will hold at most ``max_tokens`` (batch * max_length); what it holds is
        given back when the block exits."""
        if max_tokens > self.max_tokens:
            raise ValidationError(
                f"a session of {max_tokens} cache tokens can never fit this peer's {self.max_tokens}"
            )
        if self._closed:
            raise BusyError("this peer is shutting down and takes no new sessions")
        self._check(client, 1)  # a session is admitted only if its first token would fit
        charge = SessionCharge(self, client)
        try:
            yield charge
        finally:
            charge.release()

    def _check(self, client: str, tokens: int) -> None:
        held = self._by_client.get(client, 0)
        if held + tokens > self.client_tokens:
            raise BusyError(
                f"cache share exhausted: this client holds {held} of its {self.client_tokens} tokens and asks "
                f"{tokens} more"
            )
        if self.used + tokens > self.max_tokens:
            raise BusyError(
                f"cache budget exhausted: {tokens} tokens asked, {self.tokens_left} of {self.max_tokens} free"
            )

    def _take(self, client: str, tokens: int) -> None:
        self._check(client, tokens)
        self.used += tokens
        self._by_client[client] += tokens

    def _give(self, client: str, tokens: int) -> None:
        if tokens:
            self.used -= tokens
            self._by_client[client] -= tokens
            if not self._by_client[client]:
                del self._by_client[client]


class SessionCharge:
    """What one session holds of a ``CacheBudget``."""

    def __init__(self, budget: CacheBudget, client: str):
        self.budget, self.client = budget, client
        self.tokens = 0

    def grow(self, tokens: int) -> None:
        """Charges ``tokens`` more (a step's batch * new tokens), or raises ``BusyError`` if they do not fit."""
        self.budget._take(self.client, tokens)
        self.tokens += tokens

    def release(self) -> None:
        self.budget._give(self.client, self.tokens)
        self.tokens = 0
