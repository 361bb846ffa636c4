"""The peer's RPC handlers: validate every request, then compute on the one compute thread.

``Handlers`` is what every kind of hosting peer serves through (one RPC server and its limits, one compute thread,
the info RPC); ``BlockHandlers`` serves a span of blocks, ``peer.expert_handlers.ExpertHandlers`` a set of experts.

Shape legend: B batch, T new tokens, S tokens seen so far including the new ones, D hidden size.

- ``swarm.v1.info``: the peer's ``ServerInfo`` as JSON.
- ``swarm.v1.forward``: hidden_BTD, attention_mask_BS (S == T), position_ids_BT -> hidden_BTD.
- ``swarm.v1.backward``: the same plus grad_outputs_BTD -> grad_inputs_BTD (gradient w.r.t. the inputs), then the
  gradients w.r.t. the request's deep prompts and LoRA weights.
- ``swarm.v1.inference``: a bidirectional stream that owns one session: open (span, max_length, batch_size,
  neighbours), then steps (hidden_BTD, attention_mask_BS, position_ids_BT); the session's KV cache lives inside the
  stream, so no other client can reach it, and closing the stream (or idling past ``--session-timeout``, or
  lasting past ``--max-session-seconds``) frees it. The cache is charged for the tokens it holds (peer.cache). A
  step may ask the peer to push its output to the session's next hop itself (peer.push).
- ``swarm.v1.push``: a step for an open session, from the hop the client named as the one before it (peer.push).

Any of these may carry ``Extras`` (protocols.extras): a served adapter's name, deep prompts, the client's own LoRA
weights. They are applied by hooks (peer.adapters) during that request's compute only; a client's LoRA is kept
by (client peer id, digest) in a bounded cache, so later requests name it by digest and no client can use another's.

Every request is checked before compute: model and blocks served here, dtype, shapes, lengths, mask values and
positions; each tensor's declared dtype and shape at its first part, before the rest is read (``_declared``).
Frames, bytes in flight, streams and deadlines are bounded by ``protocols.serving``, which serves every RPC here.
A bad request gets a typed error reply (protocols.rpc) and the peer keeps serving everyone else.
What every RPC serves, and every refusal by its kind, is counted in ``metrics`` (peer.metrics; ``--metrics-port``).
Compute runs on a single worker thread, off the event loop, so the loop keeps answering while blocks run; only a
session's short single-token steps run on the loop itself while that thread is idle (``_compute``), which saves
two thread hand-offs per hop of every generated token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.p2p import P2P, P2PContext

from swarm_peer.errors import DeadlineError, MissingBlocksError, MissingWeightsError, ValidationError
from swarm_peer.peer import adapters, push
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.cache import CacheBudget, SessionCharge
from swarm_peer.peer.compute import Batch, ComputeQueue, Priority
from swarm_peer.peer.graphs import Graph, GraphCache, SavedTensors
from swarm_peer.peer.metrics import PeerMetrics
from swarm_peer.peer.stage import TrainableStage
from swarm_peer.protocols import codec, extras, rpc, stage_state, swarm_pb2
from swarm_peer.protocols.extras import Lora
from swarm_peer.protocols.serving import Call, Ledger, Limits, Requests, RpcServer
from swarm_peer.settings import PeerSettings
from swarm_peer.threads import compute_threads

__all__ = ["BlockHandlers", "Handlers", "check_float"]

logger = logging.getLogger(__name__)

# A session's single-token step runs on the event loop's thread (while the compute thread is idle) when its last
# one took less than this: handing a step to the compute thread and back costs about as much as a hop's transport.
# Longer steps go to the compute thread, so the loop keeps answering while they run.
_INLINE_SECONDS = 0.05
# tokens of a prompt computed in one go while other sessions are open (``BlockHandlers._prefill``)
_PREFILL_CHUNK = 128
_INLINE_CHECK_VALUES = 1 << 16  # a request with more hidden values than this is checked off the event loop


class Handlers:
    """What every hosting peer's handlers share (blocks here, experts in ``peer.expert_handlers``): one
    ``RpcServer`` (limits, inbound budget), one compute thread (``_compute``), the info RPC."""

    def __init__(self, settings: PeerSettings, info_json: Callable[[], bytes]):
        self.settings, self.info_json = settings, info_json
        self.server = RpcServer(
            Limits(max_streams=settings.max_streams, inbound_bytes=int(settings.max_inbound_mb * 2**20))
        )
        self.p2p: P2P | None = None
        self.decoding: collections.Counter = collections.Counter()  # batch key -> sessions decoding with it
        self.compute = ComputeQueue(
            batch_wait=settings.batch_wait_ms / 1000, batch_goal=self.decoding.__getitem__
        )
        self.graphs = GraphCache(
            int(settings.graph_cache_mb * 2**20)
        )  # training forwards' graphs, for backward
        self.in_flight = 0
        self.metrics = PeerMetrics()
        self.metrics.gauge(
            "compute_queue_length",
            "calls handed to the compute thread and not finished",
            lambda: self.compute.submitted - self.compute.finished,
        )
        self.threads = (
            torch.get_num_threads()
        )  # what the compute thread computes on (``Hosting._follow_share``)
        self.metrics.gauge("compute_threads", "torch threads the peer computes on", lambda: self.threads)
        self.metrics.gauge(
            "batched_steps",
            "inference steps computed in a batch with other sessions'",
            lambda: self.compute.batched,
        )
        self.metrics.gauge(
            "step_batches", "batched forwards of several sessions' steps", lambda: self.compute.batches
        )

    @property
    def busy(self) -> bool:
        """Whether work is in flight (a leaving peer waits for it, up to its grace period)."""
        return self.in_flight > 0

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p
        await p2p.add_protobuf_handler(rpc.INFO, self.rpc_info, swarm_pb2.InfoRequest)

    async def _emulated_latency(self) -> None:
        if self.settings.added_latency:
            await asyncio.sleep(self.settings.added_latency)

    async def rpc_info(self, request: swarm_pb2.InfoRequest, context: P2PContext) -> swarm_pb2.InfoResponse:
        await self._emulated_latency()
        return swarm_pb2.InfoResponse(info_json=self.info_json())

    @staticmethod
    async def _first(requests: Requests, call: Call):
        """The first message of a stateless call (its deadline, ``timeout_ms``, taken into account)."""
        first = await requests.next()
        if first is None:
            raise ValidationError("empty request stream")
        if first.timeout_ms:
            call.set_deadline(first.timeout_ms / 1000)
        return first

    @staticmethod
    async def _tensors(requests: Requests, first, expected: int, check) -> tuple[list[torch.Tensor], int]:
        """The ``expected`` tensors of a stateless call: those of ``first``, then of the messages after it, each
        checked at its first part (``codec.TensorAssembler``); and the codec of the first, to answer in."""
        assembler = codec.TensorAssembler(expected=expected, check=check)
        assembler.feed(first.tensors)
        while not assembler.complete:
            more = await requests.next()
            if more is None:
                raise ValidationError("the request stream ended before its tensors were complete")
            assembler.feed(more.tensors)
        return assembler.tensors(), assembler.compression

    async def _compute(self, fn, *args, inline: bool = False, step: bool = False, batch: Batch | None = None):
        """``fn(*args)`` on the compute thread (``peer.compute``: a session's ``step`` before other work, with the
        steps of its ``batch`` key that are there); with ``inline``, on this (the event loop's) thread when the
        compute thread is idle. Either way no two computations overlap: adapter hooks and the blocks' renumbering
        stay private to one request. The loop waits meanwhile, so only short steps are run inline."""
        if inline and self.compute.idle:
            return fn(*args)
        self.in_flight += 1
        try:
            priority = Priority.INFERENCE if step else Priority.OTHER
            return await asyncio.wrap_future(self.compute.submit(priority, fn, *args, batch=batch))
        finally:
            self.in_flight -= 1

    def shutdown(self) -> None:
        self.compute.shutdown()


class BlockHandlers(Handlers):
    """Serves one ``BlockSpan`` of model ``model_id`` over hivemind P2P."""

    def __init__(
        self,
        span: BlockSpan,
        model_id: str,
        settings: PeerSettings,
        info_json: Callable[[], bytes],
        *,
        decode_threads: int | None = None,
        stage: TrainableStage | None = None,
    ):
        """``decode_threads``: torch threads for single-token inference steps (``throughput.decode_threads``);
        None leaves torch's setting. ``stage``: the span trained as a stage of a SWARM run (``peer.stage``)."""
        super().__init__(settings, info_json)
        self.span, self.model_id, self.stage = span, model_id, stage
        self.compression = (
            codec.WIRES[settings.train.compression].compression if settings.train else codec.NONE
        )
        self.decode_threads = decode_threads
        self.budget = CacheBudget(int(settings.cache_mb * 2**20), settings.client_cache_share)
        self.loras = adapters.LoraCache(int(settings.lora_cache_mb * 2**20))
        self.inboxes = push.Inboxes()
        self.open_sessions = 0
        self._handover_at = 0.0  # after a move, sessions on the old span are handed back from this time on
        budget, gauge = self.budget, self.metrics.gauge
        gauge("inference_sessions", "inference sessions open", lambda: self.open_sessions)
        gauge("kv_cache_bytes_used", "KV-cache bytes held by sessions", lambda: budget.used)
        gauge("kv_cache_bytes_total", "KV-cache budget in bytes", lambda: budget.max_bytes)
        gauge(
            "kv_cache_tokens_used", "KV-cache tokens held by sessions (batch x length)", lambda: budget.tokens
        )
        gauge(
            "kv_cache_tokens_total",
            "KV-cache tokens the budget holds over the whole span",
            self._cache_tokens,
        )

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.open_sessions > 0

    def _cache_tokens(self) -> int:
        return self.budget.max_bytes // self.span.cache_bytes_per_token(self.span.start, self.span.end)

    async def register(self, p2p: P2P) -> None:
        await super().register(p2p)
        server, settings, timed = self.server, self.settings, self.metrics.timed
        stateless = swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse
        for name, handler in ((rpc.FORWARD, self.rpc_forward), (rpc.BACKWARD, self.rpc_backward)):
            handler = timed(name.rsplit(".", 1)[-1], handler)  # "forward", "backward"
            await server.add(p2p, name, handler, stateless, settings.max_request_seconds, unary=True)
            await server.add(p2p, rpc.streamed(name), handler, stateless, settings.max_request_seconds)
        if self.stage is not None:
            state = swarm_pb2.StateRequest, swarm_pb2.StateResponse
            handler = timed("stage_state", self.rpc_stage_state)
            await server.add(p2p, rpc.STAGE_STATE, handler, state, settings.max_request_seconds)
        pushes = swarm_pb2.InferencePush, swarm_pb2.PushResponse
        await server.add(p2p, rpc.PUSH, timed(None, self.rpc_push), pushes, settings.max_session_seconds)
        sessions = swarm_pb2.InferenceRequest, swarm_pb2.InferenceResponse
        handler = timed(None, self.rpc_inference)  # its steps are counted one by one (``_session``)
        await server.add(p2p, rpc.INFERENCE, handler, sessions, settings.max_session_seconds)

    def switch(self, span: BlockSpan, drain_seconds: float) -> None:
        """Serves ``span`` from now on. Sessions open on the old span go on for ``drain_seconds``; after that, their
        next step is refused with a ``SessionError``, which hands them back to their clients (they fail over)."""
        # the handover time first: a session that sees the new span must never see the old handover time
        self._handover_at = time.monotonic() + drain_seconds
        self.span = span

    def rpc_forward(self, requests: Requests, call: Call):
        return self._stateless(requests, call, backward=False)

    def rpc_backward(self, requests: Requests, call: Call):
        return self._stateless(requests, call, backward=True)

    def rpc_push(self, requests: Requests, call: Call):
        return push.serve_pushes(self.inboxes, requests, call, self.settings.session_timeout)

    async def _stateless(self, requests: Requests, call: Call, backward: bool):
        first = await self._first(requests, call)
        span, a, b = self._check_span(first.span)
        await self._emulated_latency()
        if self.stage is not None:
            async for response in self._stage_call(requests, call, first, backward):
                yield response
            return
        message = first.extras if first.HasField("extras") else None
        own = 4 if backward else 3
        check = self._declared(own, max_mask_tokens=self.settings.max_batch_tokens)
        tensors, compression = await self._tensors(requests, first, own + extras.tensor_count(message), check)
        hidden_BTD, mask_BS, positions_BT = await self._checked(tensors[:3], past=0, batch_size=None)
        B, T, _ = hidden_BTD.shape
        applied = await self._extras(span, a, b, message, tensors[own:], call, B, max_prompt_tokens=T)
        key = (str(call.remote_id), first.graph_id) if first.graph_id else None
        inputs = (hidden_BTD, mask_BS, positions_BT)
        self.metrics.tokens["backward" if backward else "forward"].inc(B * T)
        if backward:
            grad_BTD = check_float("grad_outputs", tensors[3], hidden_BTD.shape)
            results = await self._compute(self._backward, span, inputs, grad_BTD, a, b, applied, key)
        else:
            keep = key is not None and self.graphs.max_bytes > 0
            results = [await self._compute(self._forward, span, inputs, a, b, applied, key if keep else None)]
        call.ledger.close()  # the request's bytes are spent; the answer is ours
        # the hidden states' gradient (or output) in the codec of the hidden states sent; the extras' as they are
        for parts in codec.pack(results, compression, compressed=1):
            response = swarm_pb2.ForwardResponse(tensors=parts)
            self.metrics.sent["client"].inc(response.ByteSize())
            yield response

    async def _stage_call(self, requests: Requests, call: Call, first, backward: bool):
        """A forward or backward of the training stage: its whole span, no extras; a backward accumulates the
        blocks' gradients (``peer.stage``). Answers in the stage's compression (``--compression``)."""
        span = self.span
        if (first.span.start_block, first.span.end_block) != (span.start, span.end):
            raise ValidationError(f"a training stage is called for its whole span {span.start}:{span.end}")
        if first.HasField("extras"):
            raise ValidationError("a training stage takes no adapters, prompts or LoRA weights")
        own = 4 if backward else 3
        tensors, _ = await self._tensors(
            requests, first, own, self._declared(own, self.settings.max_batch_tokens)
        )
        hidden_BTD, mask_BS, positions_BT = await self._checked(tensors[:3], past=0, batch_size=None)
        inputs = (hidden_BTD.float(), mask_BS, positions_BT)
        key = (str(call.remote_id), first.graph_id) if first.graph_id else None
        self.metrics.tokens["backward" if backward else "forward"].inc(math.prod(hidden_BTD.shape[:2]))
        if backward:
            grad_BTD = check_float("grad_outputs", tensors[3], hidden_BTD.shape).float()
            result = await self._compute(self._stage_backward, inputs, grad_BTD, key)
        else:
            result = await self._compute(self._stage_forward, inputs, key)
        call.ledger.close()
        for parts in codec.pack([result.to(hidden_BTD.dtype)], compression=self.compression):
            yield swarm_pb2.ForwardResponse(tensors=parts)

    def _stage_forward(self, inputs, key=None) -> torch.Tensor:
        if key is None or self.graphs.max_bytes == 0:
            return self.stage.forward(*inputs)
        graph = self.stage.graph(*inputs)
        self.graphs.put(key, graph)
        return graph.outputs.detach()

    def _stage_backward(self, inputs, grad_BTD, key=None) -> torch.Tensor:
        graph = self.graphs.pop(key) if key is not None else None
        return self.stage.backward(inputs, grad_BTD, graph)

    async def rpc_stage_state(self, requests: Requests, call: Call):
        """The training stage's state (``protocols.stage_state``), for a peer joining the stage or a trainer."""
        first = await self._first(requests, call)
        span = self.span
        if (first.span.model_id, first.span.start_block, first.span.end_block) != (
            self.model_id,
            span.start,
            span.end,
        ):
            raise MissingBlocksError(f"this peer trains {self.model_id} {span.start}:{span.end}")
        state = await self._compute(self.stage.state)
        call.ledger.close()
        for message in stage_state.state_messages(state):
            yield message

    def _declared(
        self, own: int, max_mask_tokens: int
    ) -> Callable[[int, torch.dtype, tuple[int, ...]], None]:
        """Checks a request's tensors at their first part (``codec.TensorAssembler``): the ``own`` tensors are
        hidden_BTD, attention_mask_BS, position_ids_BT (then grad_outputs_BTD, for a backward), and the extras'
        after them, together, by what deep prompts and LoRA weights of this span can take at the peer's limits
        (the exact checks follow once they are decoded: ``adapters.check_lora``, ``adapters.check_prompts``)."""
        D, max_tokens = self.span.hidden_size, self.settings.max_batch_tokens
        linears, widest = _linears(self.span)
        prompts = (self.span.end - self.span.start) * max_tokens * D
        loras = linears * 2 * self.settings.max_lora_rank * widest
        extras_left = [4 * (prompts + loras)]  # bytes, at most 4 per value

        def check(index: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
            if index >= own:
                extras_left[0] -= math.prod(shape) * dtype.itemsize
                if extras_left[0] < 0:
                    raise ValidationError(
                        f"adapter or prompts tensors up to shape {list(shape)} are too large"
                    )
            elif index in (0, 3):
                if len(shape) != 3 or shape[2] != D or not dtype.is_floating_point:
                    raise ValidationError(
                        f"hidden states must be floating-point (batch, tokens, {D}), got {dtype} {list(shape)}"
                    )
                if shape[0] * shape[1] > max_tokens:
                    raise ValidationError(
                        f"{shape[0]}x{shape[1]} tokens exceed this peer's limit of {max_tokens}"
                    )
            elif len(shape) != 2 or math.prod(shape) > (max_mask_tokens if index == 1 else max_tokens):
                what = "attention mask" if index == 1 else "position ids"
                raise ValidationError(
                    f"{what} of shape {list(shape)} is not (batch, tokens) within this peer's limits"
                )

        return check

    async def _extras(
        self, span, a, b, message, tensors, call: Call, batch_size: int, max_prompt_tokens: int
    ) -> _Applied:
        """The adapters and prompts a request asks for, checked against blocks [a, b) of ``span``."""
        # decoding hashes attached LoRA weights and checks every value: off the event loop when there are any
        decode = (extras.decode, message, tensors)
        request, digest = await asyncio.to_thread(*decode) if tensors else decode[0](*decode[1:])
        client = str(call.remote_id)
        lora = request.lora
        if digest is not None:
            lora = self.loras.get(client, digest)
            if lora is None:
                raise MissingWeightsError(
                    "this peer does not hold these LoRA weights (any more); send them again"
                )
        if lora is not None:
            adapters.check_lora(lora, span.layers_of(a, b), self.settings.max_lora_rank)
            self.loras.put(client, lora)
        served = None
        if request.adapter:
            if request.adapter not in span.adapters:
                raise ValidationError(
                    f"unknown adapter {request.adapter!r}; this peer serves {sorted(span.adapters) or 'none'}"
                )
            served = span.adapters[request.adapter]
        if request.prompts_NBPD is not None:
            adapters.check_prompts(
                request.prompts_NBPD, b - a, batch_size, span.hidden_size, max_prompt_tokens
            )
        return _Applied(served, lora, request.prompts_NBPD)

    def _forward(self, span, inputs, a, b, applied: _Applied, key=None) -> torch.Tensor:
        """The blocks' output; with a ``key``, computed with grad and its graph kept for the backward."""
        hidden_BTD = inputs[0]
        if key is None:
            with torch.inference_mode(), applied.applying(span, a, b, past=0):
                return span.forward(*inputs, a, b).to(hidden_BTD.dtype)
        graph = self._graph(span, inputs, a, b, applied)
        self.graphs.put(key, graph)
        return graph.outputs.detach().to(hidden_BTD.dtype)

    def _graph(self, span, inputs, a, b, applied: _Applied) -> Graph:
        with torch.enable_grad(), SavedTensors(span.layers.parameters()) as saved:
            trainable = applied.trainable()
            inputs_BTD = inputs[0].to(span.dtype).requires_grad_(True)
            with trainable.applying(span, a, b, past=0):
                outputs_BTD = span.forward(inputs_BTD, *inputs[1:], a, b)
        saved.count(outputs_BTD)
        return Graph(inputs, applied, outputs_BTD, [inputs_BTD, *trainable.leaves()], saved.nbytes)

    def _backward(self, span, inputs, grad_BTD, a, b, applied: _Applied, key=None):
        """Gradients w.r.t. the inputs, then the deep prompts (if sent), then the client's LoRA weights. Uses the
        graph its forward kept under ``key`` if it is still there, else computes the forward again."""
        graph = self.graphs.pop(key) if key is not None else None
        if graph is None or not graph.matches(inputs, applied):
            graph = self._graph(span, inputs, a, b, applied)
        grads = torch.autograd.grad(
            graph.outputs, graph.leaves, grad_BTD.to(graph.outputs.dtype), allow_unused=True
        )
        sent = [inputs[0], *applied.leaves()]
        return [torch.zeros_like(x) if g is None else g.to(x.dtype) for g, x in zip(grads, sent, strict=True)]

    async def rpc_inference(self, requests: Requests, call: Call):
        if self.stage is not None:
            raise ValidationError(
                "a training stage serves forward and backward calls, not inference sessions"
            )
        first = await requests.next()
        if first is None or first.WhichOneof("kind") != "open":
            raise ValidationError("an inference stream must start with an open message")
        opening, settings = first.open, self.settings
        requests.idle_timeout = min(opening.idle_timeout or math.inf, settings.session_timeout)
        call.set_deadline(min(opening.lifetime or math.inf, settings.max_session_seconds))
        span, a, b = self._check_span(opening.span)
        batch_size, max_length = opening.batch_size, opening.max_length
        if not 1 <= batch_size or not 1 <= max_length <= settings.max_length:
            raise ValidationError(
                f"session needs 1 <= batch_size and 1 <= max_length <= {settings.max_length}, "
                f"got batch_size={batch_size}, max_length={max_length}"
            )
        message = opening.extras if opening.HasField("extras") else None
        tensors, _ = await self._parts(
            requests, opening.tensors, extras.tensor_count(message), "the open", self._declared(0, 0)
        )
        applied = await self._extras(
            span, a, b, message, tensors, call, batch_size, max_prompt_tokens=max_length
        )
        with (
            self.budget.session(
                call.remote_id.to_base58(), span.cache_bytes_per_token(a, b), batch_size * max_length
            ) as charge,
            self.inboxes.open(opening.session_id, a) as inbox,
        ):
            inbox.set_neighbours(opening.neighbours)
            self.open_sessions += 1
            reader = asyncio.create_task(
                self._client_steps(requests, call.ledger, inbox, batch_size * max_length)
            )
            pusher = push.Pusher(self.p2p, self.inboxes, self.metrics.sent["next_hop"].inc)
            session = None
            try:
                yield swarm_pb2.InferenceResponse(step_id=0, position=0)
                session = _Session(span, a, b, batch_size, max_length, applied, charge)
                async for response in self._session(session, inbox, pusher, requests.idle_timeout):
                    yield response
            finally:
                self.open_sessions -= 1
                if session is not None:
                    self._decodes(session, None)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader  # the stream is read by one task at a time
                pusher.close()

    async def _session(self, session: _Session, inbox: push.Inbox, pusher: push.Pusher, idle_timeout: float):
        span, a, b = session.span, session.a, session.b
        cache = span.new_cache(a, b)
        position, last_step, inline = 0, None, False
        while True:
            step = await self._take(inbox, idle_timeout)
            if step is None:
                return  # the client closed the session
            # a second copy of the step just computed is not computed again: its saved output goes on
            try:
                if step.step_id != last_step:
                    if span is not self.span and time.monotonic() >= self._handover_at:
                        raise MissingBlocksError(
                            f"this peer moved to blocks {self.span.start}:{self.span.end}; continue the session "
                            "elsewhere"
                        )
                    position = self._rolled_back(session, cache, step.tensors, position)
                    hidden_BTD, mask_BS, positions_BT = await self._checked(
                        step.tensors, past=position, batch_size=session.batch_size
                    )
                    B, T, _ = hidden_BTD.shape
                    if position + T > session.max_length:
                        raise ValidationError(
                            f"step of {T} tokens at position {position} exceeds the session's max_length "
                            f"{session.max_length}"
                        )
                    session.charge.grow(B * T)
                    t0 = time.perf_counter()
                    inputs = (hidden_BTD, mask_BS, positions_BT)
                    batch = self._batch(session, cache, B, T)
                    self._decodes(session, batch)
                    if T > _PREFILL_CHUNK and self.open_sessions > 1:
                        out_BTD = await self._prefill(session, cache, inputs, position)
                    else:
                        out_BTD = await self._compute(
                            self._step,
                            span,
                            *inputs,
                            a,
                            b,
                            cache,
                            session.applied,
                            position,
                            inline=inline,
                            step=True,
                            batch=batch,
                        )
                    seconds = time.perf_counter() - t0
                    self.metrics.served("inference_step", seconds, tokens=B * T)
                    # a single-token step that took little time may run on the loop's thread next time, unless
                    # other sessions' steps could batch with it
                    inline = T == 1 and seconds < _INLINE_SECONDS and self.open_sessions == 1
                    await self._emulated_latency()
                    position += T
                    last_step, out_parts = step.step_id, codec.pack([out_BTD], step.compression)
            finally:
                step.done()
            pushed = False
            if step.push and inbox.next is not None:
                pushed = await pusher.push(step.step_id, out_parts, mask_BS, positions_BT, inbox.next)
            if pushed and not step.carried:
                continue  # the client sent this hop its input, and a later hop answers with the output
            carried = [part for _, part in step.carried]
            answer = carried if pushed else [*itertools.chain.from_iterable(out_parts), *carried]
            for parts in codec.group(answer):
                response = swarm_pb2.InferenceResponse(
                    step_id=step.step_id,
                    tensors=parts,
                    position=position,
                    pushed=pushed,
                    carried_blocks=[block for block, _ in step.carried],
                )
                self.metrics.sent["client"].inc(response.ByteSize())
                yield response

    async def _client_steps(
        self, requests: Requests, ledger: Ledger, inbox: push.Inbox, max_mask_tokens: int
    ):
        """Moves what the client sends on the session's stream into its inbox: steps, then None (end of stream) or
        the error that ended it; new neighbours take effect at once. Waits as long as the stream is open: pushed
        steps may feed the session meanwhile."""
        check = self._declared(3, max_mask_tokens)
        try:
            while True:
                before = requests.bytes_read
                request = await requests.next()
                if request is None:
                    break
                kind = request.WhichOneof("kind")
                if kind == "neighbours":
                    inbox.set_neighbours(request.neighbours)
                    ledger.give_back(requests.bytes_read - before)
                    continue
                if kind != "step":
                    raise ValidationError(f"expected a step, got {kind!r}")
                tensors, compression = await self._parts(requests, request.step.tensors, 3, "the step", check)
                nbytes = requests.bytes_read - before
                step = push.Step(
                    request.step.step_id, tensors, request.step.push, (), ledger, nbytes, compression
                )
                await inbox.queue.put(step)
            await inbox.queue.put(None)
        except Exception as e:
            await inbox.queue.put(e)

    async def _take(self, inbox: push.Inbox, idle_timeout: float) -> push.Step | None:
        """The session's next step, None when the client closed it; DeadlineError after the idle timeout."""
        try:
            # awaited directly: asyncio.wait_for would start a task for every step
            async with asyncio.timeout(idle_timeout):
                item = await inbox.queue.get()
        except TimeoutError:
            raise DeadlineError(f"no step within {idle_timeout:.0f} s; the session is closed") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def _parts(
        self, requests: Requests, tensors, expected: int, what: str, check
    ) -> tuple[list[torch.Tensor], int]:
        """``expected`` tensors: those of a session message, then those of the ``parts`` messages after it; and the
        codec of the first, to answer in."""
        assembler = codec.TensorAssembler(expected=expected, check=check)
        assembler.feed(tensors)
        while not assembler.complete:
            more = await requests.next()
            if more is None or more.WhichOneof("kind") != "parts":
                raise ValidationError(f"{what} message ended before its tensors were complete")
            assembler.feed(more.parts.tensors)
        return assembler.tensors(), assembler.compression

    @staticmethod
    def _rolled_back(session: _Session, cache, tensors: list[torch.Tensor], position: int) -> int:
        """The position a step goes on from. A step whose mask is shorter than the session's tokens plus its own
        says the client rolled back (speculative decoding keeps the accepted prefix of the tokens it proposed): the
        cache drops the tokens past it, and their charge is given back. Any other mismatch is ``_check_inputs``'s."""
        hidden_BTD, mask_BS = tensors[0], tensors[1]
        if hidden_BTD.ndim != 3 or mask_BS.ndim != 2:
            return position
        past = mask_BS.shape[1] - hidden_BTD.shape[1]
        if not 0 <= past < position:
            return position
        try:
            cache.crop(past - position)
        except (RuntimeError, ValueError) as e:  # a sliding window past its length keeps no older tokens
            raise ValidationError(
                f"this session cannot roll back from {position} to {past} tokens: {e}"
            ) from None
        session.charge.shrink(session.batch_size * (position - past))
        return past

    async def _prefill(self, session: _Session, cache, inputs, position: int) -> torch.Tensor:
        """A long step (a prompt) in chunks of ``_PREFILL_CHUNK`` tokens, each a compute task of its own: other
        sessions' steps queued meanwhile run between two chunks, not after the whole prompt."""
        hidden_BTD, mask_BS, positions_BT = inputs
        T, outs = hidden_BTD.shape[1], []
        for i in range(0, T, _PREFILL_CHUNK):
            j = min(i + _PREFILL_CHUNK, T)
            chunk = (hidden_BTD[:, i:j], mask_BS[:, : position + j], positions_BT[:, i:j])
            outs.append(
                await self._compute(
                    self._step, session.span, *chunk, session.a, session.b, cache, session.applied, position + i,
                    step=True,
                )
            )  # fmt: skip
        return torch.cat(outs, dim=1)

    def _batch(self, session: _Session, cache, B: int, T: int) -> Batch | None:
        """How a step of ``session`` may batch with other sessions' (``peer.compute``): single-token steps of one
        sequence over the same blocks with the same served adapter and no LoRA or prompts of their own."""
        applied = session.applied
        if B != 1 or T != 1 or applied.lora is not None or applied.prompts_NBPD is not None:
            return None
        if not BlockSpan.batchable(cache):
            return None
        return Batch((id(session.span), session.a, session.b, id(applied.served)), self._steps)

    def _decodes(self, session: _Session, batch: Batch | None) -> None:
        """Counts ``session`` among those whose steps batch under ``batch``'s key (none: among none): how many steps
        a batch waits for (``ComputeQueue.batch_goal``)."""
        key = None if batch is None else batch.key
        if key == session.batch_key:
            return
        if session.batch_key is not None:
            self.decoding[session.batch_key] -= 1
            if self.decoding[session.batch_key] <= 0:
                del self.decoding[session.batch_key]
        if key is not None:
            self.decoding[key] += 1
        session.batch_key = key

    def _steps(self, many: list[tuple]) -> list[torch.Tensor]:
        """Several sessions' ``_step`` arguments (one batch key: ``_batch``) as one batched forward."""
        span, _, _, _, a, b, _, applied, _ = many[0]
        hiddens, masks, positions, caches = ([step[i] for step in many] for i in (1, 2, 3, 6))
        with torch.inference_mode(), applied.applying(span, a, b, past=0):
            outs = span.decode_batch(hiddens, masks, positions, caches, a, b)
        return [out.to(hidden.dtype) for out, hidden in zip(outs, hiddens, strict=True)]

    def _step(self, span, hidden_BTD, mask_BS, positions_BT, a, b, cache, applied, past) -> torch.Tensor:
        threads = self.decode_threads if hidden_BTD.shape[1] == 1 else None
        with torch.inference_mode(), compute_threads(threads), applied.applying(span, a, b, past=past):
            return span.forward(hidden_BTD, mask_BS, positions_BT, a, b, cache).to(hidden_BTD.dtype)

    def _check_span(self, request: swarm_pb2.Span) -> tuple[BlockSpan, int, int]:
        """The span that serves the requested blocks (the current one; the caller keeps it for the request)."""
        if request.model_id != self.model_id:
            raise ValidationError(f"this peer serves model {self.model_id!r}, not {request.model_id!r}")
        a, b, span = request.start_block, request.end_block, self.span
        num_blocks = span.checkpoint.num_blocks
        if not 0 <= a < b <= num_blocks:
            raise ValidationError(f"blocks {a}:{b} are not inside the model's 0:{num_blocks}")
        if not span.start <= a < b <= span.end:
            # not the caller's fault: its view of the swarm is stale (this peer may just have moved)
            raise MissingBlocksError(
                f"blocks {a}:{b} are not served here (this peer serves {span.start}:{span.end})"
            )
        return span, a, b

    async def _checked(self, tensors: list[torch.Tensor], past: int, batch_size: int | None):
        """``_check_inputs``; off the event loop for inputs of many tokens (checking them for NaN takes ms)."""
        if tensors[0].numel() > _INLINE_CHECK_VALUES:
            return await asyncio.to_thread(self._check_inputs, *tensors, past=past, batch_size=batch_size)
        return self._check_inputs(*tensors, past=past, batch_size=batch_size)

    def _check_inputs(self, hidden_BTD, mask_BS, positions_BT, *, past: int, batch_size: int | None):
        """Validates one step's tensors against the span and the session's state; returns them normalized."""
        if hidden_BTD.ndim != 3 or hidden_BTD.shape[-1] != self.span.hidden_size or 0 in hidden_BTD.shape:
            raise ValidationError(
                f"hidden states must be (batch, tokens, {self.span.hidden_size}), got {list(hidden_BTD.shape)}"
            )
        hidden_BTD = check_float("hidden states", hidden_BTD, hidden_BTD.shape)
        B, T, _ = hidden_BTD.shape
        if batch_size is not None and B != batch_size:
            raise ValidationError(f"this session was opened for batch size {batch_size}, got {B}")
        if B * T > self.settings.max_batch_tokens:
            raise ValidationError(
                f"{B}x{T} tokens exceed this peer's limit of {self.settings.max_batch_tokens}"
            )
        if mask_BS.shape != (B, past + T) or mask_BS.dtype not in (torch.int64, torch.int32, torch.bool):
            raise ValidationError(
                f"attention mask must be integer (batch, past + tokens) = ({B}, {past + T}), "
                f"got {mask_BS.dtype} {list(mask_BS.shape)}"
            )
        if mask_BS.dtype != torch.bool:
            lowest, highest = _bounds(mask_BS)
            if lowest < 0 or highest > 1:
                raise ValidationError("attention mask values must be 0 or 1")
        if positions_BT.shape not in ((B, T), (1, T)) or positions_BT.dtype not in (torch.int64, torch.int32):
            raise ValidationError(f"position ids must be integer ({B}, {T}), got {list(positions_BT.shape)}")
        max_positions = self.span.max_positions
        lowest, highest = _bounds(positions_BT)
        if lowest < 0 or highest >= max_positions:
            raise ValidationError(f"position ids must lie in [0, {max_positions})")
        return hidden_BTD, _long(mask_BS), _long(positions_BT)

    def shutdown(self) -> None:
        self.budget.close()
        super().shutdown()


@dataclass(eq=False)
class _Session:
    """What an inference session computes with: blocks [a, b) of ``span``, its sizes, additions and cache charge."""

    span: BlockSpan
    a: int
    b: int
    batch_size: int
    max_length: int
    applied: _Applied
    charge: SessionCharge
    batch_key: tuple | None = None  # the key its single-token steps batch under (``_batch``), once it decodes


@dataclass(frozen=True, eq=False)
class _Applied:
    """What one request adds to the frozen blocks: a served adapter, the client's LoRA, deep prompts."""

    served: Lora | None = None
    lora: Lora | None = None
    prompts_NBPD: torch.Tensor | None = None

    def same_as(self, other: _Applied) -> bool:
        digest = lambda lora: None if lora is None else lora.digest  # noqa: E731
        if self.served is not other.served or digest(self.lora) != digest(other.lora):
            return False
        if self.prompts_NBPD is None or other.prompts_NBPD is None:
            return self.prompts_NBPD is other.prompts_NBPD
        return self.prompts_NBPD.shape == other.prompts_NBPD.shape and torch.equal(
            self.prompts_NBPD, other.prompts_NBPD
        )

    def applying(self, span: BlockSpan, a: int, b: int, past: int):
        """Blocks [a, b) of ``span`` with these additions applied, for one compute call."""
        return adapters.applying(span.layers_of(a, b), (self.served, self.lora), self.prompts_NBPD, past)

    def leaves(self) -> list[torch.Tensor]:
        """What backward returns gradients for, after the inputs: the prompts, then the LoRA's A, B pairs."""
        prompts = [] if self.prompts_NBPD is None else [self.prompts_NBPD]
        return prompts + ([] if self.lora is None else self.lora.tensors)

    def trainable(self) -> _Applied:
        """A copy whose prompts and LoRA weights are fresh leaves that require grad."""
        fresh = [t.detach().clone().requires_grad_(True) for t in self.leaves()]
        prompts = fresh.pop(0) if self.prompts_NBPD is not None else None
        lora = None
        if self.lora is not None:
            lora = Lora(self.lora.modules, self.lora.scalings, tuple(fresh[0::2]), tuple(fresh[1::2]))
        return _Applied(self.served, lora, prompts)


@functools.lru_cache(maxsize=4)
def _linears(span: BlockSpan) -> tuple[int, int]:
    """How many linear layers the span's blocks have, and the widest side of any (what a LoRA can attach to)."""
    layers = [m for layer in span.layers_of(span.start, span.end).values() for m in layer.modules()]
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    return len(linears), max((max(m.in_features, m.out_features) for m in linears), default=span.hidden_size)


def check_float(what: str, tensor: torch.Tensor, shape) -> torch.Tensor:
    """``tensor`` if it is a floating-point tensor of ``shape`` with finite values; ``ValidationError`` if not."""
    if not tensor.is_floating_point():
        raise ValidationError(f"{what} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.shape != shape:
        raise ValidationError(f"{what} must have shape {list(shape)}, got {list(tensor.shape)}")
    if not _finite(tensor):
        raise ValidationError(f"{what} contain NaN or infinity")
    return tensor


# The checks below run on every decode step, on a few values each. A torch op costs more than those values: on a
# cold cache (a peer wakes with its caches taken by the other processes) each one took 150-200 us here, a numpy
# reduction 30-60 us. The tensors come from codec.deserialize: on the CPU, not requiring grad.


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        return bool(torch.isfinite(tensor).all())
    return bool(np.isfinite(tensor.numpy()).all())


def _bounds(tensor: torch.Tensor) -> tuple[int, int]:
    """The lowest and highest value of a non-empty integer tensor."""
    values = tensor.numpy()
    return int(values.min()), int(values.max())


def _long(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.int64 else tensor.long()
