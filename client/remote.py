"""Stateless calls through remote blocks, and ``RemoteSequential``: the blocks as one autograd-aware module.

Shape legend: B batch, T tokens, D hidden size.

``RemoteSequential(hidden_BTD, attention_mask_BT, position_ids_BT)`` runs every block of the model through the
swarm (forward RPCs along a planned route). Its backward sends the output gradient back along the same route
(backward RPCs, each peer recomputing its span from the inputs it saw), so gradients w.r.t. the inputs flow as if
the blocks were local. A hop that fails is retried on another route, a bounded number of times.
"""

from __future__ import annotations

import logging
import time

import torch
from hivemind.utils.asyncio import as_aiter
from torch import nn

from swarm_peer.client.routing import Hop, Router
from swarm_peer.client.runtime import SwarmRuntime
from swarm_peer.errors import PeerError, SwarmError
from swarm_peer.protocols import codec, rpc, swarm_pb2

__all__ = ["RemoteSequential", "call_span"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


async def call_span(runtime: SwarmRuntime, name: str, model_id: str, hop: Hop, tensors) -> torch.Tensor:
    """One forward/backward RPC to ``hop``; returns its single output tensor."""
    span = swarm_pb2.Span(model_id=model_id, start_block=hop.start, end_block=hop.end)
    requests = [
        swarm_pb2.ForwardRequest(span=span if i == 0 else None, tensors=parts)
        for i, parts in enumerate(codec.pack(tensors))
    ]
    try:
        assembler = codec.TensorAssembler(expected=1)
        if len(requests) == 1:
            response = await runtime.p2p.call_protobuf_handler(
                hop.peer_id, name, requests[0], swarm_pb2.ForwardResponse
            )
            assembler.feed(response.tensors)
        else:
            responses = await runtime.p2p.iterate_protobuf_handler(
                hop.peer_id, rpc.streamed(name), as_aiter(*requests), swarm_pb2.ForwardResponse
            )
            async for response in responses:
                assembler.feed(response.tensors)
        return assembler.tensors()[0]
    except SwarmError:
        raise
    except Exception as e:
        raise rpc.remote_error(e, str(hop.peer_id)) from None


class RemoteSequential(nn.Module):
    """All blocks of ``model_id`` [start, end), served by the swarm."""

    def __init__(
        self, runtime: SwarmRuntime, router: Router, model_id: str, start: int = 0, end: int | None = None
    ):
        super().__init__()
        self.runtime, self.router, self.model_id = runtime, router, model_id
        self.start, self.end = start, router.num_blocks if end is None else end

    def forward(
        self, hidden_BTD: torch.Tensor, attention_mask_BT: torch.Tensor, position_ids_BT: torch.Tensor
    ):
        return _RemoteChain.apply(hidden_BTD, attention_mask_BT, position_ids_BT, self)

    def call(self, name: str, hop: Hop, tensors) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.runtime.run(call_span(self.runtime, name, self.model_id, hop, tensors))
        self.router.record_latency(hop.peer_id, time.perf_counter() - t0)
        return out

    def run_chain(
        self, hidden_BTD, attention_mask_BT, position_ids_BT
    ) -> tuple[torch.Tensor, list, list[Hop]]:
        """Forward through a fresh route; returns the output, the input of each hop, and the route."""
        for attempt in range(MAX_ATTEMPTS):
            route = self.router.plan(self.start, self.end)
            inputs, x = [], hidden_BTD
            try:
                for hop in route:
                    inputs.append(x)
                    x = self.call(rpc.FORWARD, hop, [x, attention_mask_BT, position_ids_BT])
                return x, inputs, route
            except PeerError as e:
                if not e.retryable or attempt + 1 == MAX_ATTEMPTS:
                    raise
                logger.warning("Forward failed (%s); retrying on another route", e)
                self.router.ban(hop.peer_id)
        raise AssertionError("unreachable")


class _RemoteChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_BTD, attention_mask_BT, position_ids_BT, module: RemoteSequential):
        out_BTD, inputs, route = module.run_chain(hidden_BTD.detach(), attention_mask_BT, position_ids_BT)
        ctx.module, ctx.inputs, ctx.route = module, inputs, route
        ctx.save_for_backward(attention_mask_BT, position_ids_BT)
        return out_BTD.to(hidden_BTD.dtype)

    @staticmethod
    def backward(ctx, grad_BTD):
        attention_mask_BT, position_ids_BT = ctx.saved_tensors
        grad = grad_BTD.contiguous()
        for hop, x in zip(reversed(ctx.route), reversed(ctx.inputs), strict=True):
            grad = ctx.module.call(rpc.BACKWARD, hop, [x, attention_mask_BT, position_ids_BT, grad])
        return grad, None, None, None
