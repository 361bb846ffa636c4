"""Where an inference session's steps come from, and how a peer hands its output straight to the next hop.

Shape legend: B batch, T new tokens, S tokens seen so far including the new ones, D hidden size.

Without push, the client relays every hop: peer 1 answers the client, the client sends that to peer 2, and so on,
so a chain of n peers costs 2n transfers per token. With push (as in Petals' ``rpc_push``), the client sends a step
to the first hop only, with the rest of the chain as a route of ``(peer id, session id)`` pairs; each peer pushes
``[its output, attention_mask_BS, position_ids_BT, *carried]`` to the next hop's session (``swarm.v1.push``), and
only the last hop answers the client. A token then costs n + 1 transfers.

The client keeps every hop's input, to rebuild a hop's cache elsewhere if it fails. Those inputs are carried: a
pushed-into peer adds its own input (as it came, not decoded) to the carried ones and pushes them on, and the last
hop answers ``[its output, *carried]``. Answering the client from every hop instead costs a message per hop, which
on a busy machine takes CPU from the critical path. If the carried tensors outgrow one message, the peer answers
the client with them and pushes without.

Each session has an inbox (``Inboxes.open``): steps from the client's stream and pushed steps land in one queue,
and the session takes them in order. It pushes through a ``Pusher``, which keeps one stream open to each next hop.
A pushed step is queued and acknowledged before it is computed, so the pusher learns at once whether it arrived;
when it did not (the next peer is down, unknown to this one, busy, or the step is too large for one message) the
peer answers the client with its output (``InferenceResponse.pushed`` false), and the client relays that step.

A session id is 16 random bytes that the client gives only to the session's peer and to the hop before it; knowing
it is what allows pushing into the session, and no other session can be reached with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm_peer.errors import BusyError, SessionError, SwarmError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2

__all__ = ["Step", "Inboxes", "Pusher", "check_route", "serve_pushes"]

logger = logging.getLogger(__name__)

MAX_ROUTE = 1024  # hops after this one; a model has fewer blocks than that
# queued steps per session; the chain sends one step at a time, so more is a misbehaving sender
_INBOX_STEPS = 4
_PUSH_TIMEOUT = 5.0  # seconds to queue a step at the next hop; after that the client relays it


@dataclass(frozen=True)
class Step:
    """One step's input: hidden_BTD, attention_mask_BS, position_ids_BT, and where its output goes next.

    ``carried``: the inputs the client has not seen, serialized, by the first block of their hop, up to and
    including this step's own (pushed steps only; the client sent the others itself)."""

    step_id: int
    tensors: list[torch.Tensor]
    route: Sequence[swarm_pb2.PushHop] = ()
    carried: Sequence[tuple[int, runtime_pb2.Tensor]] = ()


class Inboxes:
    """The open sessions that accept pushed steps, by session id."""

    def __init__(self):
        self._queues: dict[bytes, tuple[asyncio.Queue, int]] = {}  # and the session's first block

    @contextlib.contextmanager
    def open(self, session_id: bytes, start_block: int) -> Iterator[asyncio.Queue]:
        """A session's inbox; pushes to ``session_id`` (if not empty) land in it until the block exits."""
        if session_id and len(session_id) != rpc.SESSION_ID_BYTES:
            raise ValidationError(f"a session id has {rpc.SESSION_ID_BYTES} bytes, got {len(session_id)}")
        if session_id in self._queues:
            raise ValidationError("this session id is already in use")
        queue: asyncio.Queue = asyncio.Queue(maxsize=_INBOX_STEPS + 2)  # + end of stream and an error
        if session_id:
            self._queues[session_id] = queue, start_block
        try:
            yield queue
        finally:
            self._queues.pop(session_id, None)

    def deliver(self, request: swarm_pb2.InferencePush) -> None:
        """Queues a pushed step, or raises: unknown session, full inbox, malformed tensors or route."""
        queue, start_block = self._queues.get(request.session_id, (None, 0))  # "" is never open
        if queue is None:
            raise SessionError("no open session has this id on this peer")
        if queue.qsize() >= _INBOX_STEPS:
            raise BusyError(f"the session already has {_INBOX_STEPS} steps waiting")
        check_route(request.route)
        blocks = request.carried_blocks
        if len(blocks) > MAX_ROUTE:
            raise ValidationError(f"a push carries at most {MAX_ROUTE} tensors, got {len(blocks)}")
        assembler = codec.TensorAssembler(expected=3 + len(blocks))
        assembler.feed(request.tensors)
        messages = assembler.messages()
        tensors = [codec.deserialize(message) for message in messages[:3]]
        carried = (*zip(blocks, messages[3:], strict=True), (start_block, messages[0]))
        queue.put_nowait(Step(request.step_id, tensors, tuple(request.route), carried))


