"""The RPCs of a peer that hosts experts: a batch for each of several experts in one request.

Shape legend: B batch (samples of one call), T tokens of a sample, D hidden size. An expert of type ``ffn`` takes
inputs_BD, a ``transformer`` expert inputs_BTD (``moe.experts``).

- ``swarm.v1.expert_forward``: uids (one per call), then tensors inputs_0, inputs_1, ... -> outputs_0, outputs_1, ...
- ``swarm.v1.expert_backward``: uids, then inputs_0, grad_outputs_0, inputs_1, grad_outputs_1, ... ->
  grad_inputs_0, grad_inputs_1, ...; each call adds to its expert's accumulated gradients, which step its optimizer
  after ``--update-every`` samples (``peer.experts``).

A training client's forward names a graph id (``ExpertRequest.graph_id``; 0: no backward follows): the peer then
computes each call with grad and keeps its graph (``peer.graphs.GraphCache``, within ``--graph-cache-mb``, briefly)
under (caller, graph id, uid), and the backward naming the same id differentiates that graph instead of computing
the forward again, if it is of the same inputs and the expert's weights have not changed since (an update or an
averaging round in between: it computes the forward again, at the new weights).

So a trainer sends one request per peer per batch, whatever the number of samples and experts it asks of that peer
(hivemind 1.1.12's layer sends one per (sample, expert) pair). Both are served through the same ``RpcServer`` as the
blocks' RPCs (``peer.handlers.Handlers``: frame, byte, stream and deadline limits, typed errors) and computed on
the same single compute thread. Each tensor's dtype and shape is checked at its first part, before the rest is read:
floating-point, of its expert's rank and width, all calls of a request together at most ``--max-batch-tokens`` rows
(samples, or samples x tokens). An unknown uid is refused as ``MissingBlocksError`` (not served here), NaN or
infinite values, or gradients of another shape, as ``ValidationError``; the peer keeps serving everyone else.

For tests, ``--fail-rate P`` (``ExpertSettings.fail_rate``) refuses each request with probability P as
``BusyError``, after its uids are checked and before its tensors are read: a peer that is alive but drops a share
of its calls.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from hivemind.p2p import P2P

from swarm_peer.errors import BusyError, ValidationError
from swarm_peer.peer.experts import HostedExpert, HostedExperts
from swarm_peer.peer.handlers import Handlers, check_float
from swarm_peer.protocols import codec, rpc, swarm_pb2
from swarm_peer.protocols.serving import Call, Requests
from swarm_peer.settings import PeerSettings

__all__ = ["ExpertHandlers", "MAX_CALLS"]

MAX_CALLS = 1024  # expert calls in one request


class ExpertHandlers(Handlers):
    """Serves the experts of ``experts`` over hivemind P2P."""

    def __init__(self, experts: HostedExperts, settings: PeerSettings, info_json: Callable[[], bytes]):
        super().__init__(settings, info_json)
        self.experts = experts
        # which requests ``--fail-rate`` refuses: a sequence of its own per peer (seeded by its first uid), so peers
        # fail independently of each other, and a trainer that calls them in the same order meets the same failures
        self._failures = random.Random(f"{experts.settings.seed}/{experts.settings.uids[0]}")

    async def register(self, p2p: P2P) -> None:
        await super().register(p2p)
        types = swarm_pb2.ExpertRequest, swarm_pb2.ExpertResponse
        seconds = self.settings.max_request_seconds
        for name, handler in (
            (rpc.EXPERT_FORWARD, self.rpc_forward),
            (rpc.EXPERT_BACKWARD, self.rpc_backward),
        ):
            handler = self.metrics.timed(name.rsplit(".", 1)[-1], handler)  # "expert_forward", ...
            await self.server.add(p2p, name, handler, types, seconds, unary=True)
            await self.server.add(p2p, rpc.streamed(name), handler, types, seconds)

    def rpc_forward(self, requests: Requests, call: Call):
        return self._calls(requests, call, backward=False)

    def rpc_backward(self, requests: Requests, call: Call):
        return self._calls(requests, call, backward=True)

    async def _calls(self, requests: Requests, call: Call, backward: bool):
        first = await self._first(requests, call)
        if not 1 <= len(first.uids) <= MAX_CALLS:
            raise ValidationError(f"a request calls 1 to {MAX_CALLS} experts, got {len(first.uids)}")
        experts = [self.experts[uid] for uid in first.uids]  # MissingBlocksError for one not served here
        await self._emulated_latency()
        if self._failures.random() < self.experts.settings.fail_rate:
            raise BusyError(f"emulated failure (--fail-rate {self.experts.settings.fail_rate})")
        per_call = 2 if backward else 1
        check = self._declared(experts, per_call)
        tensors, _ = await self._tensors(requests, first, per_call * len(experts), check)
        rows = sum(math.prod(x.shape[:-1]) for x in tensors[::per_call])
        self.metrics.tokens["expert_backward" if backward else "expert_forward"].inc(rows)
        # a training client's forward names a graph id: the calls' graphs are kept for its backward, which names it
        key = (str(call.remote_id), first.graph_id) if first.graph_id and self.graphs.max_bytes > 0 else None
        if backward:
            results = await self._compute(self._backward, experts, tensors[0::2], tensors[1::2], key)
        else:
            results = await self._compute(self._forward, experts, tensors, key)
        call.ledger.close()  # the request's bytes are spent; the answer is ours
        for parts in codec.pack(results):
            yield swarm_pb2.ExpertResponse(tensors=parts)

    def _declared(self, experts: list[HostedExpert], per_call: int):
        """Checks each tensor at its first part (``codec.TensorAssembler``): the rank and width of its expert's
        inputs, floating-point, the request's rows against ``--max-batch-tokens``, and a gradient's shape against
        its inputs'."""
        dims, D = self.experts.type.input_dims, self.experts.settings.hidden
        rows_left, last_inputs = [self.settings.max_batch_tokens], [()]

        def check(index: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
            uid = experts[index // per_call].uid
            if index % per_call:  # the gradient of the inputs just before it
                if shape != last_inputs[0] or not dtype.is_floating_point:
                    raise ValidationError(
                        f"gradients of {uid} must be floating-point of the inputs' shape {list(last_inputs[0])}, "
                        f"got {dtype} {list(shape)}"
                    )
                return
            if len(shape) != dims or shape[-1] != D or 0 in shape or not dtype.is_floating_point:
                expected = "(batch, D)" if dims == 2 else "(batch, tokens, D)"
                raise ValidationError(
                    f"inputs of {uid} must be floating-point {expected.replace('D', str(D))}, got {dtype} "
                    f"{list(shape)}"
                )
            rows_left[0] -= math.prod(shape[:-1])
            if rows_left[0] < 0:
                raise ValidationError(
                    f"the request's inputs exceed this peer's limit of {self.settings.max_batch_tokens} rows"
                )
            last_inputs[0] = shape

        return check

    def _forward(
        self, experts: list[HostedExpert], inputs: list[torch.Tensor], key=None
    ) -> list[torch.Tensor]:
        """Each call's output; with a ``key``, computed with grad and each call's graph kept under (key, uid)."""
        calls = list(zip(experts, inputs, strict=True))
        for e, x in calls:
            check_float(f"inputs of {e.uid}", x, x.shape)
        device, outputs = self.experts.device, []
        for e, x in calls:
            if key is None:
                y = e.forward(x.to(device, torch.float32))
            else:
                graph = e.graph(x.to(device, torch.float32))
                self.graphs.put((*key, e.uid), graph)  # a uid called twice in a request keeps its last graph
                y = graph.outputs.detach()
            outputs.append(y.to("cpu", x.dtype))
        return outputs

    def _backward(
        self, experts: list[HostedExpert], inputs: list[torch.Tensor], grads: list[torch.Tensor], key=None
    ) -> list[torch.Tensor]:
        """Each call's input gradient, from the graph its forward kept under (key, uid) where it is still there
        and of the same inputs and weights, else from the forward computed again."""
        calls = list(zip(experts, inputs, grads, strict=True))
        for e, x, g in calls:  # every call checked before any expert accumulates a gradient
            check_float(f"inputs of {e.uid}", x, x.shape)
            check_float(f"gradients of {e.uid}", g, x.shape)
        device, steps = self.experts.device, sum(e.steps for e in experts)
        results = []
        for e, x, g in calls:
            graph = self.graphs.pop((*key, e.uid)) if key is not None else None
            grad_x = e.backward((x.to(device, torch.float32),), g.to(device, torch.float32), graph)
            results.append(grad_x.to("cpu", x.dtype))
        if self.experts.settings.checkpoint_period == 0 and sum(e.steps for e in experts) != steps:
            self.experts.save()
        return results
