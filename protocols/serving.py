"""How a peer serves an RPC: frames, bytes, streams and time bounded before anything is buffered; errors typed.

Every RPC a peer serves (blocks now; averaging, experts and stages later) is registered through one ``RpcServer``,
so each inherits the same rules:

- **Frames.** A streamed RPC's messages are read here, not by hivemind (the same framing: a marker byte, an 8-byte
  length, the message). A frame whose header declares more than ``Limits.max_frame_bytes`` is refused from its
  header, before a byte of its body is read; a frame whose header arrived must be complete within
  ``Limits.frame_seconds`` (a half-sent frame cannot hold a stream open).
- **Bytes in flight.** Every frame's bytes are charged to the peer-wide ``InboundBudget`` before its body is read,
  on the stream's ``Ledger``, and given back when the handler is done with them (or when the stream ends). Over
  budget, a frame waits up to ``Limits.budget_wait`` seconds for room, then the call is refused as BUSY.
- **Streams.** At most ``Limits.max_streams`` streams are served at once; one more is refused as BUSY at once.
- **Time.** Each call runs under a deadline: the RPC's maximum, which the handler may shorten to what the caller
  asked for (``Call.set_deadline``). A stream also has an idle timeout between messages (``Requests.idle_timeout``).
- **Errors.** A handler refuses by raising a ``SwarmError``; its answer is then one response carrying the typed
  ``Error`` (``protocols.rpc``), logged as one line. Anything else it raises is a bug: sent as INTERNAL, logged
  with its traceback. After an error the stream reads what the caller still sends, for a moment, before closing:
  closing a stream with unread input makes p2pd reset it, and the reset can lose the error on its way out.

Handlers are async generators ``handler(requests, call)`` that yield responses; ``requests`` is a ``Requests``
(an async iterator of request messages) and ``call`` a ``Call`` (who calls, its ledger and deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from swarm_peer.errors import BusyError, DeadlineError, SwarmError, ValidationError
from swarm_peer.protocols import rpc, swarm_pb2

__all__ = ["Limits", "InboundBudget", "Ledger", "Requests", "Call", "RpcServer"]

logger = logging.getLogger(__name__)

_DRAIN_SECONDS = 2.0  # how long a stream that failed reads what its caller still sends
_DRAIN_BYTES = 64 << 20  # and how much of it, at most


@dataclass(frozen=True)
class Limits:
    """What one peer accepts from all its callers together."""

    max_frame_bytes: int = (4 << 20) + (64 << 10)  # hivemind's 4 MiB message cap, and framing
    frame_seconds: float = 10.0  # a frame whose header arrived must be complete within this
    max_streams: int = 128  # streams served at once, all RPCs together
    inbound_bytes: int = 256 << 20  # request bytes held in memory at once (InboundBudget)
    budget_wait: float = (
        1.0  # seconds a frame waits for room in the budget before the call is refused as busy
    )


class InboundBudget:
    """Bytes of requests that the peer holds in memory, all streams together, against ``max_bytes``.

    A single charge larger than the whole budget is let through when nothing else is held, so a budget smaller
    than one frame still serves one caller at a time."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._freed: asyncio.Event | None = None

    async def acquire(self, nbytes: int, wait: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.used and self.used + nbytes > self.max_bytes:
            if self._freed is None:
                self._freed = asyncio.Event()
            self._freed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._freed.wait()
            except TimeoutError:
                raise BusyError(
                    f"inbound budget exhausted: {self.used / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB of "
                    "requests in flight"
                ) from None
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        if self._freed is not None:
            self._freed.set()


class Ledger:
    """One stream's share of the ``InboundBudget``: what it took and has not given back yet."""

    def __init__(self, budget: InboundBudget, wait: float):
        self.budget, self.wait = budget, wait
        self.held = 0

    async def take(self, nbytes: int) -> None:
        await self.budget.acquire(nbytes, self.wait)
        self.held += nbytes

    def give_back(self, nbytes: int) -> None:
        """Gives back ``nbytes`` (at most what is held: a step may outlive the stream that brought it)."""
        nbytes = min(nbytes, self.held)
        self.held -= nbytes
        self.budget.release(nbytes)

    def close(self) -> None:
        self.give_back(self.held)


class Requests:
    """The request messages of one stream, read under the peer's ``Limits``: ``async for request in requests``.

    ``idle_timeout``: seconds to wait for the next message (None: until the call's deadline); the handler sets it.
    ``bytes_read``: the frame bytes read so far, all charged to the stream's ledger."""

    def __init__(
        self, reader: asyncio.StreamReader | None, message_type: type[Message], limits: Limits, ledger
    ):
        self._reader, self._type, self._limits, self._ledger = reader, message_type, limits, ledger
        self.idle_timeout: float | None = None
        self.bytes_read = 0
        self._ended = False

    @classmethod
    def of(cls, message: Message) -> Requests:
        """A stream of one message that is already here (a unary call)."""
        requests = cls(None, type(message), Limits(), None)
        requests._single = message
        return requests

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Message:
        message = await self.next()
        if message is None:
            raise StopAsyncIteration
        return message

    async def next(self) -> Message | None:
        """The next message; None at the end of the stream (or when the caller went away)."""
        if self._ended:
            return None
        if self._reader is None:  # Requests.of
            self._ended = True
            return self._single
        try:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    marker = await self._reader.readexactly(1)
            except TimeoutError:
                raise DeadlineError(
                    f"no message within the idle timeout of {self.idle_timeout:g} s"
                ) from None
            data = await self._frame()
        except (asyncio.IncompleteReadError, ConnectionError):
            self._ended = True
            return None
        if marker == P2P.ERROR_MARKER:  # hivemind's end-of-stream message
            self._ended = True
            return None
        if marker != P2P.MESSAGE_MARKER:
            raise ValidationError(f"not a message frame (marker {marker!r})")
        try:
            return self._type.FromString(data)
        except DecodeError:
            raise ValidationError(f"a {len(data)}-byte frame is not a {self._type.__name__}") from None

    async def _frame(self) -> bytes:
        limits = self._limits
        try:
            async with asyncio.timeout(limits.frame_seconds):
                header = await self._reader.readexactly(P2P.HEADER_LEN)
                nbytes = int.from_bytes(header, P2P.BYTEORDER)
                if nbytes > limits.max_frame_bytes:
                    raise ValidationError(
                        f"a message of {nbytes} bytes exceeds this peer's limit of {limits.max_frame_bytes}"
                    )
                await self._ledger.take(nbytes)
                self.bytes_read += nbytes
                return await self._reader.readexactly(nbytes)
        except TimeoutError:
            raise DeadlineError(f"a message was not complete within {limits.frame_seconds:g} s") from None

    async def drain(self) -> None:
        """Reads and drops what the caller still sends, for a moment (see the module's docstring)."""
        if self._reader is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DRAIN_SECONDS):
                start = self.bytes_read
                while self.bytes_read - start < _DRAIN_BYTES and await self.next() is not None:
                    self._ledger.close()


