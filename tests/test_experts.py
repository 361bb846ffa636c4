"""Experts hosted by peers (``swarm-peer join --experts``) and called through ``swarm_peer.moe.call_experts``.

Real peers on 127.0.0.1: two that the tests of this module share (``ffn`` experts, ``transformer`` experts), and one
that is killed and restarted. Remote outputs, input gradients and optimizer updates are compared with the same
experts built locally (``create_expert``: every expert of a uid starts from the same weights).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import PeerID

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.dht import get_experts
from swarm_peer.errors import (
    BusyError,
    DeadlineError,
    InternalError,
    MissingBlocksError,
    PeerError,
    RoutingError,
    ValidationError,
)
from swarm_peer.moe import (
    MoEBeamSearcher,
    RemoteMixtureOfExperts,
    RemoteSwitchMixtureOfExperts,
    call_experts,
    create_expert,
    expand_grid,
    register_expert_type,
)
from swarm_peer.peer.experts import HostedExpert
from swarm_peer.protocols import rpc, swarm_pb2
from swarm_peer.settings import ExpertSettings

from .conftest import run_cli, table_row, wait_until

START = 120.0  # seconds a peer may take to start, on 2 busy cores
FFN, TF = 16, 32  # widths of the shared peers' experts
# an update after 16 samples: the mixture tests' backward calls together bring fewer to any ``mx`` expert
LR, UPDATE_EVERY, MAX_ROWS = 1e-2, 16, 64


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A bootstrap node, a peer of 16 ``ffn`` experts (grids ``ffn`` and ``mx``, the mixture layer's), a peer of 2
    ``transformer`` experts, and a client."""
    log_dir = str(tmp_path_factory.mktemp("logs"))
    with LocalSwarm("", [], env={"OMP_NUM_THREADS": "1"}, log_dir=log_dir, start_timeout=START) as local:
        common = ["--announce-period", "30", "--lr", str(LR), "--update-every", str(UPDATE_EVERY)]
        ffn, tf = local.add_expert_peers(
            ["--experts", "ffn.[0:2].[0:4]", "--experts", "mx.[0:2].[0:4]", "--hidden", str(FFN),
             "--max-batch-tokens", str(MAX_ROWS), *common],
            ["--experts", "tf.[0:2]", "--expert-type", "transformer", "--hidden", str(TF), *common],
        )  # fmt: skip
        with local.runtime(request_timeout=30) as runtime:
            yield SimpleNamespace(
                local=local,
                runtime=runtime,
                ffn=PeerID.from_base58(ffn.peer_id),
                tf=PeerID.from_base58(tf.peer_id),
            )


def _local(expert_type: str, hidden: int, uid: str) -> HostedExpert:
    """The expert ``uid`` as a peer builds it, with the shared peers' optimizer settings."""
    settings = ExpertSettings(
        uids=(uid,), expert_type=expert_type, hidden=hidden, lr=LR, update_every=UPDATE_EVERY
    )
    return HostedExpert(uid, settings)


