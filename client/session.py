"""Inference sessions: hidden states streamed span by span through a chain of peers that keep the KV cache.

Shape legend: B batch, T new tokens, S tokens seen so far including the new ones, D hidden size.

An ``InferenceSession`` plans a route, opens one ``swarm.v1.inference`` stream per hop (a peer that has no room
refuses with ``BusyError``), telling each hop its neighbours: the peer whose pushes it accepts, and the next hop's
session, the only one it pushes to. Then each ``step`` sends the new tokens' hidden states through the chain: to
the first hop, and each peer pushes its output straight to the next (``swarm.v1.push``). The last hop answers with
its output; each pushed-into hop answers with its input, which the session keeps for replay; a hop that could not
push answers instead, and the client relays its output. ``position`` is S after the last step.
Closing the session closes the streams, which frees the peers' caches.

>>> with InferenceSession(runtime, router, model_id, max_length=128) as session:
...     out_BTD = session.step(hidden_BTD, attention_mask_BS, position_ids_BT)
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from swarm_peer.client.health import Retries
from swarm_peer.client.routing import Hop, Router
from swarm_peer.errors import PeerError, SessionError, ValidationError
from swarm_peer.protocols import codec, extras, rpc, swarm_pb2
from swarm_peer.protocols.extras import Extras
from swarm_peer.protocols.runtime import SwarmRuntime

__all__ = ["InferenceSession"]

logger = logging.getLogger(__name__)

_REPLAY_TOKENS = 1024  # batch * tokens per replayed message, well under a peer's max_batch_tokens
# A pushed step that takes this many times longer per token than the session's recent steps (and at least
# _STALL_SECONDS) is relayed hop by hop: a peer that died mid-step is noticed only when it is written to.
_STALL_FACTOR = 10
_STALL_SECONDS = 5.0


@dataclass
class _Answer:
    """A hop's whole answer to one step: its output (None if it pushed it on), the inputs it carried, by the
    first block of their hop, and the session's length S after the step."""

    step_id: int
    out_BTD: torch.Tensor | None
    carried: dict[int, torch.Tensor]
    position: int


