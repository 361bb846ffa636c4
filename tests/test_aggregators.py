"""Robust aggregators: equal to byzfl's on the same inputs, robust where a plain mean is not, and robust enough to
train through attacks (the calibrated 16-peer digits run, with the mean as the control that must fail)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from swarm_peer.errors import ValidationError
from swarm_peer.protocols import aggregators
from swarm_peer.protocols.aggregators import Report

from .reference import byzfl

byzfl = byzfl()


def _inputs(N: int, f: int, seed: int, attack: str = "signflip", D: int = 500) -> torch.Tensor:
    """N - f honest inputs spread around a common mean, then f attackers."""
    g = torch.Generator().manual_seed(seed)
    honest_ND = 1.0 + 0.5 * torch.randn(N - f, D, generator=g)
    if attack == "signflip":
        bad_D = -1000 * honest_ND.mean(dim=0)
    else:  # every attacker pushes one random direction, 1000x the honest norm
        bad_D = torch.randn(D, generator=g)
        bad_D *= 1000 * honest_ND.mean(dim=0).norm() / bad_D.norm()
    return torch.cat([honest_ND, bad_D.expand(f, D)])


CASES = [
    (N, f, seed, attack)
    for N, f in ((5, 1), (8, 2), (16, 3), (40, 9))  # 40: past the sorting network, torch.sort
    for seed in (0, 1)
    for attack in ("signflip", "dir")
]


@pytest.mark.parametrize("N, f, seed, attack", CASES)
def test_aggregators_equal_byzfl(N, f, seed, attack):
    x_ND = _inputs(N, f, seed, attack)
    assert torch.allclose(aggregators.mean(x_ND), byzfl.Average()(x_ND))
    assert torch.allclose(aggregators.median(x_ND), byzfl.Median()(x_ND))
    assert torch.allclose(aggregators.trimmed_mean(x_ND, f), byzfl.TrMean(f=f)(x_ND))
    if 2 * f + 2 < N:
        assert torch.allclose(aggregators.krum(x_ND, f), byzfl.Krum(f=f)(x_ND))
        assert torch.allclose(aggregators.krum(x_ND, f, m=N - f), byzfl.MultiKrum(f=f)(x_ND))
    ours = aggregators.geometric_median(x_ND, nu=0.1, iterations=5000, eps=0.0)
    assert torch.allclose(ours, byzfl.GeometricMedian(nu=0.1, T=5000)(x_ND), atol=1e-4)
    # byzfl's CenteredClipping from BTARD's start (the coordinate-wise median), iterated as long
    reference = byzfl.CenteredClipping(L=200, tau=10.0)
    reference.m = byzfl.Median()(x_ND).clone()
    ours = aggregators.centered_clip(x_ND, tau=10.0, iterations=200, eps=0.0)
    assert torch.allclose(ours, reference(x_ND), atol=1e-5)


@pytest.mark.parametrize("attack", ["signflip", "dir"])
def test_robust_rules_stay_near_the_honest_mean_and_report_who_counted(attack):
    N, f = 16, 3
    x_ND = _inputs(N, f, seed=2, attack=attack)
    honest_D = x_ND[: N - f].mean(dim=0)
    spread = (x_ND[: N - f] - honest_D).norm(dim=1).median()
    assert (aggregators.mean(x_ND) - honest_D).norm() > 100 * spread  # the control: a mean is dragged away
    rules = {
        "median": aggregators.median,
        "trimmed_mean": partial(aggregators.trimmed_mean, trim=f),
        "krum": partial(aggregators.krum, f=f, m=N - f),
        "geomedian": aggregators.geometric_median,
        "centered_clip": aggregators.centered_clip,
    }
    for name, rule in rules.items():
        report = Report()
        result_D = rule(x_ND, report=report)
        assert (result_D - honest_D).norm() < spread, name
        assert torch.allclose(aggregators.make(name, byzantine=f)(x_ND), result_D), name
        assert torch.isclose(report.weights_N.sum(), torch.tensor(1.0)), name
        assert report.weights_N[N - f :].max() < 0.01 / f, f"{name} gave the attackers weight"
        assert report.distances_N[N - f :].min() > 100 * spread, name


def test_krum_reports_the_inputs_it_kept():
    N, f = 8, 2
    report = Report()
    aggregators.krum(_inputs(N, f, seed=3), f, m=N - f, report=report)
    assert torch.equal(report.weights_N, torch.tensor([1 / 6] * 6 + [0.0] * 2))


def test_bad_arguments_are_refused():
    x_ND = torch.randn(4, 10)
    with pytest.raises(ValidationError, match="unknown aggregator"):
        aggregators.make("average")
    with pytest.raises(ValidationError, match="trim"):
        aggregators.trimmed_mean(x_ND, 2)
    with pytest.raises(ValidationError, match="krum"):
        aggregators.krum(x_ND, 1)
    with pytest.raises(ValidationError, match="float tensor"):
        aggregators.median(torch.ones(4, 10, dtype=torch.long))
    assert torch.equal(
        aggregators.finite_inputs(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])),
        torch.tensor([True, False]),
    )
    assert torch.equal(
        aggregators.centered_clip(torch.ones(5, 3)), torch.ones(3)
    )  # no spread: no clipping radius


# ---------------------------------------------------------------- training through an attack (calibrated run)

PEERS, ATTACKERS, STEPS, ATTACK_FROM = 16, 3, 400, 100


def _train_digits(rule, attack: str | None, seed: int) -> float:
    """16 peers train one MLP on sklearn's digits with SGD, each step on the rule's aggregate of their gradients,
    applied per 1/16 part of the vector as in a butterfly all-reduce; from step 100 the last 3 peers attack.
    Returns the test accuracy."""
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    try:
        return _train(load_digits(return_X_y=True), rule, attack, seed)
    finally:
        torch.set_num_threads(threads)


def _train(digits, rule, attack: str | None, seed: int) -> float:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:540], order[540:]
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    per_peer = vmap(grad(loss), in_dims=(None, 0, 0))
    direction = torch.randn(
        sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(666)
    )
    for step in range(STEPS):
        batch = train[torch.randint(0, len(train), (PEERS, 16), generator=g)]
        grads = per_peer({k: v.detach() for k, v in params.items()}, x[batch], y[batch])
        g_ND = torch.cat([grads[k].flatten(1) for k in params], dim=1)
        if attack is not None and step >= ATTACK_FROM:
            honest_norm = g_ND[: PEERS - ATTACKERS].norm(dim=1, keepdim=True)
            bad = (
                -1000 * g_ND[-ATTACKERS:]
                if attack == "signflip"
                else direction * 1000 * honest_norm[-1] / direction.norm()
            )
            g_ND[-ATTACKERS:] = bad
        g_D = torch.cat([rule(part) for part in torch.tensor_split(g_ND, PEERS, dim=1)])
        offset = 0
        for p in params.values():
            p.grad = g_D[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        optimizer.step()
    with torch.no_grad():
        return (model(x[test]).argmax(1) == y[test]).float().mean().item()


SEEDS = (0, 1)


@pytest.fixture(scope="module")
def clean_accuracy() -> float:
    return sum(_train_digits(aggregators.mean, None, s) for s in SEEDS) / len(SEEDS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", ["signflip", "direction"])
def test_centered_clip_trains_through_an_attack_that_ruins_the_mean(attack, clean_accuracy):
    seeds, clean = SEEDS, clean_accuracy
    robust = sum(_train_digits(aggregators.make("centered_clip"), attack, s) for s in seeds) / len(seeds)
    ruined = _train_digits(aggregators.mean, attack, seeds[0])
    assert clean > 0.9, clean
    assert robust >= clean - 0.08, (robust, clean)
    assert ruined <= 0.2, ruined  # the control: the same attack on a plain mean