def _forward_backward(runtime, calls, inputs, grads) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and input gradients of remote experts, through ``call_experts`` and autograd."""
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    outputs = call_experts(runtime, calls, inputs)
    torch.autograd.backward(outputs, grads)
    return [y.detach() for y in outputs], [x.grad for x in inputs]


def test_outputs_and_input_gradients_equal_local_experts(swarm):
    """Three ffn experts and two transformer experts on two peers, in one call (one request per peer)."""
    torch.manual_seed(0)
    calls = [
        (swarm.ffn, "ffn.0.0"),
        (swarm.tf, "tf.0"),
        (swarm.ffn, "ffn.0.1"),
        (swarm.ffn, "ffn.0.0"),  # the same expert twice in one request, on other samples
        (swarm.tf, "tf.1"),
    ]
    inputs = [
        torch.randn(3, FFN),
        torch.randn(2, 5, TF),
        torch.randn(4, FFN),
        torch.randn(1, FFN),
        torch.randn(1, 7, TF),
    ]
    grads = [torch.randn_like(x) for x in inputs]  # fewer than UPDATE_EVERY samples per expert: no step
    outputs, grad_inputs = _forward_backward(swarm.runtime, calls, inputs, grads)
    for (peer, uid), x, g, y, gx in zip(calls, inputs, grads, outputs, grad_inputs, strict=True):
        expert = _local("ffn", FFN, uid) if peer == swarm.ffn else _local("transformer", TF, uid)
        x = x.clone().requires_grad_(True)
        y_local = expert.module(x)
        y_local.backward(g)
        assert y.shape == x.shape
        torch.testing.assert_close(y, y_local.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)


def test_expert_steps_after_update_every_samples_as_a_local_adamw(swarm):
    uid = "ffn.1.0"
    expert = _local("ffn", FFN, uid)
    initial = copy.deepcopy(expert.module)
    torch.manual_seed(1)
    probe = torch.randn(5, FFN)
    # 10 samples: fewer than UPDATE_EVERY, the expert has not stepped yet
    x1, g1 = torch.randn(10, FFN), torch.randn(10, FFN)
    _forward_backward(swarm.runtime, [(swarm.ffn, uid)], [x1], [g1])
    expert.backward((x1,), g1)
    assert expert.steps == 0
    (before,) = call_experts(swarm.runtime, [(swarm.ffn, uid)], [probe])
    torch.testing.assert_close(before, initial(probe).detach(), atol=1e-6, rtol=1e-6)
    # 10 more: 20 >= UPDATE_EVERY, one AdamW step on the sum of both calls' gradients
    x2, g2 = torch.randn(10, FFN), torch.randn(10, FFN)
    _forward_backward(swarm.runtime, [(swarm.ffn, uid)], [x2], [g2])
    expert.backward((x2,), g2)
    assert expert.steps == 1
    (after,) = call_experts(swarm.runtime, [(swarm.ffn, uid)], [probe])
    torch.testing.assert_close(after, expert.forward(probe), atol=1e-6, rtol=1e-6)
    assert (after - before).abs().max() > 1e-3  # the step did change the expert


def test_bad_requests_are_refused_and_the_peer_keeps_serving(swarm):
    uid, probe = "ffn.1.1", torch.randn(2, FFN)
    expected = _local("ffn", FFN, uid).forward(probe)

    def still_serves() -> None:
        (y,) = call_experts(swarm.runtime, [(swarm.ffn, uid)], [probe])
        torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)

    bad_forwards = [
        (
            [(swarm.ffn, uid)],
            [torch.randn(2, FFN + 1)],
            ValidationError,
            "must be floating-point (batch, 16)",
        ),
        ([(swarm.ffn, uid)], [torch.randn(2, 3, FFN)], ValidationError, "must be floating-point (batch, 16)"),
        ([(swarm.ffn, uid)], [torch.ones(2, FFN, dtype=torch.int64)], ValidationError, "floating-point"),
        ([(swarm.ffn, uid)], [torch.full((2, FFN), float("nan"))], ValidationError, "NaN"),
        ([(swarm.ffn, uid)], [torch.randn(MAX_ROWS + 1, FFN)], ValidationError, f"limit of {MAX_ROWS} rows"),
        ([(swarm.ffn, "ffn.7.7")], [probe], MissingBlocksError, "'ffn.7.7' is not served here"),
        ([(swarm.tf, "tf.0")], [torch.randn(2, TF)], ValidationError, "(batch, tokens, 32)"),
    ]
    for calls, inputs, error, message in bad_forwards:
        with pytest.raises(error, match=re.escape(message)):
            call_experts(swarm.runtime, calls, inputs)
        still_serves()

    # a gradient of another shape than its inputs, refused from its declared shape
    with pytest.raises(
        ValidationError, match=re.escape("of the inputs' shape [2, 16], got torch.float32 [3, 16]")
    ):
        rpc_call(swarm, rpc.EXPERT_BACKWARD, [uid], [probe, torch.randn(3, FFN)])
    still_serves()

    # NaN gradients, in requests that together bring more samples than an update: all refused, nothing accumulated
    for _ in range(2):
        y = call_experts(
            swarm.runtime, [(swarm.ffn, uid)], [torch.randn(UPDATE_EVERY, FFN, requires_grad=True)]
        )[0]
        with pytest.raises(ValidationError, match="gradients of ffn.1.1 contain NaN"):
            y.backward(torch.full_like(y, float("nan")))
        still_serves()

    # control: the same expert without the peer's checks takes the NaN gradient, steps, and is NaN from then on
    unchecked = _local("ffn", FFN, uid)
    unchecked.backward((torch.randn(UPDATE_EVERY, FFN),), torch.full((UPDATE_EVERY, FFN), float("nan")))
    assert unchecked.steps == 1 and unchecked.forward(probe).isnan().all()


def test_a_training_forward_keeps_its_graphs_for_a_backward_at_the_same_weights(swarm):
    """With inputs that need grad, the peer keeps each call's graph (charged its activations) until the backward
    takes it, and keeps none without. A backward after the expert stepped computes at the new weights, as a local
    expert does: a kept graph of the old weights would give other gradients."""
    uid, runtime = "ffn.1.2", swarm.runtime

    def graphs_mb_left() -> float:
        call = runtime.p2p.call_protobuf_handler(
            swarm.ffn, rpc.INFO, swarm_pb2.InfoRequest(), swarm_pb2.InfoResponse
        )
        return json.loads(runtime.run(call).info_json)["graph_cache_mb_left"]

    full, expert = graphs_mb_left(), _local("ffn", FFN, uid)
    torch.manual_seed(4)
    x = torch.randn(6, FFN, requires_grad=True)
    with torch.no_grad():
        call_experts(runtime, [(swarm.ffn, uid)], [x])
    assert graphs_mb_left() == full
    (y,) = call_experts(runtime, [(swarm.ffn, uid)], [x])
    kept = (full - graphs_mb_left()) * 2**20
    assert 6 * 4 * FFN * 4 <= kept <= 100 * 6 * 4 * FFN * 4  # the 4x wide hidden activations, at least
    y.backward(g := torch.randn(6, FFN))
    assert graphs_mb_left() == full
    torch.testing.assert_close(x.grad, expert.backward((x.detach(),), g), atol=1e-6, rtol=1e-6)

    # a kept forward, then 16 samples step the expert, then the kept forward's backward: at the new weights
    x.grad = None
    (y,) = call_experts(runtime, [(swarm.ffn, uid)], [x])
    x2, g2 = torch.randn(UPDATE_EVERY, FFN), torch.randn(UPDATE_EVERY, FFN)
    _forward_backward(runtime, [(swarm.ffn, uid)], [x2], [g2])
    stale = copy.deepcopy(expert).backward((x.detach(),), g)  # what the old weights' graph would give
    expert.backward((x2,), g2)
    assert expert.steps == 1
    y.backward(g)
    torch.testing.assert_close(x.grad, expert.backward((x.detach(),), g), atol=1e-6, rtol=1e-6)
    assert (x.grad - stale).abs().max() > 1e-4  # control: the step did change the gradient


def rpc_call(swarm, name: str, uids: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A raw expert RPC to the ``ffn`` peer, for requests ``call_experts`` would never make."""
    types = swarm_pb2.ExpertRequest, swarm_pb2.ExpertResponse
    call = rpc.call_with_tensors(swarm.runtime.p2p, swarm.ffn, name, types, tensors, len(uids), uids=uids)
    return swarm.runtime.run(call)