class _SpanStream:
    """One open ``swarm.v1.inference`` stream to one hop. Lives on the runtime's event loop."""

    def __init__(self, runtime: SwarmRuntime, model_id: str, hop: Hop, extras_: Extras | None = None):
        self.runtime, self.model_id, self.hop, self.extras = runtime, model_id, hop, extras_
        # whoever knows it can push steps into this session: this peer and the hop before it
        self.session_id = os.urandom(rpc.SESSION_ID_BYTES)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._responses = None
        self._pump: asyncio.Task | None = None

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def open(
        self, max_length: int, batch_size: int, neighbours: swarm_pb2.Neighbours | None = None
    ) -> None:
        """Opens the session; ``neighbours``: who may push into it and where it pushes (None: no pushes)."""
        span = swarm_pb2.Span(model_id=self.model_id, start_block=self.hop.start, end_block=self.hop.end)
        message, tensors = extras.encode(self.extras)
        for i, parts in enumerate(codec.pack(tensors) if tensors else [[]]):
            if i == 0:
                opening = swarm_pb2.InferenceOpen(
                    span=span,
                    max_length=max_length,
                    batch_size=batch_size,
                    extras=message,
                    tensors=parts,
                    session_id=self.session_id,
                    neighbours=neighbours,
                )
                self._outbox.put_nowait(swarm_pb2.InferenceRequest(open=opening))
            else:
                self._outbox.put_nowait(
                    swarm_pb2.InferenceRequest(parts=swarm_pb2.TensorParts(tensors=parts))
                )
        try:
            self._responses = await self.runtime.p2p.iterate_protobuf_handler(
                self.hop.peer_id, rpc.INFERENCE, self._requests(), swarm_pb2.InferenceResponse
            )
            await self._read()
        except Exception as e:
            raise rpc.remote_error(e, self.hop.peer_id) from None

    @cached_property
    def push_hop(self) -> swarm_pb2.PushHop:
        """Where the previous hop pushes this session's steps (made once: it goes into every step's route)."""
        return swarm_pb2.PushHop(peer_id=self.hop.peer_id.to_base58(), session_id=self.session_id)

    def send(self, step_id: int, tensors: list[torch.Tensor], push: bool = False) -> None:
        """Sends a step's tensors (the hidden states in ``ClientSettings.compression``, which the peers' outputs then
        take); with ``push``, the peer pushes its output on to the session's next hop."""
        wire = codec.WIRES[self.runtime.settings.compression]
        for i, parts in enumerate(codec.pack([wire.cast(t) for t in tensors], wire.compression)):
            if i == 0:
                step = swarm_pb2.InferenceStep(step_id=step_id, tensors=parts, push=push)
                request = swarm_pb2.InferenceRequest(step=step)
            else:
                request = swarm_pb2.InferenceRequest(parts=swarm_pb2.TensorParts(tensors=parts))
            self._outbox.put_nowait(request)

    def relink(self, neighbours: swarm_pb2.Neighbours) -> None:
        """Tells the peer the session's new neighbours (a hop next to it was replaced)."""
        self._outbox.put_nowait(swarm_pb2.InferenceRequest(neighbours=neighbours))

    async def receive(self) -> _Answer:
        """The peer's next whole answer (a step's, possibly over several messages)."""
        try:
            first = response = await self._read()
            blocks = list(first.carried_blocks)
            assembler = codec.TensorAssembler(expected=(not first.pushed) + len(blocks))
            with rpc.answer_from(self.hop.peer_id):
                assembler.feed(first.tensors)
            while not assembler.complete:
                response = await self._read()
                if response.step_id != first.step_id:
                    raise PeerError(
                        f"peer {self.hop.peer_id} answered step {response.step_id} within step {first.step_id}"
                    )
                with rpc.answer_from(self.hop.peer_id):
                    assembler.feed(response.tensors)
            with rpc.answer_from(self.hop.peer_id):
                tensors = assembler.tensors()
        except Exception as e:
            raise rpc.remote_error(e, self.hop.peer_id) from None
        out_BTD = None if first.pushed else tensors.pop(0)
        return _Answer(first.step_id, out_BTD, dict(zip(blocks, tensors, strict=True)), first.position)

    async def step(self, step_id: int, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Sends a step with no route and waits for its output (before ``attach``: it reads the stream itself)."""
        self.send(step_id, tensors)
        answer = await self.receive()
        if answer.step_id != step_id or answer.out_BTD is None:
            raise PeerError(f"peer {self.hop.peer_id} answered step {answer.step_id}, expected {step_id}")
        return answer.out_BTD

    async def attach(self, events: asyncio.Queue) -> None:
        """From now on, every answer goes into ``events`` as ``(self, answer)``, and then ``(self, error)`` once
        the stream fails or ends. One queue for the session: answers come from whichever hop ends the chain."""

        async def pump():
            try:
                while True:
                    events.put_nowait((self, await self.receive()))
            except Exception as e:
                events.put_nowait((self, e))

        self._pump = asyncio.ensure_future(pump())  # kept here: the loop holds its tasks only weakly

    async def _read(self) -> swarm_pb2.InferenceResponse:
        try:
            response = await anext(self._responses)
        except StopAsyncIteration:
            raise PeerError(f"peer {self.hop.peer_id} closed the session") from None
        rpc.check(response, self.hop.peer_id)
        return response

    def close(self) -> None:
        self._outbox.put_nowait(None)


@dataclass
class _Progress:
    """How far one attempt at a step got: the hops whose input for it the session holds, and which hop failed."""

    start: int  # the hop the attempt sends the step to
    hop_by_hop: bool = False  # relay every hop (no routes), to find a hop that stalls
    known: set[int] = field(default_factory=set)
    waiting: int = 0  # the hop the step was sent to last
    failed: int | None = None  # the hop whose stream failed

    def resume(self) -> int:
        """The furthest hop whose input, and that of every hop before it from ``start``, the session holds."""
        index = self.start
        while index + 1 in self.known:
            index += 1
        return index


class InferenceSession:
    """A multi-hop inference session over blocks [start, end) of one model, with failover.

    The session keeps, for every block boundary of its route, the hidden states it sent there at every step
    (``_history``). When a hop fails (its peer died, refused, timed out or dropped the session), its peer is
    banned, its blocks [a, b) are planned again (possibly over several peers), the new peers' caches are rebuilt
    by replaying the history of boundary ``a`` (the replacement's outputs fill the history of the boundaries
    inside [a, b)), and the step goes on. The caller sees no error and the same outputs.
    """

    def __init__(
        self,
        runtime: SwarmRuntime,
        router: Router,
        model_id: str,
        *,
        max_length: int,
        batch_size: int = 1,
        start: int = 0,
        end: int | None = None,
        extras_for: Callable[[int, int], Extras] | None = None,
    ):
        """``extras_for(a, b)``: what the hop of blocks [a, b) applies besides its weights (adapter, LoRA, deep
        prompts); sent when the hop's stream opens."""
        if max_length < 1 or batch_size < 1:
            raise ValidationError(
                f"max_length and batch_size must be positive, got {max_length}, {batch_size}"
            )
        self.runtime, self.router, self.model_id = runtime, router, model_id
        self.max_length, self.batch_size = max_length, batch_size
        self.push = runtime.settings.push
        self.start, self.end = start, router.num_blocks if end is None else end
        self.position = 0
        self.extras_for = extras_for
        self.prefix_tokens = (
            0  # prompt-tuning tokens the client put before the sequence (counted in position)
        )
        self.token_ids: torch.Tensor | None = (
            None  # tokens processed so far, kept by generate() for prefix checks
        )
        self._streams: list[_SpanStream] = []
        self._history: dict[int, list[torch.Tensor]] = {}  # block boundary -> hidden_BTD sent there, per step
        self._steps: list[
            tuple[torch.Tensor, torch.Tensor]
        ] = []  # per step: attention_mask_BS, position_ids_BT
        self._step_id = 0
        self._events: asyncio.Queue = asyncio.Queue()  # (stream, _Answer or the error that ended it)
        self._token_seconds: deque[float] = deque(maxlen=16)  # of the recent steps
        self._closed = False
        self.relays = 0  # hops the client relayed a step to because the hop before could not push it
        self.rolled_back = 0  # tokens dropped by ``rollback`` (speculative decoding's refused proposals)

    def __enter__(self) -> InferenceSession:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def steps(self) -> int:
        """Steps taken so far (each ``step`` call: the prompt, then one per generated token)."""
        return len(self._steps)

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self._streams]

    def open(self) -> None:
        try:
            self._streams = self._open_route(self.start, self.end)
        except BaseException:
            self.close()
            raise

    def _open_route(
        self, start: int, end: int, before: _SpanStream | None = None, after: _SpanStream | None = None
    ) -> list[_SpanStream]:
        """Opens streams on a route for [start, end), re-planning around peers that fail or refuse, between the
        open hops ``before`` and ``after`` (if any)."""
        retries = Retries(self.router.health, timeout=self.runtime.settings.retry_timeout)
        while True:
            route = retries.plan(
                self.router.inference_route, start, end, cache_tokens=self.batch_size * self.max_length
            )
            streams = [
                _SpanStream(
                    self.runtime,
                    self.model_id,
                    hop,
                    self.extras_for(hop.start, hop.end) if self.extras_for else None,
                )
                for hop in route
            ]
            chain = [before, *streams, after]
            failed = streams[0]  # the stream to blame for an error below
            try:
                neighbours = [self._neighbours(chain[i - 1], chain[i + 1]) for i in range(1, len(chain) - 1)]
                results = self.runtime.run(self._open_all(streams, neighbours))
                for stream, result in zip(streams, results, strict=True):
                    if isinstance(result, BaseException):
                        failed = stream
                        raise result
                for stream in streams:
                    failed = stream
                    self._replay(stream)
                    self.runtime.run(stream.attach(self._events))
            except Exception as e:
                for stream in streams:
                    self.runtime.loop.call_soon_threadsafe(stream.close)
                retries.failed(failed.hop.peer_id, e)
                continue
            return streams

    async def _open_all(self, streams: list[_SpanStream], neighbours: list) -> list:
        """Opens every stream at once (one round trip each, which a long route would pay in turn); each one's
        exception, or None."""
        opening = [
            stream.open(self.max_length, self.batch_size, hop_neighbours)
            for stream, hop_neighbours in zip(streams, neighbours, strict=True)
        ]
        return await asyncio.gather(*opening, return_exceptions=True)

    def _neighbours(
        self, previous: _SpanStream | None, following: _SpanStream | None
    ) -> swarm_pb2.Neighbours:
        """What a hop between ``previous`` and ``following`` is told: whose pushes to accept, where to push."""
        neighbours = swarm_pb2.Neighbours()
        if self.push:  # else no pushes either way: the client relays every hop
            if previous is not None:
                neighbours.previous_peer_id = previous.hop.peer_id.to_base58()
            if following is not None:
                neighbours.next.CopyFrom(following.push_hop)
        return neighbours

    def _replace(self, index: int) -> None:
        """Replaces the failed hop ``index`` by a new route for its blocks, and tells the hops around it."""
        failed = self._streams[index]
        self.runtime.loop.call_soon_threadsafe(failed.close)
        before = self._streams[index - 1] if index else None
        after = self._streams[index + 1] if index + 1 < len(self._streams) else None
        new = self._open_route(failed.hop.start, failed.hop.end, before, after)
        self._streams[index : index + 1] = new
        for i in (index - 1, index + len(new)):
            if 0 <= i < len(self._streams):
                previous = self._streams[i - 1] if i else None
                following = self._streams[i + 1] if i + 1 < len(self._streams) else None
                self.runtime.loop.call_soon_threadsafe(
                    self._streams[i].relink, self._neighbours(previous, following)
                )

    def step(self, hidden_BTD: torch.Tensor, attention_mask_BS: torch.Tensor, position_ids_BT: torch.Tensor):
        """Sends T new tokens through every hop; returns the last block's hidden states (B, T, D)."""
        if self._closed or not self._streams:
            raise SessionError("this inference session is not open")
        B, T, _ = hidden_BTD.shape
        if B != self.batch_size:
            raise ValidationError(f"this session was opened for batch size {self.batch_size}, got {B}")
        if self.position + T > self.max_length:
            raise ValidationError(
                f"{T} more tokens at position {self.position} exceed the session's max_length {self.max_length}"
            )
        self._steps.append((attention_mask_BS, position_ids_BT.expand(B, T)))
        self._step_id += 1
        t0 = time.perf_counter()
        try:
            x = self._run(hidden_BTD.detach(), self._step_id)
            self._token_seconds.append((time.perf_counter() - t0) / T)
        except BaseException:
            self._steps.pop()
            for history in self._history.values():
                del history[len(self._steps) :]
            raise
        self.position += T
        return x.to(hidden_BTD.dtype)

    def rollback(self, position: int) -> None:
        """Forgets the tokens from ``position`` on (speculative decoding keeps the accepted prefix of the tokens it
        proposed): the next step goes on from ``position``, and each hop drops the rest from its cache when that
        step's mask says it is shorter. What the session keeps for replay is cut to match."""
        if not self.prefix_tokens <= position <= self.position:
            raise ValidationError(
                f"a session at position {self.position} rolls back to {self.prefix_tokens}..{self.position}, "
                f"not {position}"
            )
        kept = 0
        for i, (mask_BS, positions_BT) in enumerate(self._steps):
            T = positions_BT.shape[1]
            if kept + T <= position:
                kept += T
                continue
            keep = position - kept  # of this step's tokens
            del self._steps[i + (keep > 0) :]
            if keep:
                self._steps[i] = (mask_BS[:, :position], positions_BT[:, :keep])
            for history in self._history.values():
                del history[i + (keep > 0) :]
                if keep and len(history) > i:
                    history[i] = history[i][:, :keep]
            break
        self.rolled_back += self.position - position
        self.position = position

    def _run(self, x_BTD: torch.Tensor, step_id: int) -> torch.Tensor:
        """Runs this step through the chain, failing over as often as needed. The step keeps its id through
        retries: a peer that already computed it sends on the output it saved, so a retry starts from the last hop
        whose input the session holds (``_Progress.resume``) and only the replacement computes anew."""
        retries = Retries(self.router.health, timeout=self.runtime.settings.retry_timeout)
        progress = _Progress(start=0)
        self._remember(self._streams[0].hop.start, x_BTD)
        while True:
            try:
                # One trip to the runtime's loop for the whole chain: a crossing between threads costs about as
                # much as a hop's transport.
                timeout = None if progress.hop_by_hop else self._stall_timeout(x_BTD.shape[1])
                return self.runtime.run(self._chain(progress, step_id), timeout=timeout)
            except Exception as e:
                if isinstance(e, TimeoutError) and progress.failed is None and not progress.hop_by_hop:
                    # some hop past the known inputs stalled or died, but which one the pushes do not tell: relay
                    # the step hop by hop (those that computed it answer at once) up to the one that does not
                    logger.info(
                        "Step %d stalled; relaying it hop by hop to find the peer that holds it", step_id
                    )
                    progress = _Progress(start=progress.resume(), hop_by_hop=True)
                    continue
                index = progress.waiting if progress.failed is None else progress.failed
                failed = self._streams[index]
                retries.failed(failed.hop.peer_id, e)
                logger.info(
                    "Blocks %d:%d failed over from peer %s",
                    failed.hop.start,
                    failed.hop.end,
                    failed.hop.peer_id,
                )
                self._replace(index)
                progress = _Progress(start=min(index, progress.resume()), hop_by_hop=progress.hop_by_hop)

    def _stall_timeout(self, tokens: int) -> float:
        """Seconds after which a pushed step of ``tokens`` tokens is taken for stalled (at most the request
        timeout). Too short only costs a relay of that step: a slow hop still answers the copy it gets."""
        limit = self.runtime.settings.request_timeout
        if not self._token_seconds:
            return limit
        expected = tokens * statistics.median(self._token_seconds)
        return min(limit, max(_STALL_SECONDS, _STALL_FACTOR * expected))

    async def _chain(self, progress: _Progress, step_id: int) -> torch.Tensor:
        """Sends the step to hop ``progress.start`` with the rest of the route and waits for the last hop's output,
        relaying whatever a hop could not push, until the inputs of every hop are known (for replay)."""
        streams = self._streams
        index_of = {id(stream): i for i, stream in enumerate(streams)}
        hop_at = {stream.hop.start: i for i, stream in enumerate(streams)}  # a hop by its first block
        shape = self._history[streams[progress.start].hop.start][-1].shape
        self._send(progress, progress.start, step_id)
        out_BTD = None
        while out_BTD is None or not progress.known.issuperset(range(progress.start, len(streams))):
            stream, answer = await self._events.get()
            index = index_of.get(id(stream))
            if index is None:
                continue  # a stream already replaced
            if isinstance(answer, BaseException):
                progress.failed = index
                raise answer
            if answer.step_id != step_id:
                continue  # a second answer to an earlier step (its copy went through twice)
            if any(x.shape != shape for x in (*answer.carried.values(), answer.out_BTD) if x is not None) or (
                answer.position != self.position + shape[1]
            ):
                progress.failed = index
                raise PeerError(f"peer {stream.hop.peer_id} answered step {step_id} with malformed tensors")
            for block, x_BTD in answer.carried.items():
                if block in hop_at:  # else not a hop of this route (a late answer from before it changed)
                    self._remember(block, x_BTD)
                    progress.known.add(hop_at[block])
            if answer.out_BTD is None:
                continue
            if index == len(streams) - 1:
                out_BTD = answer.out_BTD
            elif index + 1 not in progress.known:  # the hop could not push: relay its output
                self._remember(streams[index + 1].hop.start, answer.out_BTD)
                self.relays += 1
                self._send(progress, index + 1, step_id)
        for stream in streams:
            self.router.health.forgive(stream.hop.peer_id)
        return out_BTD

    def _send(self, progress: _Progress, index: int, step_id: int) -> None:
        """Sends the step's input of hop ``index`` (in ``_history``) to it, with the route after it."""
        progress.known.add(index)
        progress.waiting = index
        mask_BS, positions_BT = self._steps[-1]
        stream = self._streams[index]
        x_BTD = self._history[stream.hop.start][-1]
        stream.send(step_id, [x_BTD, mask_BS, positions_BT], push=self.push and not progress.hop_by_hop)

    def _remember(self, block: int, x_BTD: torch.Tensor) -> None:
        """Records the current step's input of ``block`` (replacing it when the step is retried)."""
        history = self._history.setdefault(block, [])
        del history[len(self._steps) - 1 :]
        history.append(x_BTD)

    def _replay(self, stream: _SpanStream) -> None:
        """Rebuilds a new stream's cache from the inputs its first block got in the finished steps."""
        done = len(self._steps) - 1 if self._steps else 0  # the current step (if any) is sent by _chain
        if done == 0:
            return
        past = self._history[stream.hop.start][:done]
        lengths = [x.shape[1] for x in past]
        hidden_BTD = torch.cat(past, dim=1)
        positions_BT = torch.cat([positions for _, positions in self._steps[:done]], dim=1)
        mask_BS = self._steps[done - 1][0]
        chunk = max(1, _REPLAY_TOKENS // self.batch_size)
        outputs = []
        for t in range(0, hidden_BTD.shape[1], chunk):
            u = min(t + chunk, hidden_BTD.shape[1])
            self._step_id += 1
            outputs.append(
                self.runtime.run(
                    stream.step(self._step_id, [hidden_BTD[:, t:u], mask_BS[:, :u], positions_BT[:, t:u]])
                )
            )
        if stream.hop.end < self.end:  # the next hop's history, as this peer computes it
            self._history[stream.hop.end] = list(torch.cat(outputs, dim=1).split(lengths, dim=1))
        logger.info("Replayed %d tokens to peer %s", hidden_BTD.shape[1], stream.hop.peer_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in self._streams:
            self.runtime.loop.call_soon_threadsafe(stream.close)
