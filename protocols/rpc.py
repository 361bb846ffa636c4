"""RPC names and how errors cross the wire.

Every handler is a hivemind P2P protobuf handler registered under a versioned name. A peer refuses bad input by
raising one of our errors; hivemind sends its text back and the caller sees ``P2PHandlerError``. We tag the text
with the error's kind (``[busy] ...``), so ``remote_error`` can rebuild the right class on the client:
``BusyError`` and plain ``PeerError`` may be retried elsewhere, ``ValidationError`` is the caller's own fault.
"""

from __future__ import annotations

import re

from swarm_peer.errors import (
    BusyError,
    MissingWeightsError,
    PeerError,
    SessionError,
    SwarmError,
    ValidationError,
)

__all__ = [
    "INFO",
    "FORWARD",
    "BACKWARD",
    "INFERENCE",
    "PUSH",
    "SESSION_ID_BYTES",
    "streamed",
    "tag_error",
    "remote_error",
]

INFO = "swarm.v1.info"
FORWARD = "swarm.v1.forward"
BACKWARD = "swarm.v1.backward"
INFERENCE = "swarm.v1.inference"
PUSH = "swarm.v1.push"  # a hop hands its output straight to the next hop's session
SESSION_ID_BYTES = 16  # InferenceOpen.session_id: random, known to the client and the hop before (peer.push)


def streamed(name: str) -> str:
    """The streaming variant of a unary RPC, for requests larger than one message: ``swarm.v1.forward.stream``.

    Requests that fit one message go unary: hivemind answers them over its persistent control connection, which
    is faster and always delivers the peer's error text (a stream closed right after an error can lose it).
    """
    return f"{name}.stream"


_TAGS: dict[type[SwarmError], str] = {
    BusyError: "busy",
    MissingWeightsError: "missing",
    ValidationError: "invalid",
    SessionError: "session",
}
_TAG_RE = re.compile(r"\[(busy|missing|invalid|session)\] (.*)", re.DOTALL)


def tag_error(error: SwarmError) -> Exception:
    """The exception a handler raises so that its kind survives the trip: ``[busy] cache budget exhausted``."""
    for cls, tag in _TAGS.items():
        if isinstance(error, cls):
            return RuntimeError(f"[{tag}] {error}")
    return RuntimeError(str(error))


def remote_error(error: BaseException, peer: str) -> SwarmError:
    """Maps a failed call (``P2PHandlerError``, timeout, broken stream) to our error tree."""
    text = str(error)
    match = _TAG_RE.search(text)
    if match is None:
        return PeerError(f"peer {peer}: {text or type(error).__name__}")
    tag, message = match.groups()
    message = message.rstrip("')\"")
    if tag == "busy":
        return BusyError(f"peer {peer} is busy: {message}")
    if tag == "missing":
        return MissingWeightsError(f"peer {peer}: {message}")
    if tag == "session":
        return SessionError(f"peer {peer}: {message}")
    return ValidationError(f"peer {peer} rejected the request: {message}")