def test_restarted_peer_serves_its_trained_experts_and_is_found_again(swarm, tmp_path):
    """kill -9 after an update, restart with the same --identity and --checkpoint-dir: the same peer id is found
    through the DHT and serves the trained weights, and its next update continues the optimizer's state."""
    runtime, dht = swarm.runtime, swarm.runtime.dht
    args = [
        "--experts", "rst.[0:2]", "--hidden", "8", "--lr", "0.05", "--update-every", "4",
        "--identity", str(tmp_path / "peer.key"), "--checkpoint-dir", str(tmp_path / "experts"),
        "--checkpoint-period", "0", "--announce-period", "30",
    ]  # fmt: skip
    first = swarm.local.add_expert_peers(args)[0]
    peer = PeerID.from_base58(first.peer_id)
    assert wait_until(lambda: get_experts(dht, ["rst.1"])["rst.1"] == (peer,), timeout=30)

    settings = ExpertSettings(uids=("rst.1",), hidden=8, lr=0.05, update_every=4)
    expert, fresh = HostedExpert("rst.1", settings), create_expert("ffn", 8, "rst.1")
    torch.manual_seed(2)
    probe, x1, g1, x2, g2 = (torch.randn(4, 8) for _ in range(5))
    _forward_backward(runtime, [(peer, "rst.1")], [x1], [g1])  # 4 samples: one update, saved at once
    expert.backward((x1,), g1)

    os.killpg(first.process.pid, signal.SIGKILL)  # no clean exit: what the update saved is all there is
    first.process.wait(10)
    # control for the withdrawal below: a killed peer's records stay until they expire
    assert get_experts(dht, ["rst.1"])["rst.1"] == (peer,)

    second = swarm.local.add_expert_peers(args)[0]
    assert second.peer_id == first.peer_id
    (y,) = call_experts(runtime, [(peer, "rst.1")], [probe])
    torch.testing.assert_close(y, expert.forward(probe), atol=1e-6, rtol=1e-6)
    assert (y - fresh(probe)).abs().max() > 1e-3  # control: a peer that lost its state would serve these
    _forward_backward(
        runtime, [(peer, "rst.1")], [x2], [g2]
    )  # the second update uses the restored AdamW moments
    expert.backward((x2,), g2)
    (y,) = call_experts(runtime, [(peer, "rst.1")], [probe])
    torch.testing.assert_close(y, expert.forward(probe), atol=1e-6, rtol=1e-6)

    found = MoEBeamSearcher(dht, "rst.", grid_size=(2,)).find_best_experts([torch.tensor([[0.0, 1.0]])], k=2)
    assert [(e.uid, e.peers) for e in found[0]] == [("rst.1", (peer,)), ("rst.0", (peer,))]

    _forward_backward(runtime, [(peer, "rst.1")], [x1[:2]], [g1[:2]])  # 2 samples: accumulated, not stepped
    expert.backward((x1[:2],), g1[:2])
    second.terminate(30)  # a clean exit withdraws the experts: gone long before their records expire (60 s)
    assert wait_until(lambda: get_experts(dht, ["rst.0", "rst.1"]) == {"rst.0": (), "rst.1": ()}, timeout=10)
    # and saves what changed since the last save: the gradient accumulated by the last call
    saved = torch.load(tmp_path / "experts" / "rst.1.pt", weights_only=True)
    assert (saved["steps"], saved["samples"]) == (2, 2)
    for name, param in expert.module.named_parameters():
        torch.testing.assert_close(saved["grads"][name], param.grad)


