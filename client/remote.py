"""Stateless calls through remote blocks, and ``RemoteSequential``: the blocks as one autograd-aware module.

Shape legend: N blocks, B batch, T tokens, P prompt tokens, D hidden size.

``RemoteSequential(hidden_BTD, attention_mask_BT, position_ids_BT, prompts_NBPD)`` runs every block of the model
through the swarm (forward RPCs along a planned route). Its backward sends the output gradient back along the same
route (backward RPCs, each peer recomputing its span from the inputs it saw), so gradients flow as if the blocks
were local: to the inputs, to the deep prompts, and to the client's own LoRA weights (``self.lora``), which travel
with each request (once per peer: afterwards by digest). A served adapter is chosen with ``router.adapter``.

Batches larger than ``ClientSettings.max_chunk_tokens`` are split into row chunks, each its own chain of calls.
A hop that fails is banned and its blocks are planned again on other peers, with growing pauses, until
``ClientSettings.retry_timeout``; errors that are the caller's own fault are raised at once.
"""

from __future__ import annotations

import logging
import random

import torch
from torch import nn

from swarm_peer.client.health import Retries
from swarm_peer.client.lora import RemoteLora
from swarm_peer.client.routing import Hop, Router
from swarm_peer.errors import MissingWeightsError, ValidationError
from swarm_peer.protocols import codec, extras, rpc, swarm_pb2
from swarm_peer.protocols.extras import Extras
from swarm_peer.protocols.runtime import SwarmRuntime

__all__ = ["RemoteSequential", "CallExtras", "call_span"]

logger = logging.getLogger(__name__)


async def call_span(
    runtime: SwarmRuntime,
    name: str,
    model_id: str,
    hop: Hop,
    tensors,
    message=None,
    expected: int = 1,
    graph_id: int = 0,
    wired: int = 0,
) -> list[torch.Tensor]:
    """One forward/backward RPC to ``hop`` with the extras ``message``; returns its ``expected`` output tensors.

    ``graph_id``: a forward asks the peer to keep its graph under this id; the backward names it again.
    ``wired``: how many of the first tensors (hidden states, gradient) go in ``ClientSettings.compression``; the
    peer answers the first of its outputs in the same form (``codec.Wire``)."""
    wire = codec.WIRES[runtime.settings.compression]
    tensors = [wire.cast(t) if i < wired else t for i, t in enumerate(tensors)]
    span = swarm_pb2.Span(model_id=model_id, start_block=hop.start, end_block=hop.end)
    timeout_ms = int(runtime.settings.request_timeout * 1000)
    types = swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse
    return await rpc.call_with_tensors(
        runtime.p2p,
        hop.peer_id,
        name,
        types,
        tensors,
        expected,
        wire.compression,
        compressed=wired,
        span=span,
        extras=message,
        graph_id=graph_id,
        timeout_ms=timeout_ms,
    )


class CallExtras:
    """What one chunk's calls carry besides hidden states: the deep prompts and a snapshot of the LoRA weights."""

    def __init__(self, module: RemoteSequential, prompts_NBPD: torch.Tensor | None, training: bool = False):
        self.module, self.prompts_NBPD, self.training = module, prompts_NBPD, training
        self._loras: dict[tuple[int, int], object] = {}

    def extras(self, a: int, b: int) -> Extras:
        m = self.module
        if m.lora is not None and (a, b) not in self._loras:
            self._loras[a, b] = m.lora.for_blocks(a, b)
        prompts = None if self.prompts_NBPD is None else self.prompts_NBPD[a - m.start : b - m.start]
        return Extras(adapter=m.router.adapter, prompts_NBPD=prompts, lora=self._loras.get((a, b)))


