"""RemoteMixtureOfExperts: a mixture-of-experts layer whose experts live on peers (Learning@home, Ryabinin & Gusev,
NeurIPS 2020, arXiv 2002.04013).

Shape legend: B batch, D in_features (the experts' width), G grid dimensions, K experts chosen per sample, N rows
sent to experts over all calls, M chosen (sample, expert) slots, U distinct experts among them.

    layer = RemoteMixtureOfExperts(in_features=512, grid_size=(8, 8), uid_prefix="ffn.", k_best=4, k_min=1,
                                   timeout_after_k_min=1.0, initial_peers=[maddr])
    y_BD = layer(x_BD)     # backward trains the gate here and, through the peers, the experts that answered

For each sample, a linear gate scores every coordinate of every grid dimension (``proj``: D -> sum(grid_size));
an expert's score is the sum of its coordinates' scores (product-key gating), and beam search over the grid in the
DHT (``MoEBeamSearcher``) finds the ``k_best`` live experts with the best scores. The calls are grouped into one
request per peer (each expert on the rows of the samples that chose it; ``remote_expert.call_peers``), all peers
in parallel. Once every sample has ``k_min`` answers, the layer waits at most ``timeout_after_k_min`` more for the
others; whatever has not answered by then, or failed, is left out: per sample, the softmax of the scores runs over
the experts that answered, and the output is their weighted sum.

What it does where hivemind 1.1.12's layer (``hivemind.moe.client.moe.RemoteMixtureOfExperts``) does not:

- one request per peer per batch, not one per (sample, expert) pair;
- ``k_min`` holds per sample: a sample with fewer answers raises ``RoutingError`` naming it, instead of mixing an
  all-masked softmax into NaN (hivemind checks the count over the whole batch); with ``k_min=0`` such a sample's
  output is zeros, with zero gradients;
- after a failed or late call, the peer's experts are avoided for ``avoid_seconds`` (they would be chosen again until
  their records expire): beam search leaves the peer out, as if it declared nothing (not after a refusal that says
  the peer is only busy). A forward that left samples short because peers failed runs once more without those peers.

Backward sends, in parallel, each answered call's output gradient to its expert (which accumulates it and steps
its own optimizer, ``peer.experts``); a peer that fails then gives no input gradient for its calls (logged), and
is avoided as well.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import Sequence

import torch
from hivemind.p2p import PeerID
from torch import nn
from torch.autograd.function import once_differentiable

from swarm_peer.errors import MissingBlocksError, PeerError, RoutingError, ValidationError
from swarm_peer.moe.beam_search import Expert, MoEBeamSearcher
from swarm_peer.moe.remote_expert import Runtime, call_peers, new_graph_id
from swarm_peer.protocols import rpc
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings, NetworkSettings

__all__ = ["RemoteMixtureOfExperts", "RemoteSwitchMixtureOfExperts"]

logger = logging.getLogger(__name__)


class RemoteMixtureOfExperts(nn.Module):
    """A mixture of ``k_best`` of the experts on a grid ``uid_prefix`` + ``grid_size``, hosted by peers.

    It joins the swarm through ``initial_peers`` (multiaddrs of any of its peers): layers given the same ones share
    one ``SwarmRuntime.shared`` connection (a client-mode DHT node and P2P handle) for the whole process, started by
    the first (about a second; from the main thread, before CUDA or threads, as any DHT) and shut down at exit. Or
    it uses ``runtime``, a ``SwarmRuntime`` (or any object with its ``p2p``, ``dht``, ``run`` and ``settings``) that
    the caller owns; exactly one of the two.
    ``forward_timeout`` bounds a forward's calls (default ``runtime.settings.request_timeout``),
    ``backward_timeout`` a backward's (default: the same). ``beam_size``: see ``MoEBeamSearcher``;
    ``search_cache_seconds``: how long a grid prefix's DHT lookup is reused by the searches of later batches
    (``MoEBeamSearcher``'s ``cache_seconds``; 0: every batch looks the grid up).

    ``forward`` takes x_BD and returns y_BD, and leaves the batch's load-balancing loss in ``balancing_loss``
    (``_balancing_loss``; differentiable, to add to the training loss if wanted). Raises ``RoutingError`` if a
    sample got fewer than ``k_min`` answers (too few live experts, or too many failed, again after a second try
    without the peers that failed the first), ``TimeoutError`` if the DHT does not answer the search. With
    ``k_min=0`` no sample is ever short: one without answers gets zeros (what a residual connection around the
    layer passes through unchanged), and the layer waits at most ``timeout_after_k_min`` for any expert.

    A peer that failed a call in a way that says it is failing (it could not be reached, was late, or refused the
    request as malformed: ``PeerError.ban``, or not a ``PeerError``) or no longer serves the expert
    (``MissingBlocksError``) is avoided for ``avoid_seconds``; one that was only busy or hit a bug of its own
    (``BusyError``, ``InternalError``: not held against a peer, as everywhere in the client) is called again at the
    next batch.
    """

    def __init__(
        self,
        runtime: Runtime | None = None,
        *,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        k_best: int,
        k_min: int = 1,
        timeout_after_k_min: float = 1.0,
        forward_timeout: float | None = None,
        backward_timeout: float | None = None,
        avoid_seconds: float = 30.0,
        beam_size: int | None = None,
        search_cache_seconds: float = 5.0,
        initial_peers: Sequence[str] = (),
    ):
        super().__init__()
        if not 0 <= k_min <= k_best:
            raise ValidationError(f"need 0 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        if (runtime is None) == (not initial_peers):
            raise ValidationError("give the swarm's initial_peers, or a runtime (not both)")
        if runtime is None:
            peers = (initial_peers,) if isinstance(initial_peers, str) else tuple(initial_peers)
            network = NetworkSettings(initial_peers=peers, client_mode=True)
            runtime = SwarmRuntime.shared(ClientSettings(network=network))
        self.runtime = runtime
        self.searcher = MoEBeamSearcher(
            runtime.dht, uid_prefix, grid_size, cache_seconds=search_cache_seconds
        )
        self.grid_size, self.k_best, self.k_min, self.beam_size = tuple(grid_size), k_best, k_min, beam_size
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        self.timeout_after_k_min, self.avoid_seconds = timeout_after_k_min, avoid_seconds
        timeout = runtime.settings.request_timeout
        self.forward_timeout = timeout if forward_timeout is None else forward_timeout
        self.backward_timeout = self.forward_timeout if backward_timeout is None else backward_timeout
        # peer -> time.monotonic() until which its experts are not called
        self.avoided: dict[PeerID, float] = {}
        self.balancing_loss: torch.Tensor | None = None  # of the last forward
        self.failures: dict[PeerID, Exception] = {}  # why peers failed the last forward's calls
        # requests sent to peers since the layer was made (one per peer per pass), and how many failed, by pass:
        # "forward", "forward_failed", "backward", "backward_failed"
        self.requests: collections.Counter[str] = collections.Counter()

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        self.failures = {}
        try:
            return self._forward(x_BD)
        except RoutingError:
            if not self.failures:
                raise
            # peers failed during this call, and some samples were left short: once more, without the peers that
            # are failing (``avoid``; a busy one may answer this time)
            logger.info("Calling the experts again, without the peers that failed")
            return self._forward(x_BD)

    def _forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.proj.in_features:
            raise ValidationError(f"inputs must be (batch, {self.proj.in_features}), got {list(x_BD.shape)}")
        B = x_BD.shape[0]
        scores_BG = self.proj(x_BD).split(self.grid_size, dim=-1)
        chosen = self._choose(scores_BG)

        short = [b for b, experts in enumerate(chosen) if len(experts) < self.k_min]
        if short:
            raise RoutingError(f"samples {short[:8]} have fewer than k_min={self.k_min} live experts to call")
        # one call per (peer, expert), on the rows of the samples that chose it
        call_of: dict[tuple[PeerID, str], int] = {}
        rows_of_call: list[list[int]] = []
        # per sample, per chosen expert: (call, row within the call)
        slot_call: list[list[tuple[int, int]]] = []
        for b, experts in enumerate(chosen):
            slot_call.append([])
            for expert, peer in experts:
                call = call_of.setdefault((peer, expert.uid), len(call_of))
                if call == len(rows_of_call):
                    rows_of_call.append([])
                slot_call[b].append((call, len(rows_of_call[call])))
                rows_of_call[call].append(b)
        keys = list(call_of)
        inputs = [x_BD[rows] for rows in rows_of_call]
        # a leaf that requires grad, so that backward reaches the experts even when x_BD needs no gradient
        backward_hook = torch.empty(0, requires_grad=torch.is_grad_enabled())
        *outputs, answered_C = _MixtureCalls.apply(self, keys, rows_of_call, B, backward_hook, *inputs)

        K = self.k_best
        offsets = torch.tensor([0] + [len(rows) for rows in rows_of_call]).cumsum(0)
        # the last row stands for "no expert"
        flat_ND = torch.cat([*outputs, x_BD.new_zeros(1, x_BD.shape[1])])
        index_BK = torch.full((B, K), len(flat_ND) - 1, dtype=torch.long)
        alive_BK = torch.zeros(B, K, dtype=torch.bool)
        chosen_BK = torch.zeros(B, K, dtype=torch.bool)
        coords_BKG = torch.zeros(B, K, len(self.grid_size), dtype=torch.long)
        for b, slots in enumerate(slot_call):
            for i, ((call, row), (expert, _)) in enumerate(zip(slots, chosen[b], strict=True)):
                coords_BKG[b, i], chosen_BK[b, i] = torch.tensor(expert.coords), True
                if answered_C[call]:
                    index_BK[b, i], alive_BK[b, i] = offsets[call] + row, True
        short = (alive_BK.sum(1) < self.k_min).nonzero().flatten().tolist()
        if short:
            raise RoutingError(
                f"samples {short[:8]} got fewer than k_min={self.k_min} expert answers "
                f"({int(answered_C.sum())} of {len(keys)} calls answered)"
            )
        probs_BG = [scores.softmax(dim=-1) for scores in scores_BG]
        self.balancing_loss = self._balancing_loss(probs_BG, coords_BKG[chosen_BK])
        weights_BK = self._weights(scores_BG, probs_BG, coords_BKG, alive_BK)
        return (weights_BK.unsqueeze(-1) * flat_ND[index_BK]).sum(1)

    def _weights(self, scores_BG, probs_BG, coords_BKG, alive_BK) -> torch.Tensor:
        """Each chosen expert's weight in its sample's output: the softmax of the scores of those that answered."""
        logits_BK = sum(scores.gather(1, coords_BKG[:, :, d]) for d, scores in enumerate(scores_BG))
        # a sample without answers (k_min = 0) gets weights 0, not the NaN of a softmax over nothing
        none_B1 = ~alive_BK.any(dim=1, keepdim=True)
        logits_BK = logits_BK.masked_fill(~alive_BK, float("-inf")).masked_fill(none_B1, 0.0)
        return logits_BK.softmax(dim=1) * alive_BK

    def _balancing_loss(self, probs_BG, coords_MG: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's load-balancing loss (Fedus et al. 2021) over the grid, for the M chosen (sample,
        expert) slots: ``N * sum_e f_e * P_e``, N the grid's experts, f_e the share of the slots that chose e, P_e
        the gate's mean probability of e over the batch, a softmax over the whole grid: with product keys, the
        product of one softmax per dimension. 1 when both are uniform; only P_e carries a gradient."""
        experts_UG, counts_U = coords_MG.unique(dim=0, return_counts=True)
        probs_BU = math.prod(probs.index_select(1, experts_UG[:, d]) for d, probs in enumerate(probs_BG))
        share_U = counts_U / len(coords_MG)
        return math.prod(self.grid_size) * (share_U * probs_BU.mean(0)).sum()

    def _choose(self, scores_BG) -> list[list[tuple[Expert, PeerID]]]:
        """Per sample, up to ``k_best`` live experts, best first, each with the peer to call (a random one of its
        hosts that is not avoided)."""
        now = time.monotonic()
        self.avoided = {peer: until for peer, until in self.avoided.items() if until > now}
        found = self.searcher.find_best_experts(
            scores_BG, self.k_best, beam_size=self.beam_size, exclude=self.avoided
        )
        return [[(expert, random.choice(expert.peers)) for expert in experts] for experts in found]

    def avoid(self, failures: dict[PeerID, Exception]) -> None:
        """Leaves the peers that failed out of the next searches, for ``avoid_seconds``, unless only busy."""
        until = time.monotonic() + self.avoid_seconds
        for peer, error in failures.items():
            if _is_failing(error):
                self.avoided[peer] = until


def _is_failing(error: Exception) -> bool:
    """Whether a peer's failure says that calling it again soon would fail too (see ``RemoteMixtureOfExperts``)."""
    return not isinstance(error, PeerError) or error.ban or isinstance(error, MissingBlocksError)


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    """The switch-style variant (Switch Transformer, Fedus et al. 2021): each sample goes to its one best live expert,
    whose output is weighted by the gate's probability of that expert over the whole grid, so the gate learns from
    the output as well; add ``balancing_loss`` (times a small factor, e.g. 0.01) to the training loss to spread the
    samples over the experts. Arguments as ``RemoteMixtureOfExperts``, but for ``k_best`` and ``k_min`` (both 1)."""

    def __init__(self, runtime: Runtime | None = None, **kwargs):
        super().__init__(runtime, k_best=1, k_min=1, **kwargs)

    def _weights(self, scores_BG, probs_BG, coords_BKG, alive_BK) -> torch.Tensor:
        probs_BK = math.prod(probs.gather(1, coords_BKG[:, :, d]) for d, probs in enumerate(probs_BG))
        return probs_BK.masked_fill(~alive_BK, 0.0)


class _MixtureCalls(torch.autograd.Function):
    """The experts' outputs for each call (zeros for a call that failed), and which calls answered."""

    @staticmethod
    def forward(ctx, layer: RemoteMixtureOfExperts, calls, rows_of_call, batch_size: int, _hook, *inputs):
        def enough(answers: list) -> bool:
            count = [0] * batch_size
            for answer, rows in zip(answers, rows_of_call, strict=True):
                if answer is not None:
                    for b in rows:
                        count[b] += 1
            return min(count) >= layer.k_min

        tensors = [[x.detach()] for x in inputs]
        timeout, graph_id = layer.forward_timeout, new_graph_id(_hook.requires_grad)
        answers, failures = layer.runtime.run(
            call_peers(
                layer.runtime.p2p,
                rpc.EXPERT_FORWARD,
                calls,
                tensors,
                timeout,
                enough=enough,
                grace=layer.timeout_after_k_min,
                graph_id=graph_id,
            ),
            timeout + 1,
        )
        layer.requests.update(forward=len({peer for peer, _ in calls}), forward_failed=len(failures))
        if failures:
            logger.info("Expert calls failed: %s", "; ".join(map(str, failures.values())))
            layer.failures.update(failures)
            layer.avoid(failures)
        answered = [answer is not None for answer in answers]
        ctx.layer, ctx.calls, ctx.answered, ctx.graph_id = layer, calls, answered, graph_id
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        answered_C = torch.tensor(answered, dtype=torch.bool)
        ctx.mark_non_differentiable(answered_C)
        outputs = [y if y is not None else torch.zeros_like(x) for y, x in zip(answers, inputs, strict=True)]
        return (*outputs, answered_C)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        inputs, layer = ctx.saved_tensors, ctx.layer
        sent = [i for i, g in enumerate(grads[:-1]) if g is not None and ctx.answered[i]]
        grad_inputs: list[torch.Tensor | None] = [None] * len(inputs)
        if sent:
            calls = [ctx.calls[i] for i in sent]
            tensors = [[inputs[i].detach(), grads[i]] for i in sent]
            timeout = layer.backward_timeout
            answers, failures = layer.runtime.run(
                call_peers(
                    layer.runtime.p2p, rpc.EXPERT_BACKWARD, calls, tensors, timeout, graph_id=ctx.graph_id
                ),
                timeout + 1,
            )
            layer.requests.update(backward=len({peer for peer, _ in calls}), backward_failed=len(failures))
            if failures:
                logger.info("Expert backward calls failed: %s", "; ".join(map(str, failures.values())))
                layer.avoid(failures)
            for i, grad in zip(sent, answers, strict=True):
                grad_inputs[i] = grad
        return (None, None, None, None, None, *grad_inputs)