def test_replicas_of_an_expert_average_their_weights(swarm):
    """Two peers host the same uids with --average-every 8. Each trains its replica of rep.0 on other samples (8:
    two AdamW steps), then both serve the mean of the two: the same two replicas trained locally, averaged.
    Control: rep.1's replicas, 4 samples each (fewer than --average-every), stay two different experts."""
    runtime, dht = swarm.runtime, swarm.runtime.dht
    args = [
        "--experts", "rep.[0:2]", "--hidden", "8", "--lr", "0.05", "--update-every", "4", "--average-every", "8",
        "--averaging-timeout", "10", "--announce-period", "30",
    ]  # fmt: skip
    peers = [PeerID.from_base58(p.peer_id) for p in swarm.local.add_expert_peers(args, args)]
    assert wait_until(lambda: sorted(get_experts(dht, ["rep.0"])["rep.0"]) == sorted(peers), timeout=30)
    settings = ExpertSettings(uids=("rep.0", "rep.1"), hidden=8, lr=0.05, update_every=4)
    local = {(peer, uid): HostedExpert(uid, settings) for peer in peers for uid in ("rep.0", "rep.1")}
    torch.manual_seed(3)
    probe = torch.randn(4, 8)

    def train(peer, uid, samples):
        x, g = torch.randn(samples, 8), torch.randn(samples, 8)
        _forward_backward(runtime, [(peer, uid)], [x], [g])
        local[peer, uid].backward((x,), g)

    for peer in peers:
        train(peer, "rep.1", 4)
    for _ in range(2):  # the second call makes each replica of rep.0 due: they average
        for peer in peers:
            train(peer, "rep.0", 4)
    mean = copy.deepcopy(local[peers[0], "rep.0"].module)
    with torch.no_grad():
        for p, q in zip(mean.parameters(), local[peers[1], "rep.0"].module.parameters(), strict=True):
            p.add_(q).div_(2)

    def served(uid):
        return [call_experts(runtime, [(peer, uid)], [probe])[0] for peer in peers]

    assert wait_until(lambda: torch.equal(*served("rep.0")), timeout=30)
    for y in served("rep.0"):
        torch.testing.assert_close(y, mean(probe).detach(), atol=1e-5, rtol=1e-5)
    for y, peer in zip(served("rep.1"), peers, strict=True):  # the control
        torch.testing.assert_close(y, local[peer, "rep.1"].forward(probe), atol=1e-6, rtol=1e-6)
    assert (served("rep.1")[0] - served("rep.1")[1]).abs().max() > 1e-3


