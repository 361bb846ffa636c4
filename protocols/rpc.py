"""RPC names and how errors cross the wire.

Every handler is a hivemind P2P protobuf handler registered under a versioned name. A peer refuses a request by
raising one of our errors; the handler's answer then carries an ``Error`` (a kind and a one-line message) instead
of tensors (``error_message``), and the caller rebuilds the same class from the kind alone (``check``). A failure
with no answer at all (the peer died, the connection broke, no answer in time) becomes ``remote_error``'s
``PeerError`` or ``DeadlineError``.
"""

from __future__ import annotations

import contextlib

from hivemind.p2p import P2P, PeerID
from hivemind.utils.asyncio import as_aiter

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
from swarm_peer.protocols import codec, swarm_pb2

__all__ = [
    "INFO",
    "FORWARD",
    "BACKWARD",
    "INFERENCE",
    "PUSH",
    "EXPERT_FORWARD",
    "EXPERT_BACKWARD",
    "STAGE_STATE",
    "SESSION_ID_BYTES",
    "streamed",
    "error_message",
    "check",
    "remote_failure",
    "remote_error",
    "call_with_tensors",
]

INFO = "swarm.v1.info"
FORWARD = "swarm.v1.forward"
BACKWARD = "swarm.v1.backward"
INFERENCE = "swarm.v1.inference"
PUSH = "swarm.v1.push"  # a hop hands its output straight to the next hop's session
EXPERT_FORWARD = "swarm.v1.expert_forward"  # several experts of a peer, each on its batch, in one request
EXPERT_BACKWARD = "swarm.v1.expert_backward"
STAGE_STATE = (
    "swarm.v1.stage_state"  # a trainable stage's weights and optimizer state (protocols.stage_state)
)
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


async def call_with_tensors(
    p2p: P2P,
    peer_id: PeerID,
    name: str,
    types: tuple[type, type],
    tensors,
    expected: int,
    compression: int = codec.NONE,
    *,
    compressed: int | None = None,
    **first_fields,
) -> list:
    """Calls RPC ``name`` of ``peer_id`` with ``tensors`` (packed into parts, ``codec.pack``, floating ones among
    the first ``compressed`` (default: all) in ``compression``) and returns the ``expected`` tensors of its answer. ``types``: the request and response messages; ``first_fields`` go into the
    first request message only. A request that fits one message goes unary, a larger one to ``streamed(name)``.

    Raises the peer's typed error (``check``), or ``remote_error``'s mapping of a call that failed on the way.
    """
    request_type, response_type = types
    requests = [
        request_type(tensors=parts, **(first_fields if i == 0 else {}))
        for i, parts in enumerate(codec.pack(tensors, compression, compressed=compressed))
    ]
    assembler = codec.TensorAssembler(expected=expected)
    try:
        if len(requests) == 1:
            response = await p2p.call_protobuf_handler(peer_id, name, requests[0], response_type)
            check(response, peer_id)
            with answer_from(peer_id):
                assembler.feed(response.tensors)
        else:
            responses = await p2p.iterate_protobuf_handler(
                peer_id, streamed(name), as_aiter(*requests), response_type
            )
            async for response in responses:
                check(response, peer_id)
                with answer_from(peer_id):
                    assembler.feed(response.tensors)
        with answer_from(peer_id):  # incomplete if the peer died mid-answer
            return assembler.tensors()
    except Exception as e:
        raise remote_error(e, peer_id) from None


@contextlib.contextmanager
def answer_from(peer: object):
    """Tensors of a peer's answer that are not what the call expects (malformed, or fewer: it died mid-answer) are
    the peer's failure, retried elsewhere and the peer banned; ``ValidationError`` stays for requests it refused."""
    try:
        yield
    except ValidationError as e:
        raise PeerError(f"peer {peer} sent a broken answer: {e}") from None
