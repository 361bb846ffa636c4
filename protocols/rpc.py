"""RPC names and how errors cross the wire.

Every handler is a hivemind P2P protobuf handler registered under a versioned name. A peer refuses a request by
raising one of our errors; the handler's answer then carries an ``Error`` (a kind and a one-line message) instead
of tensors (``error_message``), and the caller rebuilds the same class from the kind alone (``check``). A failure
with no answer at all (the peer died, the connection broke, no answer in time) becomes ``remote_error``'s
``PeerError`` or ``DeadlineError``.
"""

from __future__ import annotations

from swarm_peer.errors import (
    BusyError,
    DeadlineError,
    InternalError,
    MissingBlocksError,
    MissingWeightsError,
    PeerError,
    SwarmError,
    UnknownSessionError,
    ValidationError,
)
from swarm_peer.protocols import swarm_pb2

__all__ = [
    "INFO",
    "FORWARD",
    "BACKWARD",
    "INFERENCE",
    "PUSH",
    "SESSION_ID_BYTES",
    "streamed",
    "error_message",
    "check",
    "remote_failure",
    "remote_error",
]

INFO = "swarm.v1.info"
FORWARD = "swarm.v1.forward"
BACKWARD = "swarm.v1.backward"
INFERENCE = "swarm.v1.inference"
PUSH = "swarm.v1.push"  # a hop hands its output straight to the next hop's session
SESSION_ID_BYTES = (
    16  # InferenceOpen.session_id: random, known to the client, the session's peer and the hop before
)


def streamed(name: str) -> str:
    """The streaming variant of a unary RPC, for requests larger than one message: ``swarm.v1.forward.stream``.

    Requests that fit one message go unary: hivemind answers them over its persistent control connection, which
    is faster and always delivers the peer's error text (a stream closed right after an error can lose it).
    """
    return f"{name}.stream"


# what each kind on the wire becomes on the caller's side, and back; anything else a handler raises is INTERNAL
_CLASSES: dict[int, type[SwarmError]] = {
    swarm_pb2.BUSY: BusyError,
    swarm_pb2.INVALID: ValidationError,
    swarm_pb2.UNKNOWN_SESSION: UnknownSessionError,
    swarm_pb2.MISSING_BLOCKS: MissingBlocksError,
    swarm_pb2.DEADLINE: DeadlineError,
    swarm_pb2.INTERNAL: InternalError,
    swarm_pb2.MISSING_WEIGHTS: MissingWeightsError,
}
_KINDS = {cls: kind for kind, cls in _CLASSES.items()}
MAX_ERROR_CHARS = 1000  # an error message longer than this is cut: it is one log line


def error_message(error: BaseException) -> swarm_pb2.Error:
    """The wire form of why a handler failed: a ``SwarmError`` by its class, anything else as INTERNAL."""
    kind = next((_KINDS[cls] for cls in type(error).__mro__ if cls in _KINDS), swarm_pb2.INTERNAL)
    message = (
        str(error) if isinstance(error, SwarmError) else f"internal error: {type(error).__name__}: {error}"
    )
    return swarm_pb2.Error(kind=kind, message=message[:MAX_ERROR_CHARS])


def check(response, peer: object) -> None:
    """Raises what ``response.error`` says (a response of any of our types), if it carries one."""
    if response.HasField("error"):
        raise remote_failure(response.error, peer)


def remote_failure(error: swarm_pb2.Error, peer: object) -> SwarmError:
    """The caller's exception for a peer's typed ``Error``; an unknown kind (a newer peer) is a plain failure."""
    cls = _CLASSES.get(error.kind, PeerError)
    message = error.message[:MAX_ERROR_CHARS]
    if cls is ValidationError:
        return ValidationError(f"peer {peer} rejected the request: {message}")
    return cls(f"peer {peer}: {message}")


def remote_error(error: BaseException, peer: object) -> SwarmError:
    """Maps a failed call (connection lost, no answer in time, hivemind's own ``P2PHandlerError``) to our tree:
    ``DeadlineError`` for a timeout, else a plain ``PeerError`` (the peer could not be reached or broke the
    protocol: retried elsewhere, and the peer banned)."""
    if isinstance(error, SwarmError):
        return error
    if isinstance(error, TimeoutError):
        return DeadlineError(f"peer {peer} did not answer in time")
    return PeerError(f"peer {peer}: {str(error) or type(error).__name__}")
