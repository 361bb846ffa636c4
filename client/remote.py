"""Stateless calls through remote blocks, and ``RemoteSequential``: the blocks as one autograd-aware module.

Shape legend: B batch, T tokens, D hidden size.

``RemoteSequential(hidden_BTD, attention_mask_BT, position_ids_BT)`` runs every block of the model through the
swarm (forward RPCs along a planned route). Its backward sends the output gradient back along the same route
(backward RPCs, each peer recomputing its span from the inputs it saw), so gradients w.r.t. the inputs flow as if
the blocks were local. A hop that fails is banned and its blocks are planned again on other peers, with growing
pauses, until ``ClientSettings.retry_timeout``; errors that are the caller's own fault are raised at once.
"""

from __future__ import annotations

import logging

import torch
from hivemind.utils.asyncio import as_aiter
from torch import nn

from swarm_peer.client.health import Retries
from swarm_peer.client.routing import Hop, Router
from swarm_peer.client.runtime import SwarmRuntime
from swarm_peer.errors import SwarmError
from swarm_peer.protocols import codec, rpc, swarm_pb2

__all__ = ["RemoteSequential", "call_span"]

logger = logging.getLogger(__name__)


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
        out = self.runtime.run(call_span(self.runtime, name, self.model_id, hop, tensors))
        self.router.health.forgive(hop.peer_id)
        return out

    def run_chain(
        self, hidden_BTD, attention_mask_BT, position_ids_BT, start: int | None = None, end: int | None = None
    ) -> tuple[torch.Tensor, list, list[Hop]]:
        """Forward through blocks [start, end); returns the output, the input of each hop, and the hops.

        A hop that fails is banned and the rest of the chain is planned again from the block it should have
        started, so work already done is kept.
        """
        start, end = (self.start if start is None else start), (self.end if end is None else end)
        retries = Retries(self.router.health, timeout=self.runtime.settings.retry_timeout)
        inputs, route, x, block = [], [], hidden_BTD, start
        while block < end:
            for hop in retries.plan(self.router.forward_route, block, end):
                try:
                    y = self.call(rpc.FORWARD, hop, [x, attention_mask_BT, position_ids_BT])
                except Exception as e:
                    retries.failed(hop.peer_id, e)
                    break  # plan the rest again from this block
                inputs.append(x)
                route.append(hop)
                x, block = y, hop.end
        return x, inputs, route

    def backward_hop(
        self, hop: Hop, hidden_BTD, attention_mask_BT, position_ids_BT, grad_BTD
    ) -> torch.Tensor:
        """Gradient w.r.t. the input of ``hop``; if its peer fails, recomputes the span elsewhere."""
        tensors = [hidden_BTD, attention_mask_BT, position_ids_BT, grad_BTD]
        try:
            return self.call(rpc.BACKWARD, hop, tensors)
        except Exception as e:
            Retries(self.router.health, timeout=self.runtime.settings.retry_timeout).failed(hop.peer_id, e)
        logger.info("Backward through blocks %d:%d is replanned on other peers", hop.start, hop.end)
        _, inputs, route = self.run_chain(hidden_BTD, attention_mask_BT, position_ids_BT, hop.start, hop.end)
        return self.backward_chain(route, inputs, attention_mask_BT, position_ids_BT, grad_BTD)

    def backward_chain(self, route, inputs, attention_mask_BT, position_ids_BT, grad_BTD) -> torch.Tensor:
        for hop, x in zip(reversed(route), reversed(inputs), strict=True):
            grad_BTD = self.backward_hop(hop, x, attention_mask_BT, position_ids_BT, grad_BTD)
        return grad_BTD


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
        grad = ctx.module.backward_chain(
            ctx.route, ctx.inputs, attention_mask_BT, position_ids_BT, grad_BTD.contiguous()
        )
        return grad, None, None, None
