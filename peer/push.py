"""Where an inference session's steps come from, and how a peer hands its output straight to the next hop.

Shape legend: B batch, T new tokens, S tokens seen so far including the new ones, D hidden size.

Without push, the client relays every hop: peer 1 answers the client, the client sends that to peer 2, and so on,
so a chain of n peers costs 2n transfers per token. With push (as in Petals' ``rpc_push``), the client sends a step
to the first hop only, and each peer pushes ``[its output, attention_mask_BS, position_ids_BT]`` to the next hop's
session (``swarm.v1.push``), and only the last hop answers the client with the output. A token then costs n + 1
transfers on its critical path.

Who may push, and where to: the client tells each session its neighbours (``swarm_pb2.Neighbours``) when it opens
it, and again when it replaces a hop after a failure: the peer id of the hop before it, the only peer whose pushes
it accepts, and the next hop (peer id and session id), the only one it pushes to. A push is accepted when the
stream's libp2p peer id (authenticated by libp2p's handshake) is that previous hop and its session id, the per-hop
token the client gave only to this hop and the one before, names an open session; anyone else is told there is no
such session, whether there is one or not. A pushed step carries no route: a hop never dials a peer because the
hop before it said so, so a third party that learns a session id can neither push steps into the session nor have
its outputs sent anywhere.

The client keeps every hop's input, to rebuild a hop's cache elsewhere if it fails. A pushed-into peer answers the
client with its own input (as it came, not decoded) once it has pushed its output on, and the last hop answers
``[its output, its input]``: a push carries only what the next hop computes on, so the bytes a hop sends do not grow
with its place in the chain (carrying the earlier hops' inputs along made them grow with it, and the chain's bytes
with its length squared). These answers leave after the push, off the critical path of the token.

Each session has an inbox (``Inboxes.open``): steps from the client's stream and pushed steps land in one queue,
and the session takes them in order. It pushes through a ``Pusher``, which keeps one stream open to each next hop
(a few at most). A pushed step is queued and acknowledged before it is computed, so the pusher learns at once
whether it arrived; when it did not (the next peer is down, busy, refuses it, or the step is too large for one
message) the peer answers the client with its output (``InferenceResponse.pushed`` false), and the client relays
that step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm_peer.errors import BusyError, SwarmError, UnknownSessionError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2
from swarm_peer.protocols.serving import Call, Ledger, Requests

__all__ = ["Step", "Inbox", "Inboxes", "Pusher", "serve_pushes"]

logger = logging.getLogger(__name__)

MAX_CARRIED = 1024  # inputs a push carries, one per hop before; a model has fewer blocks than that
# queued steps per session; the chain sends one step at a time, so more is a misbehaving sender
_INBOX_STEPS = 4
_PUSH_TIMEOUT = 5.0  # seconds to queue a step at the next hop; after that the client relays it
_PUSH_STREAMS = 4  # streams one session keeps open to next hops (a failover changes the next hop)


@dataclass(frozen=True)
class Step:
    """One step's input: hidden_BTD, attention_mask_BS, position_ids_BT; whether its output goes on to the next hop.

    ``carried``: the inputs the client has not seen, serialized, by the first block of their hop: a pushed step's
    own (a peer of an older version may push the earlier hops' inputs too). ``nbytes``: what its
    messages took of the peer's inbound budget, on ``ledger``, given back once the step is computed.
    ``compression``: the codec its hidden states came in, which its output takes (``codec.Wire``)."""

    step_id: int
    tensors: list[torch.Tensor]
    push: bool = False
    carried: Sequence[tuple[int, runtime_pb2.Tensor]] = ()
    ledger: Ledger | None = None
    nbytes: int = 0
    compression: int = codec.NONE

    def done(self) -> None:
        if self.ledger is not None:
            self.ledger.give_back(self.nbytes)


@dataclass
class Inbox:
    """A session's queue of steps, and its neighbours as the client last set them (``swarm_pb2.Neighbours``)."""

    queue: asyncio.Queue
    start_block: int
    previous: str = ""  # base58 peer id whose pushes are accepted; "" = none
    next: swarm_pb2.PushHop | None = None

    def set_neighbours(self, neighbours: swarm_pb2.Neighbours) -> None:
        self.previous = neighbours.previous_peer_id
        self.next = neighbours.next if neighbours.HasField("next") else None
        if self.next is not None:
            if len(self.next.session_id) != rpc.SESSION_ID_BYTES:
                raise ValidationError(
                    f"a session id has {rpc.SESSION_ID_BYTES} bytes, got {len(self.next.session_id)}"
                )
            try:
                PeerID.from_base58(self.next.peer_id)
            except Exception:
                raise ValidationError(
                    f"the next hop's peer id {self.next.peer_id[:64]!r} is not a peer id"
                ) from None

    def drop(self) -> None:
        """Gives back what the steps still queued took of the inbound budget (the session ended)."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, Step):
                item.done()


class Inboxes:
    """The open sessions that accept pushed steps, by session id."""

    def __init__(self):
        self._inboxes: dict[bytes, Inbox] = {}

    @contextlib.contextmanager
    def open(self, session_id: bytes, start_block: int) -> Iterator[Inbox]:
        """A session's inbox; pushes to ``session_id`` (if not empty) land in it until the block exits."""
        if session_id and len(session_id) != rpc.SESSION_ID_BYTES:
            raise ValidationError(f"a session id has {rpc.SESSION_ID_BYTES} bytes, got {len(session_id)}")
        if session_id in self._inboxes:
            raise ValidationError("this session id is already in use")
        inbox = Inbox(asyncio.Queue(maxsize=_INBOX_STEPS + 2), start_block)  # + end of stream and an error
        if session_id:
            self._inboxes[session_id] = inbox
        try:
            yield inbox
        finally:
            self._inboxes.pop(session_id, None)
            inbox.drop()

    def deliver(
        self, request: swarm_pb2.InferencePush, sender: str, ledger: Ledger | None = None, nbytes: int = 0
    ):
        """Queues a step pushed by peer ``sender`` (base58), or raises: no such session for this sender, full
        inbox, malformed tensors."""
        inbox = self._inboxes.get(request.session_id)  # "" is never open
        if inbox is None or not inbox.previous or inbox.previous != sender:
            # the same answer whether the session exists or not: a session id is not to be guessed by trying
            raise UnknownSessionError("no open session on this peer takes pushes with this id from you")
        if inbox.queue.qsize() >= _INBOX_STEPS:
            raise BusyError(f"the session already has {_INBOX_STEPS} steps waiting")
        blocks = request.carried_blocks
        if len(blocks) > MAX_CARRIED:
            raise ValidationError(f"a push carries at most {MAX_CARRIED} tensors, got {len(blocks)}")
        assembler = codec.TensorAssembler(expected=3 + len(blocks))
        assembler.feed(request.tensors)
        messages = assembler.messages()
        tensors = [codec.deserialize(message) for message in messages[:3]]
        carried = (*zip(blocks, messages[3:], strict=True), (inbox.start_block, messages[0]))
        step = Step(request.step_id, tensors, True, carried, ledger, nbytes, messages[0].compression)
        inbox.queue.put_nowait(step)


class Pusher:
    """One session's pushes. Opening a libp2p stream costs a few round trips, so each next hop (peer, session) it
    pushes to gets one ``swarm.v1.push`` stream, kept open until the session ends (``close``); a few at most."""

    def __init__(self, p2p: P2P, inboxes: Inboxes, sent: Callable[[int], None] = lambda nbytes: None):
        """``sent(nbytes)``: called with the size of each push sent to another peer."""
        self.p2p, self.inboxes, self.sent = p2p, inboxes, sent
        self._own_id = p2p.peer_id.to_base58()
        self._streams: dict[tuple[str, bytes], _PushStream] = {}

    async def push(
        self,
        step_id: int,
        out_parts: list,
        mask_BS: torch.Tensor,
        positions_BT: torch.Tensor,
        next_hop: swarm_pb2.PushHop,
    ) -> bool:
        """Hands ``[out, mask_BS, positions_BT]`` to ``next_hop``'s session; whether the step is queued there.

        ``out_parts``: the output as ``codec.pack`` serialized it for the client's answer (serialized once, sent
        once). False, and nothing raised, when the push cannot be made: the client relays the step."""
        inputs_parts = codec.pack([mask_BS, positions_BT])
        if len(out_parts) != 1 or len(inputs_parts) != 1:
            return False  # larger than one message: the client streams it in parts
        tensors = [*out_parts[0], *inputs_parts[0]]
        request = swarm_pb2.InferencePush(session_id=next_hop.session_id, step_id=step_id, tensors=tensors)
        key = (next_hop.peer_id, next_hop.session_id)
        try:
            if next_hop.peer_id == self._own_id:  # the next hop is served here too
                self.inboxes.deliver(request, self._own_id)
                return True
            async with asyncio.timeout(_PUSH_TIMEOUT):
                stream = self._streams.get(key)
                if stream is None:
                    stream = await self._open(key)
                answer = await stream.send(request)
            self.sent(request.ByteSize())
            if answer.HasField("error"):
                logger.debug(
                    "Peer %s did not take step %d: %s", next_hop.peer_id, step_id, answer.error.message
                )
                return False
            return True
        except Exception as e:  # any failure only means the client relays this step
            logger.debug("Could not push step %d to %s: %r", step_id, next_hop.peer_id, e)
            stream = self._streams.pop(key, None)
            if stream is not None:
                stream.close()
            return False

    async def _open(self, key: tuple[str, bytes]) -> _PushStream:
        if len(self._streams) >= _PUSH_STREAMS:  # the oldest is for a hop the client has replaced since
            self._streams.pop(next(iter(self._streams))).close()
        stream = self._streams[key] = await _PushStream.open(self.p2p, PeerID.from_base58(key[0]))
        return stream

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()


class _PushStream:
    """An open ``swarm.v1.push`` stream to one peer: a push, then its answer, in turn.

    Written and read in place with hivemind's protobuf stream framing, the one ``iterate_protobuf_handler`` uses,
    without its writer task and queue: a push is on the critical path of every token."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID) -> _PushStream:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, rpc.PUSH)
        return cls(reader, writer)

    async def send(self, request: swarm_pb2.InferencePush) -> swarm_pb2.PushResponse:
        """Pushes one step; returns the peer's answer (with an ``error`` if it did not queue the step)."""
        await P2P.send_protobuf(request, self._writer)
        answer, error = await P2P.receive_protobuf(swarm_pb2.PushResponse, self._reader)
        if answer is None:
            raise ConnectionError(f"the push stream failed: {error.message}")
        return answer

    def close(self) -> None:
        self._writer.close()  # the peer reads the end of the stream


async def serve_pushes(inboxes: Inboxes, requests: Requests, call: Call, idle_timeout: float):
    """``swarm.v1.push`` (served by ``protocols.serving.RpcServer``): steps pushed by the hop before, each queued
    in its session (``Inboxes.deliver``) or refused with a typed reason, and answered, until the pusher ends the
    stream or leaves it idle for ``idle_timeout`` seconds. A malformed frame ends the stream."""
    requests.idle_timeout = idle_timeout
    sender = call.remote_id.to_base58()
    while True:
        before = requests.bytes_read
        request = await requests.next()
        if request is None:
            return
        nbytes = requests.bytes_read - before
        try:
            inboxes.deliver(request, sender, call.ledger, nbytes)
        except SwarmError as e:
            call.ledger.give_back(nbytes)
            logger.info("Refused a push from %s: %s", sender, e)
            yield swarm_pb2.PushResponse(error=rpc.error_message(e))
        else:
            # let the session take the step first: the answer only tells the pusher what to tell its client,
            # while the step is on the critical path of the token
            await asyncio.sleep(0)
            yield swarm_pb2.PushResponse()