class RemoteSequential(nn.Module):
    """All blocks of ``model_id`` [start, end), served by the swarm."""

    def __init__(
        self, runtime: SwarmRuntime, router: Router, model_id: str, start: int = 0, end: int | None = None
    ):
        super().__init__()
        self.runtime, self.router, self.model_id = runtime, router, model_id
        self.start, self.end = start, router.num_blocks if end is None else end
        self.lora: RemoteLora | None = None
        self._held: set[tuple[str, bytes]] = set()  # (peer, digest) of LoRA weights that peers have cached

    def forward(
        self,
        hidden_BTD: torch.Tensor,
        attention_mask_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        prompts_NBPD: torch.Tensor | None = None,
    ):
        if prompts_NBPD is not None and (
            prompts_NBPD.ndim != 4
            or prompts_NBPD.shape[0] != self.end - self.start
            or prompts_NBPD.shape[1] not in (1, hidden_BTD.shape[0])
        ):
            raise ValidationError(
                f"deep prompts must be ({self.end - self.start} blocks, batch or 1, tokens, hidden), "
                f"got {list(prompts_NBPD.shape)}"
            )
        params = self.lora.ordered_parameters() if self.lora is not None else []
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden_BTD, prompts_NBPD, *params)
        )
        return _RemoteChain.apply(
            self, training, hidden_BTD, attention_mask_BT, position_ids_BT, prompts_NBPD, *params
        )

    def chunks(self, batch_size: int, length: int) -> list[slice]:
        """Row chunks of the batch, each at most ``max_chunk_tokens`` tokens."""
        limit = self.runtime.settings.max_chunk_tokens
        if length > limit:
            raise ValidationError(f"sequences of {length} tokens exceed max_chunk_tokens={limit}")
        rows = max(1, limit // length)
        return [slice(i, min(i + rows, batch_size)) for i in range(0, batch_size, rows)]

    def call(
        self, name: str, hop: Hop, tensors, extras_: Extras, expected: int = 1, graph_id: int = 0
    ) -> list[torch.Tensor]:
        lora = extras_.lora
        held = lora is not None and (str(hop.peer_id), lora.digest) in self._held
        try:
            out = self._call(name, hop, tensors, extras_, not held, expected, graph_id)
        except MissingWeightsError:  # the peer dropped them from its cache
            self._held.discard((str(hop.peer_id), lora.digest))
            out = self._call(name, hop, tensors, extras_, True, expected, graph_id)
        if lora is not None:
            self._held.add((str(hop.peer_id), lora.digest))
        self.router.health.forgive(hop.peer_id)
        return out

    def _call(self, name, hop, tensors, extras_, attach: bool, expected: int, graph_id: int):
        message, extra_tensors = extras.encode(extras_, attach_lora=attach)
        out = self.runtime.run(
            call_span(
                self.runtime,
                name,
                self.model_id,
                hop,
                [*tensors, *extra_tensors],
                message,
                expected,
                graph_id,
                wired=len(tensors),
            )
        )
        # back from the hidden states' form on the wire (``ClientSettings.compression``)
        out[0] = out[0].to(tensors[0].dtype)
        return out

    def retries(self) -> Retries:
        """One call's retry budget (``ClientSettings.retry_timeout``), shared by all its hops and chunks."""
        return Retries(self.router.health, timeout=self.runtime.settings.retry_timeout)

    def run_chain(
        self,
        call: CallExtras,
        hidden_BTD,
        attention_mask_BT,
        position_ids_BT,
        retries: Retries,
        start=None,
        end=None,
    ) -> tuple[torch.Tensor, list, list[tuple[Hop, int]]]:
        """Forward through blocks [start, end); returns the output, the input of each hop, and the hops (with the
        id under which the peer keeps the graph for backward, when training).

        A hop that fails is banned and the rest of the chain is planned again from the block it should have
        started, so work already done is kept.
        """
        start, end = (self.start if start is None else start), (self.end if end is None else end)
        inputs, route, x, block = [], [], hidden_BTD, start
        while block < end:
            for hop in retries.plan(self.router.forward_route, block, end):
                graph_id = random.getrandbits(63) + 1 if call.training else 0
                try:
                    (y,) = self.call(
                        rpc.FORWARD,
                        hop,
                        [x, attention_mask_BT, position_ids_BT],
                        call.extras(hop.start, hop.end),
                        graph_id=graph_id,
                    )
                except Exception as e:
                    retries.failed(hop.peer_id, e)
                    break  # plan the rest again from this block
                inputs.append(x)
                route.append((hop, graph_id))
                x, block = y, hop.end
        return x, inputs, route

    def backward_hop(
        self, call: CallExtras, step, hidden_BTD, attention_mask_BT, position_ids_BT, grad_BTD, grads, retries
    ):
        """Gradient w.r.t. the input of hop ``step`` (hop, graph id), adding the extras' gradients to ``grads``;
        if its peer fails, recomputes the span elsewhere (within the call's ``retries``)."""
        hop, graph_id = step
        extras_ = call.extras(hop.start, hop.end)
        tensors = [hidden_BTD, attention_mask_BT, position_ids_BT, grad_BTD]
        expected = 1 + len(extras.encode(extras_)[1])
        try:
            outputs = self.call(rpc.BACKWARD, hop, tensors, extras_, expected=expected, graph_id=graph_id)
        except Exception as e:
            retries.failed(hop.peer_id, e)
        else:
            grads.add(hop, extras_, outputs[1:])
            return outputs[0]
        logger.info("Backward through blocks %d:%d is replanned on other peers", hop.start, hop.end)
        _, inputs, route = self.run_chain(
            call, hidden_BTD, attention_mask_BT, position_ids_BT, retries, hop.start, hop.end
        )
        return self.backward_chain(
            call, route, inputs, attention_mask_BT, position_ids_BT, grad_BTD, grads, retries
        )

    def backward_chain(
        self, call, route, inputs, attention_mask_BT, position_ids_BT, grad_BTD, grads, retries
    ):
        for step, x in zip(reversed(route), reversed(inputs), strict=True):
            grad_BTD = self.backward_hop(
                call, step, x, attention_mask_BT, position_ids_BT, grad_BTD, grads, retries
            )
        return grad_BTD


class _Grads:
    """Accumulates the gradients of one chunk's deep prompts and of the LoRA weights, hop by hop."""

    def __init__(self, module: RemoteSequential, prompts_NBPD: torch.Tensor | None):
        self.module = module
        self.prompts_NBPD = None if prompts_NBPD is None else torch.zeros_like(prompts_NBPD)
        self.lora: dict[str, list[torch.Tensor]] = {}

    def add(self, hop: Hop, extras_: Extras, grads: list[torch.Tensor]) -> None:
        if extras_.prompts_NBPD is not None:
            self.prompts_NBPD[hop.start - self.module.start : hop.end - self.module.start] += grads.pop(0)
        if extras_.lora is not None:
            for name, gA, gB in zip(extras_.lora.modules, grads[0::2], grads[1::2], strict=True):
                if name in self.lora:
                    self.lora[name][0] += gA
                    self.lora[name][1] += gB
                else:
                    self.lora[name] = [gA.clone(), gB.clone()]


class _RemoteChain(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        module: RemoteSequential,
        training: bool,
        hidden_BTD,
        attention_mask_BT,
        position_ids_BT,
        prompts_NBPD,
        *params,
    ):
        B, T, _ = hidden_BTD.shape
        ctx.module, ctx.chunks = module, []
        outputs, retries = [], module.retries()
        for rows in module.chunks(B, T):
            call = CallExtras(module, _rows(prompts_NBPD, rows, B, dim=1), training)
            mask, positions = attention_mask_BT[rows], _rows(position_ids_BT, rows, B, dim=0)
            out_BTD, inputs, route = module.run_chain(
                call, hidden_BTD[rows].detach(), mask, positions, retries
            )
            ctx.chunks.append((rows, call, inputs, route, mask, positions))
            outputs.append(out_BTD)
        ctx.prompts_shape = None if prompts_NBPD is None else prompts_NBPD.shape
        return torch.cat(outputs).to(hidden_BTD.dtype)

    @staticmethod
    def backward(ctx, grad_BTD):
        module: RemoteSequential = ctx.module
        grad_inputs, lora = [], {}
        grad_prompts = None if ctx.prompts_shape is None else torch.zeros(ctx.prompts_shape)
        retries = module.retries()
        for rows, call, inputs, route, mask, positions in ctx.chunks:
            grads = _Grads(module, call.prompts_NBPD)
            grad = module.backward_chain(
                call, route, inputs, mask, positions, grad_BTD[rows].contiguous(), grads, retries
            )
            grad_inputs.append(grad)
            if grad_prompts is not None:
                if grad_prompts.shape[1] == 1:
                    grad_prompts += grads.prompts_NBPD
                else:
                    grad_prompts[:, rows] += grads.prompts_NBPD
            for name, (gA, gB) in grads.lora.items():
                if name in lora:
                    lora[name][0] += gA
                    lora[name][1] += gB
                else:
                    lora[name] = [gA, gB]
        grad_params = []
        if module.lora is not None:
            for name, A, B in module.lora.pairs():
                gA, gB = lora.get(name, (torch.zeros_like(A), torch.zeros_like(B)))
                grad_params += [gA.to(A.dtype), gB.to(B.dtype)]
        return None, None, torch.cat(grad_inputs), None, None, grad_prompts, *grad_params


def _rows(tensor: torch.Tensor | None, rows: slice, batch_size: int, dim: int):
    """The chunk's rows of a tensor whose batch dimension ``dim`` is either the batch or 1 (broadcast)."""
    if tensor is None or tensor.shape[dim] == 1 and batch_size != 1:
        return tensor
    return tensor.narrow(dim, rows.start, rows.stop - rows.start)
