"""Calling experts on peers: a batch for each expert, one request per peer, as a differentiable torch op.

Shape legend: B batch (samples of one call), D hidden size; an ``ffn`` expert takes inputs_BD, a ``transformer``
one inputs_BTD (``moe.experts``).

    runtime = SwarmRuntime(ClientSettings(network=NetworkSettings(initial_peers=[maddr], client_mode=True)))
    # (swarm_peer.protocols.runtime; also swarm_peer.client.SwarmRuntime)
    y0, y1 = call_experts(runtime, [(peer, "ffn.0.3"), (peer, "ffn.5.1")], [x0_BD, x1_BD])
    (y0.sum() + y1.sum()).backward()      # sends the gradients back: the experts accumulate them and learn

    expert = RemoteExpert(runtime, peer, "ffn.0.3")   # one expert as a module: y_BD = expert(x_BD)

``call_experts`` groups the calls by peer, sends each peer one ``swarm.v1.expert_forward`` request with all its
calls (``peer.expert_handlers``) and waits for every peer in parallel; so does its backward with
``swarm.v1.expert_backward``, for the calls whose outputs got a gradient. A peer recomputes an expert's forward for
its backward from the inputs sent again, so nothing is kept between the two; the expert's parameters learn from the
gradient on the peer (its own optimizer, after ``--update-every`` samples), and the caller gets the gradient w.r.t.
its inputs. Backward runs only if some input requires grad (as for any torch op).

A failed call raises: the peer's typed error (``swarm_peer.errors``: ``ValidationError`` for a bad request,
``MissingBlocksError`` for an expert the peer does not serve, ``DeadlineError`` past ``timeout``, ``PeerError``
for a peer that could not be reached). Carrying on without the experts that failed is the mixture layer's choice,
not this one's.

``runtime`` is a ``SwarmRuntime`` (its P2P handle and event loop), or any object with ``p2p``, ``dht``,
``run(coro, timeout)`` and ``settings.request_timeout`` (tests wrap the P2P handle to count calls).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import hivemind
import torch
from hivemind.p2p import P2P, PeerID
from torch import nn
from torch.autograd.function import once_differentiable

from swarm_peer.errors import DeadlineError, SwarmError, ValidationError
from swarm_peer.protocols import rpc, swarm_pb2

__all__ = ["RemoteExpert", "call_experts", "call_peers"]

_TYPES = swarm_pb2.ExpertRequest, swarm_pb2.ExpertResponse


class Runtime(Protocol):
    """What this module and ``mixture`` use of a ``SwarmRuntime``."""

    p2p: P2P
    dht: hivemind.DHT  # for beam search (``mixture``)
    settings: Any  # .request_timeout: seconds

    def run(self, coro, timeout: float | None = None): ...


def call_experts(
    runtime: Runtime,
    calls: Sequence[tuple[PeerID, str]],
    inputs: Sequence[torch.Tensor],
    *,
    timeout: float | None = None,
) -> list[torch.Tensor]:
    """The output of each expert ``calls[i]`` = (peer, uid) on ``inputs[i]``, differentiable (see the module).

    ``timeout`` bounds each pass, forward or backward (default ``runtime.settings.request_timeout``).
    """
    if len(calls) != len(inputs) or not calls:
        raise ValidationError(
            f"need one input per expert call, got {len(calls)} calls and {len(inputs)} inputs"
        )
    timeout = runtime.settings.request_timeout if timeout is None else timeout
    training = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    return list(_ExpertCalls.apply(runtime, tuple(calls), timeout, new_graph_id(training), *inputs))


def new_graph_id(training: bool) -> int:
    """The id a training forward's requests name, under which peers keep its calls' graphs for the backward, which
    names it again (so that it need not compute the forward twice); 0, for a forward no backward follows."""
    return random.getrandbits(63) + 1 if training else 0


class RemoteExpert(nn.Module):
    """The expert ``uid`` that ``peer_id`` hosts, as a module: ``forward(x)`` is ``call_experts`` of one call."""

    def __init__(self, runtime: Runtime, peer_id: PeerID, uid: str, *, timeout: float | None = None):
        super().__init__()
        self.runtime, self.peer_id, self.uid, self.timeout = runtime, peer_id, uid, timeout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return call_experts(self.runtime, [(self.peer_id, self.uid)], [x], timeout=self.timeout)[0]


async def call_peers(
    p2p: P2P,
    name: str,
    calls: Sequence[tuple[PeerID, str]],
    tensors_per_call: Sequence[Sequence[torch.Tensor]],
    timeout: float,
    *,
    enough: Callable[[list[torch.Tensor | None]], bool] | None = None,
    grace: float = 0.0,
    graph_id: int = 0,
) -> tuple[list[torch.Tensor | None], dict[PeerID, SwarmError]]:
    """One request ``name`` per peer, with that peer's calls, all in parallel: the answer tensor of each call (None
    for a call whose peer failed or was late) and why each failed peer failed.

    Waits for every peer, at most ``timeout`` seconds; with ``enough``, once ``enough(answers)`` holds, at most
    ``grace`` seconds more. A peer that has not answered by then is cancelled, as a ``DeadlineError``.
    ``graph_id``: a training forward's (``new_graph_id``), and its backward's.
    """
    by_peer: dict[PeerID, list[int]] = {}
    for i, (peer_id, _) in enumerate(calls):
        by_peer.setdefault(peer_id, []).append(i)

    async def on_peer(peer_id: PeerID, indices: list[int]) -> list[torch.Tensor]:
        tensors = [t for i in indices for t in tensors_per_call[i]]
        uids = [calls[i][1] for i in indices]
        return await rpc.call_with_tensors(
            p2p,
            peer_id,
            name,
            _TYPES,
            tensors,
            len(indices),
            uids=uids,
            timeout_ms=int(timeout * 1000),
            graph_id=graph_id,
        )

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tasks = {
        asyncio.create_task(on_peer(peer, indices)): (peer, indices) for peer, indices in by_peer.items()
    }
    pending = set(tasks)
    answers: list[torch.Tensor | None] = [None] * len(calls)
    failures: dict[PeerID, SwarmError] = {}
    try:
        while pending:
            if enough is not None and enough(answers):
                deadline, enough = min(deadline, loop.time() + grace), None
            left = deadline - loop.time()
            if left <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer, indices = tasks[task]
                try:
                    for i, tensor in zip(indices, task.result(), strict=True):
                        answers[i] = tensor
                except Exception as e:
                    failures[peer] = rpc.remote_error(e, peer)
    finally:
        for task in pending:
            task.cancel()
            failures[tasks[task][0]] = DeadlineError(f"peer {tasks[task][0]} did not answer in time")
    return answers, failures


class _ExpertCalls(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runtime: Runtime, calls, timeout: float, graph_id: int, *inputs: torch.Tensor):
        tensors = [[x.detach()] for x in inputs]
        outputs, failures = runtime.run(
            call_peers(runtime.p2p, rpc.EXPERT_FORWARD, calls, tensors, timeout, graph_id=graph_id),
            timeout + 1,
        )
        if failures:
            raise next(iter(failures.values()))
        ctx.runtime, ctx.calls, ctx.timeout, ctx.graph_id = runtime, calls, timeout, graph_id
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)  # an output without a gradient: its expert gets no backward call
        return tuple(y.to(x.device) for y, x in zip(outputs, inputs, strict=True))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        inputs = ctx.saved_tensors
        sent = [i for i, g in enumerate(grads) if g is not None]
        grad_inputs: list[torch.Tensor | None] = [None] * len(inputs)
        if sent:
            calls = [ctx.calls[i] for i in sent]
            tensors = [[inputs[i].detach(), grads[i]] for i in sent]
            answers, failures = ctx.runtime.run(
                call_peers(
                    ctx.runtime.p2p, rpc.EXPERT_BACKWARD, calls, tensors, ctx.timeout, graph_id=ctx.graph_id
                ),
                ctx.timeout + 1,
            )
            if failures:
                raise next(iter(failures.values()))
            for i, grad in zip(sent, answers, strict=True):
                grad_inputs[i] = grad.to(inputs[i].device)
        return (None, None, None, None, *grad_inputs)
