"""The one error tree of swarm-peer. Catch what you can handle; everything derives from SwarmError.

    SwarmError
    ├── ValidationError     a request, record, file or argument is malformed (the caller's fault; never retried)
    ├── RoutingError        no chain of live peers covers the requested blocks (within the lookup deadline)
    ├── PeerError           a remote peer failed or refused a call
    │   ├── BusyError       the peer is out of capacity (e.g. KV-cache budget); try later or elsewhere
    │   └── MissingWeightsError  the peer no longer holds the client's LoRA weights; send them again
    ├── SessionError        an inference session is closed, unknown, or used out of order
    └── ByzantineError      a peer's contribution failed verification

Remote errors arrive as ``PeerError``; their message carries the peer's own explanation, e.g.
``PeerError("peer 12D3Koo...: busy: cache budget exhausted (4096 of 4096 tokens in use)")``.
"""

from __future__ import annotations

__all__ = [
    "SwarmError",
    "ValidationError",
    "RoutingError",
    "PeerError",
    "BusyError",
    "MissingWeightsError",
    "SessionError",
    "ByzantineError",
]


class SwarmError(Exception):
    """Base of every error raised by swarm-peer."""


class ValidationError(SwarmError, ValueError):
    """Malformed input: a request payload, a DHT record, a checkpoint, a CLI argument."""


class RoutingError(SwarmError):
    """No chain of live peers covers the requested blocks."""


class PeerError(SwarmError):
    """A remote peer failed or refused a call. ``retryable`` says whether another try may succeed."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class BusyError(PeerError):
    """The peer has no capacity for this request now (cache budget, queue); it may have later."""


class MissingWeightsError(PeerError):
    """The peer has no cached copy of the LoRA weights a request names by digest; resend them attached."""


class SessionError(SwarmError):
    """An inference session is closed, unknown to the peer, or used out of order."""


class ByzantineError(SwarmError):
    """A peer's contribution failed verification."""