def check_route(route: Sequence[swarm_pb2.PushHop]) -> None:
    if len(route) > MAX_ROUTE:
        raise ValidationError(f"a step's route has at most {MAX_ROUTE} hops, got {len(route)}")


class Pusher:
    """One session's pushes. Opening a libp2p stream costs a few round trips, so each next hop (peer, session) it
    pushes to gets one ``swarm.v1.push`` stream, kept open until the session ends (``close``)."""

    def __init__(self, p2p: P2P, inboxes: Inboxes):
        self.p2p, self.inboxes = p2p, inboxes
        self._own_id = p2p.peer_id.to_base58()
        self._streams: dict[tuple[str, bytes], _PushStream] = {}

    async def push(
        self,
        step_id: int,
        out_parts: list,
        mask_BS: torch.Tensor,
        positions_BT: torch.Tensor,
        route: Sequence[swarm_pb2.PushHop],
        carried: Sequence[tuple[int, runtime_pb2.Tensor]] = (),
    ) -> tuple[bool, bool]:
        """Hands ``[out, mask_BS, positions_BT, *carried]`` to ``route[0]``'s session, or the first three alone if
        ``carried`` would not fit in the message. Returns whether the step is queued there, and whether ``carried``
        went with it.

        ``out_parts``: the output as ``codec.pack`` serialized it for the client's answer (serialized once, sent
        once). (False, False), and nothing raised, when the push cannot be made: the client relays the step."""
        inputs_parts = codec.pack([mask_BS, positions_BT])
        if len(out_parts) != 1 or len(inputs_parts) != 1:
            return False, False  # larger than one message: the client streams it in parts
        tensors = [*out_parts[0], *inputs_parts[0]]
        size = sum(codec.message_bytes(part) for part in (*tensors, *(part for _, part in carried)))
        along = not carried or size <= codec.MAX_MESSAGE_BYTES
        head, rest = route[0], route[1:]
        request = swarm_pb2.InferencePush(
            session_id=head.session_id, step_id=step_id, tensors=tensors, route=rest
        )
        if along:
            request.carried_blocks.extend(block for block, _ in carried)
            request.tensors.extend(part for _, part in carried)
        key = (head.peer_id, head.session_id)
        try:
            if head.peer_id == self._own_id:  # the next hop is served here too
                self.inboxes.deliver(request)
                return True, along
            async with asyncio.timeout(_PUSH_TIMEOUT):
                stream = self._streams.get(key)
                if stream is None:
                    peer = PeerID.from_base58(head.peer_id)
                    stream = self._streams[key] = await _PushStream.open(self.p2p, peer)
                error = await stream.send(request)
            if error:
                logger.debug("Peer %s did not take step %d: %s", head.peer_id, step_id, error)
            return not error, along and not error
        except Exception as e:  # any failure only means the client relays this step
            logger.debug("Could not push step %d to %s: %r", step_id, head.peer_id, e)
            stream = self._streams.pop(key, None)
            if stream is not None:
                stream.close()
            return False, False

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

    async def send(self, request: swarm_pb2.InferencePush) -> str:
        """Pushes one step; returns the peer's error text, "" if it queued the step."""
        await P2P.send_protobuf(request, self._writer)
        answer, error = await P2P.receive_protobuf(swarm_pb2.PushResponse, self._reader)
        if answer is None:
            raise ConnectionError(f"the push stream failed: {error.message}")
        return answer.error

    def close(self) -> None:
        self._writer.close()  # the peer reads the end of the stream


async def serve_pushes(inboxes: Inboxes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``swarm.v1.push``: steps pushed by the hop before, each queued in its session (``Inboxes.deliver``) or
    refused with a tagged reason, and answered, until the pusher ends the stream.

    The same framing as a hivemind protobuf stream handler (a hivemind client can call it), read and answered in one
    loop: hivemind's handler starts a task and waits on two per message, which costs more than the push itself."""
    with contextlib.closing(writer):
        try:
            while True:
                request, _ = await P2P.receive_protobuf(swarm_pb2.InferencePush, reader)
                if request is None:
                    return  # the end-of-stream marker
                try:
                    inboxes.deliver(request)
                except SwarmError as e:
                    answer = swarm_pb2.PushResponse(error=str(rpc.tag_error(e)))
                else:
                    answer = swarm_pb2.PushResponse()
                    # let the session take the step first: the answer only tells the pusher what to tell its
                    # client, while the step is on the critical path of the token
                    await asyncio.sleep(0)
                await P2P.send_protobuf(answer, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the pusher closed the stream or went away
        except Exception as e:  # garbage on the stream: drop it, as hivemind's handlers do
            logger.debug("Closed a push stream that sent something unreadable: %r", e)
