"""The stages of a SWARM training run, from a trainer's side: ``RemoteStages`` runs hidden states through them as one
autograd-aware module (SWARM Parallelism, Ryabinin et al., ICML 2023).

Shape legend: B batch (samples of a micro-batch), T tokens, D hidden size.

A run's stage peers (``swarm-peer join --train``) announce their spans under the run's key (``dht.run_model_id``).
The stages are the spans they serve: ``plan_stages`` picks a chain of spans that tiles the model's blocks, the one
whose least-served stage has the most peers. For every call, forward and backward separately, each stage's
``StageWiring`` picks the peer expected to finish first (``client.wiring``); a backward counts 2 units of work per
token on the peer that kept its forward's graph and 3 elsewhere (the forward again), so it mostly goes back to
that peer, but not to one that has become the bottleneck.

A call that fails is retried on another peer of the stage, so no micro-batch is lost: the peer is banned for
``ban_seconds`` (about as long as its DHT record outlives it, so a dead peer is not tried again) when the failure
is its own (``client.health.policy``), avoided for a moment when it was only busy, and the caller's own mistakes
are raised at once. A stage with no usable peer is looked up again, until ``retry_timeout``. Peers that have fallen
more than ``max_staleness`` optimizer steps behind their stage's most advanced peer are not used (their records
carry their step counts), so a micro-batch never mixes weights of very different ages.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence

import torch
from hivemind.p2p import PeerID
from torch import nn

from swarm_peer.client.health import policy
from swarm_peer.client.wiring import StageWiring
from swarm_peer.dht import ServerInfo, online_servers
from swarm_peer.errors import RoutingError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.protocols.stage_state import StageState, fetch_state

__all__ = ["RemoteStages", "plan_stages"]

logger = logging.getLogger(__name__)

_REFRESH_SECONDS = 10.0  # how long a look at the run's stages is used before the next
_RETRY_PAUSE = 0.5  # seconds between looks for a stage that has no usable peer
_AVOID_SECONDS = 1.0  # a peer that was busy is not chosen again for this long


def plan_stages(servers: Sequence[dict[PeerID, ServerInfo]], num_blocks: int) -> list[tuple[int, int]]:
    """The spans ``[start, end)`` that tile blocks ``[0, num_blocks)``, chosen among the spans that the records
    ``servers`` (per block, as ``online_servers`` gives them) announce: the chain whose least-served stage has the
    most peers (then the fewest stages). Raises ``RoutingError`` if the spans served do not tile the blocks."""
    peers: dict[tuple[int, int], set[PeerID]] = {}
    for block_servers in servers:
        for peer_id, info in block_servers.items():
            peers.setdefault((info.start_block, info.end_block), set()).add(peer_id)
    # best[b]: (least-served stage's peers, -stages) of the best chain covering [0, b), and that chain
    best: dict[int, tuple[tuple[float, int], list[tuple[int, int]]]] = {0: ((float("inf"), 0), [])}
    for b in range(1, num_blocks + 1):
        for (start, end), served in peers.items():
            if end != b or start not in best:
                continue
            (least, stages), chain = best[start]
            candidate = ((min(least, len(served)), stages - 1), [*chain, (start, end)])
            if b not in best or candidate[0] > best[b][0]:
                best[b] = candidate
    if num_blocks not in best:
        covered = max(best)
        raise RoutingError(f"no chain of stage peers covers blocks {covered}:{num_blocks} of the run")
    return best[num_blocks][1]


class RemoteStages(nn.Module):
    """All blocks of the run ``model_id`` (``dht.run_model_id``), as stages served by the swarm. Called as the
    blocks of a ``DistributedModelForCausalLM``: ``stages(hidden_BTD, attention_mask_BT, position_ids_BT)``.

    ``compression``: the codec of the hidden states and gradients this trainer sends (``codec.WIRES``);
    ``wiring``: the class that picks each call's peer in a stage (``StageWiring``; another policy, to compare).
    ``calls``, ``retries``: counts of calls made and of calls that failed and were retried elsewhere."""

    def __init__(
        self,
        runtime: SwarmRuntime,
        model_id: str,
        num_blocks: int,
        *,
        compression: str = "none",
        ban_seconds: float = 60.0,
        max_staleness: int = 4,
        wiring: type[StageWiring] = StageWiring,
    ):
        super().__init__()
        self.runtime, self.model_id, self.num_blocks = runtime, model_id, num_blocks
        self.compression = codec.WIRES[compression].compression
        self.ban_seconds, self.max_staleness, self.wiring = ban_seconds, max_staleness, wiring
        self.stages: list[tuple[int, int]] = []
        self.wirings: dict[tuple[int, int], StageWiring] = {}
        self.steps: dict[PeerID, int] = {}  # each listed peer's announced optimizer steps
        self.calls = self.retries = 0
        self._peers: dict[str, PeerID] = {}
        self._looked_at = -float("inf")
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        """Looks up the run's stage peers again if the last look is older than ``_REFRESH_SECONDS`` (or ``force``)."""
        with self._lock:
            if not force and time.monotonic() - self._looked_at < _REFRESH_SECONDS:
                return
            servers = online_servers(self.runtime.dht, self.model_id, range(self.num_blocks))
            stages = plan_stages(servers, self.num_blocks)
            for start, end in stages:
                listed = {
                    peer_id: info
                    for peer_id, info in servers[start].items()
                    if (info.start_block, info.end_block) == (start, end)
                }
                newest = max((info.training_step or 0) for info in listed.values())
                fresh = [
                    p
                    for p, info in listed.items()
                    if (info.training_step or 0) >= newest - self.max_staleness
                ]
                wiring = self.wirings.setdefault((start, end), self.wiring(name=f"{start}:{end}"))
                wiring.update(p.to_base58() for p in fresh)
                self._peers.update((p.to_base58(), p) for p in fresh)
                self.steps.update((p, info.training_step or 0) for p, info in listed.items())
            self.stages, self._looked_at = stages, time.monotonic()

    def forward(
        self,
        hidden_BTD: torch.Tensor,
        attention_mask_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        prompts_NBPD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if prompts_NBPD is not None:
            raise ValidationError("the stages of a training run take no prompts")
        self.refresh()
        training = torch.is_grad_enabled()  # a forward that keeps its graphs on the peers, for a backward
        for stage in self.stages:
            hidden_BTD = _StageCall.apply(
                self, stage, training, hidden_BTD, attention_mask_BT, position_ids_BT
            )
        return hidden_BTD

    def call(
        self, stage: tuple[int, int], name: str, tensors: list[torch.Tensor], work: float, *, kept: str | None = None,
        graph_id: int = 0,
    ) -> tuple[str, torch.Tensor]:  # fmt: skip
        """One forward or backward RPC to the peer of ``stage`` expected to finish first, retried on others until
        ``retry_timeout``; returns the peer (base58) and its output. ``work``: the call's size (tokens x units);
        ``kept``: the peer that kept this call's forward graph (its backward costs 2/3 there)."""
        settings = self.runtime.settings
        deadline = time.monotonic() + settings.retry_timeout
        span = swarm_pb2.Span(model_id=self.model_id, start_block=stage[0], end_block=stage[1])
        while True:
            wiring = self.wirings.get(stage)
            try:
                if wiring is None:
                    raise RoutingError(f"no peer serves blocks {stage[0]}:{stage[1]} of the run")
                sizes = {kept: work * 2 / 3} if kept is not None else None
                peer = wiring.choose(work, sizes=sizes)
            except RoutingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(_RETRY_PAUSE)
                self.refresh(force=True)
                continue
            size = work * 2 / 3 if peer == kept else work
            started = time.monotonic()
            self.calls += 1
            try:
                (output,) = self.runtime.run(
                    rpc.call_with_tensors(
                        self.runtime.p2p,
                        self._peers[peer],
                        name,
                        (swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse),
                        tensors,
                        1,
                        compression=self.compression,
                        span=span,
                        graph_id=graph_id,
                        timeout_ms=int(settings.request_timeout * 1000),
                    ),
                    timeout=settings.request_timeout + 5,
                )
            except Exception as e:
                retry, ban = policy(e)
                wiring.failed(peer, size, self.ban_seconds if ban else _AVOID_SECONDS)
                if not retry or time.monotonic() > deadline:
                    raise
                self.retries += 1
                logger.warning("Stage %d:%d: peer %s failed (%s); retrying on another", *stage, peer, e)
                continue
            wiring.done(peer, size, max(time.monotonic() - started, 1e-6))
            return peer, output

    def download(self, stage: tuple[int, int], shapes: dict[str, tuple[int, ...]]) -> StageState:
        """The current state of ``stage`` (``protocols.stage_state``), from its most advanced peer that sends it;
        ``shapes``: the stage's parameters' names and shapes. Raises ``RoutingError`` if no peer of it does."""
        self.refresh(force=True)
        span = swarm_pb2.Span(model_id=self.model_id, start_block=stage[0], end_block=stage[1])
        wiring = self.wirings.get(stage)
        peers = sorted(wiring.peers if wiring else (), key=lambda p: -self.steps.get(self._peers[p], 0))
        for peer in peers:
            try:
                return self.runtime.run(
                    fetch_state(
                        self.runtime.p2p,
                        self._peers[peer],
                        span,
                        shapes,
                        self.runtime.settings.request_timeout,
                    ),
                    timeout=self.runtime.settings.request_timeout + 5,
                )
            except Exception as e:  # another peer of the stage may send it
                logger.warning("Could not download blocks %d:%d from %s: %s", *stage, peer, e)
        raise RoutingError(f"no peer of blocks {stage[0]}:{stage[1]} sent its state")


class _StageCall(torch.autograd.Function):
    """One stage: forward on the peer its wiring picks (which keeps the graph), backward on the one it picks then."""

    @staticmethod
    def forward(
        ctx, stages: RemoteStages, stage, training: bool, hidden_BTD, attention_mask_BT, position_ids_BT
    ):
        inputs = [hidden_BTD.detach(), attention_mask_BT, position_ids_BT]
        graph_id = random.getrandbits(63) + 1 if training else 0
        tokens = hidden_BTD.shape[0] * hidden_BTD.shape[1]
        peer, output_BTD = stages.call(stage, rpc.FORWARD, inputs, tokens, graph_id=graph_id)
        ctx.stages, ctx.stage, ctx.inputs, ctx.peer, ctx.graph_id = stages, stage, inputs, peer, graph_id
        return output_BTD.to(hidden_BTD.dtype)

    @staticmethod
    def backward(ctx, grad_BTD):
        tokens = ctx.inputs[0].shape[0] * ctx.inputs[0].shape[1]
        tensors = [*ctx.inputs, grad_BTD.contiguous()]
        _, grad_in_BTD = ctx.stages.call(
            ctx.stage, rpc.BACKWARD, tensors, 3 * tokens, kept=ctx.peer, graph_id=ctx.graph_id
        )
        return None, None, None, grad_in_BTD.to(grad_BTD.dtype), None, None
