"""BTARD verification (``protocols.verification``): who lied in a round is proven from what members signed, and bans
remove attackers. The calibrated experiment (16 members, 7 attackers, MLP on digits; thresholds from the research
notes) runs the real protocol in one process (``btard_sim``); each mechanism has a control that fails without it."""

from __future__ import annotations

import hashlib
import random
import statistics

import pytest
import torch

from swarm_peer.protocols.verification import Signed

from . import btard_sim
from .btard_sim import OwnerLie, train_digits, verified_round

SEEDS = (0, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean():
    """Accuracy without attackers, with the full protocol on (and nobody banned: no false alarm in 800 rounds)."""
    runs = [train_digits(None, seed=s, verify=True) for s in SEEDS]
    assert all(not run.banned for run in runs), [run.banned for run in runs]
    return statistics.mean(run.accuracy for run in runs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", btard_sim.ATTACKS)
def test_seven_of_sixteen_attackers_are_all_banned_and_accuracy_holds(clean, attack):
    runs = [train_digits(attack, seed=s, verify=True) for s in SEEDS]
    for run in runs:
        assert set(run.banned) == run.attackers, (attack, run.banned)  # all 7, and no honest member
    accuracy = statistics.mean(run.accuracy for run in runs)
    assert accuracy >= clean - 0.02, (attack, accuracy, clean)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["signflip", "randdir", "ipm"])
def test_control_a_plain_mean_without_the_protocol_is_ruined(attack):
    assert train_digits(attack, seed=0, verify=False, aggregator="mean").accuracy <= 0.2


# ---------------------------------------------------------------- owners that lie, statements that lie

N, SIZE, TAU = 6, 600, 1.0


def _updates(rng: torch.Generator, n: int = N) -> list[torch.Tensor]:
    base = torch.randn(SIZE, generator=rng)
    # spreads around tau, so that some inputs are clipped and some are not
    return [base + torch.randn(SIZE, generator=rng) * (0.01 + 0.1 * i) for i in range(n)]


def _round(number: int, **kwargs) -> btard_sim.Outcome:
    rng = torch.Generator().manual_seed(number)
    honest = kwargs.pop("honest", set(range(N)))
    return verified_round(
        hashlib.sha256(b"round %d" % number).digest(),
        btard_sim.keys(N),
        kwargs.pop("updates", None) or _updates(rng),
        tau=TAU,
        honest=honest,
        **kwargs,
    )


@pytest.mark.timeout(120)
def test_an_owner_that_lies_is_caught_in_the_same_round_by_every_honest_member():
    rng = random.Random(0)
    for number in range(12):
        kind = ("shift", "equivocate")[number % 2]
        owner = rng.randrange(N)
        lie = OwnerLie(kind, owner, size=rng.choice([0.05, 1.0, 1e4]))
        honest = set(range(N)) - {owner}
        outcome = _round(number, lie=lie, honest=honest, judges=len(honest))
        # the control: the lie did reach honest members (their results differ from the truth)
        truth = _round(number, honest=honest).received[min(honest)]
        assert any(not torch.equal(result, truth) for result in outcome.received.values())
        for member, verdict in outcome.verdicts.items():
            assert set(verdict) == {owner}, (number, kind, member, verdict)
        # and every honest member keeps the same result: the liar's share is dropped
        kept = list(outcome.results.values())
        assert all(torch.equal(result, kept[0]) for result in kept)


@pytest.mark.timeout(300)
def test_no_false_alarm_in_a_thousand_honest_rounds():
    for number in range(1000):
        outcome = _round(10_000 + number, rate=0.5, recompute=None)
        (verdict,) = outcome.verdicts.values()
        assert not verdict, (number, verdict)


def _accuse(accuser: int, accused: int, reason: str, proof=None, parts=()):
    def add(ctx, rounds, board, evidence):
        signed = Signed.make(rounds[accuser].key, "accuse", ctx.round_id, accused, reason, proof)
        board.append(signed)
        evidence[signed.signature] = parts

    return add


@pytest.mark.timeout(60)
def test_a_false_accusation_bans_the_accuser_not_the_accused():
    updates = _updates(torch.Generator().manual_seed(5))

    def recompute(member: int) -> torch.Tensor:
        return updates[member]  # every member sent what its data gives

    # that member 2's update is not what its data gives: every judge recomputes it and finds it is
    outcome = _round(5, updates=updates, recompute=recompute, extra=_accuse(1, 2, "update"), judges=N)
    for verdict in outcome.verdicts.values():
        assert set(verdict) == {1}, verdict
    # that member 3 sent a bad input, shown with bytes it never signed
    forged = [torch.full((SIZE // N,), float("nan"))]
    outcome = _round(5, updates=updates, extra=_accuse(0, 3, "input", None, forged), judges=N)
    for verdict in outcome.verdicts.values():
        assert set(verdict) == {0}, verdict
    # the control: the same accusation of a member that did lie bans the liar
    lying = list(updates)
    lying[2] = -1000 * updates[2]
    outcome = _round(5, updates=lying, recompute=recompute, extra=_accuse(1, 2, "update"), judges=N)
    for verdict in outcome.verdicts.values():
        assert set(verdict) == {2}, verdict


@pytest.mark.timeout(60)
def test_a_non_finite_input_bans_its_sender_on_its_own_receipt():
    updates = _updates(torch.Generator().manual_seed(6))
    updates[4] = updates[4].clone()
    updates[4][7] = float("inf")
    outcome = _round(6, updates=updates, honest=set(range(N)) - {4}, judges=N - 1)
    for verdict in outcome.verdicts.values():
        assert set(verdict) == {4}, verdict
    assert all(torch.isfinite(r).all() for r in outcome.results.values())


@pytest.mark.timeout(60)
def test_a_member_that_lies_about_its_checks_is_shown_up_by_its_owners():
    # member 2 signs checks that do not fit its bytes (as it would to hide an owner's lie): owners recompute them
    honest = set(range(N)) - {2}
    outcome = _round(7, check_lies={2: 0.5}, honest=honest, judges=len(honest))
    for verdict in outcome.verdicts.values():
        assert set(verdict) == {2}, verdict


@pytest.mark.timeout(60)
def test_an_accusation_whose_bytes_cannot_be_shown_bans_both_sides():
    # as above, but judges cannot see the bytes: the owners' word against member 2's; one side lies, both go
    honest = set(range(N)) - {2}
    outcome = _round(7, check_lies={2: 0.5}, honest=honest, judges=len(honest), show_evidence=False)
    for verdict in outcome.verdicts.values():
        assert 2 in verdict and all("disputed" in why for why in verdict.values()), verdict
