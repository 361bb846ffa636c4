"""The one error tree of swarm-peer. Catch what you can handle; everything derives from SwarmError.

    SwarmError
    ├── ValidationError        a request, record, file or argument is malformed (the caller's fault; never retried)
    ├── RoutingError           no chain of live peers covers the requested blocks (within the lookup deadline),
    │                          or a mixture-of-experts sample got fewer than k_min expert answers
    ├── SessionError           an inference session is closed or used out of order (by this client)
    └── PeerError              a remote peer failed or refused a call (or could not be reached)
        ├── BusyError          out of capacity now (cache, inbound bytes, streams): another peer, or later
        ├── MissingBlocksError the peer does not serve the requested blocks or experts (any more): the client's view is stale
        ├── DeadlineError      the call or session ran past its deadline or idle timeout
        ├── UnknownSessionError no open session on the peer takes this push
        ├── MissingWeightsError the peer no longer holds the client's LoRA weights; send them again
        └── InternalError      a bug in the peer; not retried, and not held against the peer's health

A peer sends each refusal as a typed kind on the wire (``protocols.swarm.ErrorKind``), and the client rebuilds the
class above from the kind alone (``protocols.rpc``), never from the text. What the client does with a ``PeerError``
is decided by its class, through two attributes (``client.health.Retries``):

- ``retry``: another try, on another peer or later, may succeed;
- ``ban``: the peer is treated as failing: it is banned, for longer after each further failure. Classes that
  retry without a ban (busy, stale blocks, missing weights) only make the client avoid the peer briefly.

A ``ValidationError`` from a peer means the request itself was refused: retrying it elsewhere cannot help.
"""

from __future__ import annotations

__all__ = [
    "SwarmError",
    "ValidationError",
    "RoutingError",
    "SessionError",
    "PeerError",
    "BusyError",
    "MissingBlocksError",
    "DeadlineError",
    "UnknownSessionError",
    "MissingWeightsError",
    "InternalError",
]


class SwarmError(Exception):
    """Base of every error raised by swarm-peer."""


class ValidationError(SwarmError, ValueError):
    """Malformed input: a request payload, a DHT record, a checkpoint, a CLI argument."""


class RoutingError(SwarmError):
    """No chain of live peers covers the requested blocks, or too few experts answered a mixture's sample."""


class SessionError(SwarmError):
    """An inference session is closed, or used out of order, by this client."""


class PeerError(SwarmError):
    """A remote peer failed or refused a call, or could not be reached (connection lost, no answer in time)."""

    retry = True  # another try, elsewhere or later, may succeed
    ban = True  # the peer is treated as failing (banned, with a backoff that grows per failure)


class BusyError(PeerError):
    """The peer has no capacity for this request now (cache budget, inbound bytes, streams); it may have later."""

    ban = False


class MissingBlocksError(PeerError):
    """The peer does not serve the requested blocks or experts (it moved, or the client's view of the swarm is
    stale)."""

    ban = False


class DeadlineError(PeerError):
    """The call, or the session, ran past its deadline or idle timeout on the peer."""


class UnknownSessionError(PeerError):
    """No open session on the peer takes this push (closed, never opened, or not from this sender)."""


class MissingWeightsError(PeerError):
    """The peer has no cached copy of the LoRA weights a request names by digest; resend them attached."""

    ban = False


class InternalError(PeerError):
    """The peer failed on a bug of its own. Retrying elsewhere would hide it, and the peer is not unhealthy."""

    retry = False
    ban = False
