"""Inference sessions: hidden states streamed span by span through a chain of peers that keep the KV cache.

Shape legend: B batch, T new tokens, S tokens seen so far including the new ones, D hidden size.

An ``InferenceSession`` plans a route, opens one ``swarm.v1.inference`` stream per hop (each peer reserves cache
for ``batch_size * max_length`` tokens, or refuses with ``BusyError``), and then each ``step`` sends the new
tokens' hidden states through the chain. ``position`` is S after the last step. Closing the session closes the
streams, which frees the peers' caches.

>>> with InferenceSession(runtime, router, model_id, max_length=128) as session:
...     out_BTD = session.step(hidden_BTD, attention_mask_BS, position_ids_BT)
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from swarm_peer.client.routing import Hop, Router
from swarm_peer.client.runtime import SwarmRuntime
from swarm_peer.errors import SessionError, SwarmError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2

__all__ = ["InferenceSession"]

logger = logging.getLogger(__name__)


class _SpanStream:
    """One open ``swarm.v1.inference`` stream to one hop. Lives on the runtime's event loop."""

    def __init__(self, runtime: SwarmRuntime, model_id: str, hop: Hop):
        self.runtime, self.model_id, self.hop = runtime, model_id, hop
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._responses = None

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def open(self, max_length: int, batch_size: int) -> None:
        span = swarm_pb2.Span(model_id=self.model_id, start_block=self.hop.start, end_block=self.hop.end)
        self._outbox.put_nowait(
            swarm_pb2.InferenceRequest(
                open=swarm_pb2.InferenceOpen(span=span, max_length=max_length, batch_size=batch_size)
            )
        )
        try:
            self._responses = await self.runtime.p2p.iterate_protobuf_handler(
                self.hop.peer_id, rpc.INFERENCE, self._requests(), swarm_pb2.InferenceResponse
            )
            await self._read()
        except SwarmError:
            raise
        except Exception as e:
            raise rpc.remote_error(e, str(self.hop.peer_id)) from None

    async def step(self, step_id: int, tensors: list[torch.Tensor]) -> torch.Tensor:
        for i, parts in enumerate(codec.pack(tensors)):
            if i == 0:
                request = swarm_pb2.InferenceRequest(
                    step=swarm_pb2.InferenceStep(step_id=step_id, tensors=parts)
                )
            else:
                request = swarm_pb2.InferenceRequest(parts=swarm_pb2.TensorParts(tensors=parts))
            self._outbox.put_nowait(request)
        try:
            assembler = codec.TensorAssembler(expected=1)
            while not assembler.complete:
                response = await self._read()
                if response.step_id != step_id:
                    raise SessionError(f"peer answered step {response.step_id}, expected {step_id}")
                assembler.feed(response.tensors)
            return assembler.tensors()[0]
        except SwarmError:
            raise
        except Exception as e:
            raise rpc.remote_error(e, str(self.hop.peer_id)) from None

    async def _read(self) -> swarm_pb2.InferenceResponse:
        try:
            return await anext(self._responses)
        except StopAsyncIteration:
            raise SessionError(f"peer {self.hop.peer_id} closed the session") from None

    def close(self) -> None:
        self._outbox.put_nowait(None)


class InferenceSession:
    """A multi-hop inference session over blocks [start, end) of one model."""

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
    ):
        if max_length < 1 or batch_size < 1:
            raise ValidationError(
                f"max_length and batch_size must be positive, got {max_length}, {batch_size}"
            )
        self.runtime, self.router, self.model_id = runtime, router, model_id
        self.max_length, self.batch_size = max_length, batch_size
        self.start, self.end = start, router.num_blocks if end is None else end
        self.position = 0
        self.token_ids: torch.Tensor | None = (
            None  # tokens processed so far, kept by generate() for prefix checks
        )
        self._streams: list[_SpanStream] = []
        self._step_id = 0
        self._closed = False

    def __enter__(self) -> InferenceSession:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        route = self.router.plan(self.start, self.end)
        try:
            for hop in route:
                stream = _SpanStream(self.runtime, self.model_id, hop)
                self._streams.append(stream)
                t0 = time.perf_counter()
                self.runtime.run(stream.open(self.max_length, self.batch_size))
                self.router.record_latency(hop.peer_id, time.perf_counter() - t0)
        except BaseException:
            self.close()
            raise

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
        self._step_id += 1
        x = hidden_BTD.detach()
        for stream in self._streams:
            x = self.runtime.run(stream.step(self._step_id, [x, attention_mask_BS, position_ids_BT]))
        self.position += T
        return x.to(hidden_BTD.dtype)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in self._streams:
            self.runtime.loop.call_soon_threadsafe(stream.close)