def _local_mixture(proj, grid_size, k: int, x_BD: torch.Tensor, live: dict[str, torch.nn.Module]):
    """A mixture layer's output computed here: the softmax over the brute-force top ``k`` of the summed scores of
    the ``live`` experts."""
    s0, s1 = proj(x_BD).split(grid_size, dim=-1)
    outputs = []
    for b in range(x_BD.shape[0]):
        score = {uid: s0[b, int(uid.split(".")[1])] + s1[b, int(uid.split(".")[2])] for uid in live}
        best = sorted(live, key=lambda uid: -float(score[uid].detach()))[:k]
        weights = torch.stack([score[uid] for uid in best]).softmax(0)
        outputs.append(sum(w * live[uid](x_BD[b : b + 1])[0] for w, uid in zip(weights, best, strict=True)))
    return torch.stack(outputs)


class CountingP2P:
    """The client's P2P handle, counting the RPCs it makes by name (a seam: ``call_experts`` and the layer take any
    runtime with ``p2p``, ``dht``, ``run`` and ``settings``)."""

    def __init__(self, p2p):
        self.p2p, self.calls = p2p, collections.Counter()

    async def call_protobuf_handler(self, peer_id, name, *args, **kwargs):
        self.calls[name] += 1
        return await self.p2p.call_protobuf_handler(peer_id, name, *args, **kwargs)

    async def iterate_protobuf_handler(self, peer_id, name, *args, **kwargs):
        self.calls[name] += 1
        return await self.p2p.iterate_protobuf_handler(peer_id, name, *args, **kwargs)