@dataclass
class Call:
    """One call being served: who makes it (``remote_id``, authenticated by libp2p), its ledger and deadline."""

    name: str
    remote_id: PeerID
    ledger: Ledger | None
    _timeout: asyncio.Timeout | None = None

    def set_deadline(self, seconds: float) -> None:
        """The call must end within ``seconds`` from now (never later than the RPC's own maximum)."""
        when = asyncio.get_running_loop().time() + seconds
        current = self._timeout.when()
        self._timeout.reschedule(when if current is None else min(current, when))


Handler = Callable[[Requests, Call], AsyncIterator[Message]]


class RpcServer:
    """Serves the RPCs of one peer under one set of ``Limits`` and one ``InboundBudget``.

    >>> server = RpcServer(Limits(max_streams=64))
    >>> await server.add(p2p, "swarm.v1.inference", handler, (InferenceRequest, InferenceResponse), 3600)
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self.budget = InboundBudget(limits.inbound_bytes)
        self.open_streams = 0

    async def add(
        self,
        p2p: P2P,
        name: str,
        handler: Handler,
        types: tuple[type[Message], type[Message]],
        max_seconds: float,
        *,
        unary: bool = False,
    ) -> None:
        """Registers RPC ``name``: ``types`` are its request and response messages; the handler must end within
        ``max_seconds``. A stream by default (hivemind's protobuf stream framing, so hivemind clients can call it);
        ``unary``: one message each way, which hivemind carries over its persistent control connection (p2pd caps
        those messages at 4 MiB); the handler must then answer with one message."""
        request_type, response_type = types
        if not unary:

            async def serve(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
                with contextlib.closing(writer):
                    await self._serve_stream(name, handler, types, max_seconds, info, reader, writer)

            await p2p.add_binary_stream_handler(name, serve)
            return

        async def serve_unary(request: Message, context: P2PContext) -> Message:
            call = Call(name, context.remote_id, Ledger(self.budget, self.limits.budget_wait))
            try:
                async with asyncio.timeout(max_seconds) as call._timeout:
                    await call.ledger.take(request.ByteSize())
                    async with contextlib.aclosing(handler(Requests.of(request), call)) as answers:
                        responses = [response async for response in answers]
                if len(responses) != 1:
                    raise ValidationError("the answer is too large for one message: use the stream RPC")
                return responses[0]
            except Exception as e:  # cancellation propagates
                return response_type(error=self._failure(e, call))
            finally:
                call.ledger.close()

        await p2p.add_protobuf_handler(name, serve_unary, request_type)

    async def _serve_stream(self, name, handler, types, max_seconds, info, reader, writer) -> None:
        request_type, response_type = types
        call = Call(name, info.peer_id, None)
        if self.open_streams >= self.limits.max_streams:
            error = BusyError(f"this peer serves {self.open_streams} streams, its limit")
            await _send(response_type(error=self._failure(error, call)), writer)
            return
        self.open_streams += 1
        call.ledger = Ledger(self.budget, self.limits.budget_wait)
        requests = Requests(reader, request_type, self.limits, call.ledger)
        try:
            try:
                async with asyncio.timeout(max_seconds) as call._timeout:
                    # closed here, not left to the garbage collector: its cleanup frees the session's cache
                    async with contextlib.aclosing(handler(requests, call)) as answers:
                        async for response in answers:
                            await _send(response, writer)
                return
            except (ConnectionError, asyncio.IncompleteReadError):
                return  # the caller went away
            except Exception as e:  # cancellation propagates
                error = self._failure(e, call)
            with contextlib.suppress(Exception):
                await _send(response_type(error=error), writer)
                await requests.drain()
        finally:
            call.ledger.close()
            self.open_streams -= 1

    def _failure(self, e: Exception, call: Call) -> swarm_pb2.Error:
        """The typed error that answers ``e``, logged: one line for a refusal, a traceback for a bug."""
        if isinstance(e, TimeoutError) and call._timeout is not None and call._timeout.expired():
            e = DeadlineError("the call ran past its deadline")
        error = rpc.error_message(e)
        if isinstance(e, SwarmError):
            logger.info("Refused %s from %s: %s", call.name, call.remote_id, error.message)
        else:
            logger.error("%s from %s failed on a bug", call.name, call.remote_id, exc_info=e)
        return error


async def _send(message: Message, writer: asyncio.StreamWriter) -> None:
    await P2P.send_protobuf(message, writer)