def test_mixture_equals_the_same_gate_and_experts_computed_locally(swarm):
    """6 samples x 3 experts of 8, all on one peer: one forward request and one backward request in all."""
    torch.manual_seed(3)
    p2p = CountingP2P(swarm.runtime.p2p)
    runtime = SimpleNamespace(
        p2p=p2p, dht=swarm.runtime.dht, run=swarm.runtime.run, settings=swarm.runtime.settings
    )
    layer = RemoteMixtureOfExperts(runtime, in_features=FFN, grid_size=(2, 4), uid_prefix="mx.", k_best=3)
    x = torch.randn(6, FFN, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert p2p.calls == {rpc.EXPERT_FORWARD: 1, rpc.EXPERT_BACKWARD: 1}
    proj = copy.deepcopy(layer.proj)
    proj.zero_grad()
    experts = {uid: create_expert("ffn", FFN, uid) for uid in expand_grid("mx.[0:2].[0:4]")}
    x_local = x.detach().clone().requires_grad_(True)
    y_local = _local_mixture(proj, (2, 4), 3, x_local, experts)
    y_local.backward(grad)
    torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        s0, s1 = proj(x_local).split((2, 4), dim=-1)
        score = lambda b, uid: float(s0[b, int(uid.split(".")[1])] + s1[b, int(uid.split(".")[2])])  # noqa: E731
        chosen = [sorted(experts, key=lambda uid: -score(b, uid))[:3] for b in range(6)]
        loss_local = _local_balancing_loss(proj, (2, 4), x_local, chosen)
    torch.testing.assert_close(layer.balancing_loss.detach(), loss_local, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x_local.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.proj.weight.grad, proj.weight.grad, atol=1e-5, rtol=1e-5)


def test_mixture_made_from_initial_peers_alone(swarm):
    """Issue #21's call: the layer joins the swarm from its multiaddrs (a connection shared by the layers given the
    same ones) and computes what the same gate and experts compute here. Forward only: no expert learns from it."""
    initial_peers = swarm.local.initial_peers
    grid = dict(in_features=FFN, grid_size=(2, 4), uid_prefix="mx.")
    kwargs = dict(grid, k_best=3, k_min=1, timeout_after_k_min=1.0)
    layer = RemoteMixtureOfExperts(**kwargs, initial_peers=initial_peers)
    assert RemoteSwitchMixtureOfExperts(**grid, initial_peers=initial_peers).runtime is layer.runtime
    assert layer.runtime is not swarm.runtime and layer.runtime.settings.network.client_mode
    torch.manual_seed(6)
    x = torch.randn(5, FFN)
    with torch.no_grad():
        y = layer(x)
        experts = {uid: create_expert("ffn", FFN, uid) for uid in expand_grid("mx.[0:2].[0:4]")}
        torch.testing.assert_close(y, _local_mixture(layer.proj, (2, 4), 3, x, experts), atol=1e-5, rtol=1e-5)
    for runtime, peers in ((None, ()), (swarm.runtime, initial_peers)):
        with pytest.raises(ValidationError, match="give the swarm's initial_peers, or a runtime"):
            RemoteMixtureOfExperts(runtime, **kwargs, initial_peers=peers)


def _local_balancing_loss(proj, grid_size, x_BD: torch.Tensor, chosen: list[list[str]]) -> torch.Tensor:
    """Switch's load-balancing loss computed densely: N * sum_e f_e * P_e, P_e a softmax over every expert."""
    s0, s1 = proj(x_BD).split(grid_size, dim=-1)
    probs_BE = (s0[:, :, None] + s1[:, None, :]).flatten(1).softmax(-1)  # e = i * grid_size[1] + j
    slots = [uid for uids in chosen for uid in uids]
    share_E = torch.zeros(probs_BE.shape[1])
    for uid in slots:
        _, i, j = uid.split(".")
        share_E[int(i) * grid_size[1] + int(j)] += 1 / len(slots)
    return probs_BE.shape[1] * (share_E * probs_BE.mean(0)).sum()


def test_switch_mixture_equals_a_local_switch_layer(swarm):
    """Top-1 routing, weighted by the gate's probability over the whole grid; the balancing loss trains the gate."""
    torch.manual_seed(5)
    layer = RemoteSwitchMixtureOfExperts(swarm.runtime, in_features=FFN, grid_size=(2, 4), uid_prefix="mx.")
    x = torch.randn(6, FFN, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    ((y * grad).sum() + layer.balancing_loss).backward()

    proj = copy.deepcopy(layer.proj)
    proj.zero_grad()
    x_local = x.detach().clone().requires_grad_(True)
    s0, s1 = proj(x_local).split((2, 4), dim=-1)
    probs_B8 = (s0[:, :, None] + s1[:, None, :]).flatten(1).softmax(-1)
    best = probs_B8.argmax(-1).tolist()
    uids = [f"mx.{e // 4}.{e % 4}" for e in best]
    y_local = torch.stack(
        [
            probs_B8[b, e] * create_expert("ffn", FFN, uid)(x_local[b : b + 1])[0]
            for b, (e, uid) in enumerate(zip(best, uids, strict=True))
        ]
    )
    loss_local = _local_balancing_loss(proj, (2, 4), x_local, [[uid] for uid in uids])
    ((y_local * grad).sum() + loss_local).backward()
    torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.balancing_loss, loss_local, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x_local.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.proj.weight.grad, proj.weight.grad, atol=1e-5, rtol=1e-5)


def test_mixture_cuts_slow_experts_avoids_failed_peers_and_never_returns_nan(swarm):
    """A peer whose experts (rows 2, 3 of the grid) answer 3 s late, then are killed: late experts are cut after
    ``timeout_after_k_min``; samples whose experts all failed are computed again without the failed peer, which the
    layer avoids from then on (its records are still in the DHT); without that, they raise, never mix NaN."""
    (slow,) = swarm.local.add_expert_peers(
        [
            "--experts",
            "mx.[2:4].[0:4]",
            "--hidden",
            str(FFN),
            "--update-every",
            "1000000",
            "--added-latency",
            "3",
        ]
    )
    dht = swarm.runtime.dht
    assert wait_until(lambda: all(get_experts(dht, ["mx.2.0", "mx.0.0"]).values()), timeout=30)
    experts = {uid: create_expert("ffn", FFN, uid) for uid in expand_grid("mx.[0:2].[0:4]")}

    def layer(**kwargs) -> RemoteMixtureOfExperts:
        layer = RemoteMixtureOfExperts(
            swarm.runtime,
            in_features=FFN,
            grid_size=(4, 4),
            uid_prefix="mx.",
            k_best=4,
            forward_timeout=10,
            **kwargs,
        )
        with (
            torch.no_grad()
        ):  # the first coordinate's scores: 5 * x[0] * (-1, -1, 1, 1); x[0] > 0 picks rows 2, 3
            layer.proj.weight[:4].zero_()
            layer.proj.weight[:4, 0] = torch.tensor([-5.0, -5.0, 5.0, 5.0])
            layer.proj.bias[:4].zero_()
        return layer

    torch.manual_seed(4)
    mixed = torch.randn(4, FFN)
    mixed[:, 0] = 0.0  # every sample's experts on both peers
    cutting = layer(timeout_after_k_min=0.5)
    t0 = time.monotonic()
    y = cutting(mixed)
    assert time.monotonic() - t0 < 2.5  # the slow peer's answers (3 s) were not waited for
    # what the others answered, mixed by the softmax over their scores alone
    with torch.no_grad():
        s0, s1 = cutting.proj(mixed).split((4, 4), dim=-1)
    for b in range(4):
        top4 = sorted(
            ((i, j) for i in range(4) for j in range(4)), key=lambda c: -float(s0[b, c[0]] + s1[b, c[1]])
        )[:4]
        alive = [(i, j) for i, j in top4 if i < 2]
        weights = torch.stack([s0[b, i] + s1[b, j] for i, j in alive]).softmax(0)
        expected = sum(
            w * experts[f"mx.{i}.{j}"](mixed[b : b + 1])[0] for w, (i, j) in zip(weights, alive, strict=True)
        )
        torch.testing.assert_close(y[b], expected, atol=1e-5, rtol=1e-5)

    os.killpg(slow.process.pid, signal.SIGKILL)
    slow.process.wait(10)
    x = torch.randn(3, FFN)
    x[:, 0] = torch.tensor([1.0, -1.0, 1.0])  # samples 0 and 2: every expert on the dead peer
    # samples 0 and 2 are left without answers: the layer searches again without the dead peer, and all samples get
    # answers, and gradients, none NaN; the dead peer is avoided from then on
    plain = layer()
    y = plain(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(plain.proj.weight.grad).all()
    assert list(plain.avoided) == [PeerID.from_base58(slow.peer_id)]
    # control: a layer that does not avoid failed peers keeps choosing the dead one's experts (their records live on)
    # and its short samples raise, instead of mixing an all-failed softmax into NaN (which the softmax alone would)
    with pytest.raises(RoutingError, match=re.escape("samples [0, 2] got fewer than k_min=1 expert answers")):
        layer(avoid_seconds=0.0)(x)
    assert torch.full((1, 4), float("-inf")).softmax(1).isnan().all()
    # with k_min=0, the same samples get zeros (what a residual connection passes through) and zero gradients
    x.requires_grad_(True)
    y = layer(avoid_seconds=0.0, k_min=0)(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and y[1].abs().sum() > 0 and x.grad[1].abs().sum() > 0
    assert (y[[0, 2]] == 0).all() and (x.grad[[0, 2]] == 0).all()
    # a grid whose experts were all on the dead peer: a clear error, before and after the second search
    only_dead = RemoteMixtureOfExperts(
        swarm.runtime, in_features=FFN, grid_size=(4,), uid_prefix="mx.2.", k_best=2
    )
    with pytest.raises(
        RoutingError, match=re.escape("samples [0, 1, 2] have fewer than k_min=1 live experts")
    ):
        only_dead(x)


def test_status_lists_the_peers_of_expert_grids(swarm):
    """``swarm-peer status --experts``: per pattern, how many of its experts have a host that answers, and a row per
    host; a peer killed with kill -9 still has records, but is shown UNREACHABLE and serves nothing (exit 1)."""
    (dead,) = swarm.local.add_expert_peers(["--experts", "st.[0:2]", "--hidden", "4"])
    assert wait_until(lambda: all(get_experts(swarm.runtime.dht, ["st.0", "st.1"]).values()), timeout=30)
    os.killpg(dead.process.pid, signal.SIGKILL)
    dead.process.wait(10)
    peers = ["--initial-peers", *swarm.local.initial_peers, "--timeout", "30"]
    result = run_cli("status", "--experts", "ffn.[0:2].[0:4]", "--experts", "st.[0:3]", *peers, timeout=90)
    assert result.returncode == 1, result.stderr
    assert table_row(result.stdout, "ffn.[0:2].[0:4]").split()[1:] == [
        "8",
        "8",
        "ffn.0.0",
        "ffn.1.3",
        "served",
    ]
    ffn = swarm.ffn.to_base58()[:6]
    assert table_row(result.stdout, ffn, "ffn.0.0").split()[1:] == ["8", "ffn.0.0", "ffn.1.3", "ONLINE"]
    assert table_row(result.stdout, "st.[0:3]").split()[1:] == ["0", "3", "—", "—", "GAPS"]
    assert table_row(result.stdout, dead.peer_id[:6]).split()[1:] == ["2", "st.0", "st.1", "UNREACHABLE"]
    assert "st.[0:3]: some experts have no host that answers" in result.stderr
    result = run_cli("status", "--experts", "ffn.[0:2].[0:4]", *peers, timeout=90)
    assert result.returncode == 0, result.stderr


def test_a_layer_avoids_failing_peers_not_busy_ones():
    """What a peer's failure says decides whether the layer leaves it out of the next searches (``PeerError.ban``,
    and a peer that no longer serves the expert), as the client decides bans. No swarm: the layer's runtime is any
    object with ``dht`` and ``settings``, and ``avoid`` takes the failures of a call."""
    runtime = SimpleNamespace(dht=None, settings=SimpleNamespace(request_timeout=5.0))
    layer = RemoteMixtureOfExperts(runtime, in_features=4, grid_size=(2,), uid_prefix="x.", k_best=1, k_min=0)
    layer.avoid(
        {
            "busy": BusyError("busy"),
            "bug": InternalError("a bug of its own"),
            "dead": PeerError("connection lost"),
            "late": DeadlineError("late"),
            "gone": MissingBlocksError("not served here"),
            "odd": ValidationError("malformed answer"),
        }
    )
    assert sorted(layer.avoided) == ["dead", "gone", "late", "odd"]
    with pytest.raises(ValidationError, match="need 0 <= k_min <= k_best"):
        RemoteMixtureOfExperts(runtime, in_features=4, grid_size=(2,), uid_prefix="x.", k_best=1, k_min=2)


def test_expert_types_and_grids():
    assert expand_grid("ffn.[0:2].[3:5]") == ["ffn.0.3", "ffn.0.4", "ffn.1.3", "ffn.1.4"]
    assert expand_grid("ffn.5.[0:2]") == ["ffn.5.0", "ffn.5.1"]
    for bad in ("ffn.[2:2]", "ffn.[0:8].x", "ffn", "f f.[0:2]", "ffn.[0:4097]"):
        with pytest.raises(ValidationError):
            expand_grid(bad)
    # the same uid and seed, the same weights; another uid or seed, others
    a, b = create_expert("ffn", 8, "ffn.0.1"), create_expert("ffn", 8, "ffn.0.1")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.w1.weight, create_expert("ffn", 8, "ffn.0.2").w1.weight)
    assert not torch.equal(a.w1.weight, create_expert("ffn", 8, "ffn.0.1", seed=1).w1.weight)
    # a user's expert type
    register_expert_type(
        "test_scale", lambda hidden: torch.nn.Linear(hidden, hidden, bias=False), input_dims=2
    )
    assert create_expert("test_scale", 4, "s.0")(torch.ones(2, 4)).shape == (2, 4)
    with pytest.raises(ValidationError, match="unknown expert type 'nope'"):
        create_expert("nope", 4, "s.0")


def test_join_hosts_blocks_or_experts():
    for args, message in (
        (["join"], "give MODEL to serve its blocks, or --experts"),
        (
            ["join", "--experts", "ffn.[0:2]", "--hidden", "8", "--blocks", "0:2"],
            "are for blocks: experts train in float32",
        ),
    ):
        result = run_cli(*args, timeout=60)
        assert result.returncode == 2 and message in result.stderr
