"""A verified butterfly all-reduce of n members in one process: the real ``protocols.verification`` and CenteredClip,
with the transport (who hands whom which bytes and statements) done by plain calls. The calibrated BTARD
experiment of the tests runs on it: 16 members train an MLP on sklearn's digits with synchronous SGD, some of them
attack, and bans remove them.

Each round: every member signs its update's receipt and gives every owner its part; owners reduce their share with
CenteredClip and sign the result; then commit, reveal, check and accuse go to a shared board; an honest member
judges the board and everyone drops the banned members. A member's batch of a round is drawn from the previous
round's shared seed, so a validator can recompute its gradient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from hivemind.utils.crypto import RSAPrivateKey
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from swarm_peer.dht.identity import public_key_bytes
from swarm_peer.protocols.aggregators import centered_clip
from swarm_peer.protocols.verification import (
    MemberRound,
    RoundContext,
    Signed,
    digest,
    equal_shares,
    judge,
    shared_seed,
    without_banned_owners,
)

ALIE_Z, IPM_EPS = 1.15, 2.0  # ALIE's z for 7 of 16 (Baruch et al.), IPM's epsilon (Xie et al.)
ATTACKS = ("signflip", "randdir", "labelflip", "alie", "ipm")

_KEYS: list[RSAPrivateKey] = []


def keys(n: int) -> list[RSAPrivateKey]:
    """n identity keys, made once per test process (a key takes ~50 ms)."""
    while len(_KEYS) < n:
        _KEYS.append(RSAPrivateKey())
    return _KEYS[:n]


@dataclass
class OwnerLie:
    """An owner's lie in one round: ``shift`` adds ``size`` to its result; ``equivocate`` sends that to half of
    the members and the true result to the others."""

    kind: str
    owner: int
    size: float = 1.0


@dataclass
class Outcome:
    """One verified round: the result as each honest member got it (``received``) and kept after its judgement
    (``results``: shares of owners it banned are zeros), and the bans each judging member found."""

    received: dict[int, torch.Tensor]
    results: dict[int, torch.Tensor]
    verdicts: dict[int, dict[int, str]]
    seed: bytes
    board: list[Signed] = field(default_factory=list)


def verified_round(
    round_id: bytes,
    members: list[RSAPrivateKey],
    updates: list[torch.Tensor],
    *,
    tau: float,
    honest: set[int],
    rate: float = 0.0,
    recompute: Callable[[int], torch.Tensor | None] | None = None,
    lie: OwnerLie | None = None,
    extra: Callable[[RoundContext, list[MemberRound], list[Signed], dict], None] | None = None,
    check_lies: dict[int, float] | None = None,
    show_evidence: bool = True,
    judges: int = 1,
) -> Outcome:
    """One round of the protocol among ``members`` (indices into the round's group). ``honest`` members judge
    (the first ``judges`` of them); ``extra`` may add statements to the board before judging (a false accuser);
    ``check_lies``: members that add this much to every s they sign; ``show_evidence``: whether judges see the
    bytes that accusations rest on."""
    n, size = len(members), updates[0].numel()
    ctx = RoundContext(round_id, tuple(public_key_bytes(k) for k in members), equal_shares(size, n), tau)
    rounds = [MemberRound(ctx, key, update) for key, update in zip(members, updates, strict=True)]
    receipts = [r.input_receipt() for r in rounds]
    for owner in rounds:
        for sender in range(n):
            owner.take_input(sender, receipts[sender], ctx.parts(rounds[sender].update_D, owner.me))
    for owner in rounds:
        _, x_NS = owner.used_inputs()
        v_S = centered_clip(x_NS, tau, iterations=1000)
        true_parts = [v_S]
        sent_parts = true_parts
        if lie is not None and lie.owner == owner.me:
            sent_parts = [v_S + lie.size]
        receipt = owner.result_receipt(sent_parts)
        for member in rounds:
            parts = sent_parts
            if lie is not None and lie.owner == owner.me and lie.kind == "equivocate" and member.me % 2:
                parts = true_parts
                receipt_for_member = Signed.make(owner.key, "result", ctx.round_id, owner.me, _digests(parts))
            else:
                receipt_for_member = receipt
            member.take_result(owner.me, receipt_for_member, parts)
    board = [r.commit() for r in rounds] + [r.reveal() for r in rounds]
    seed = shared_seed(ctx, {r.me: r.seed for r in rounds})
    for r in rounds:
        check = r.check(seed)
        if check_lies and r.me in check_lies:
            values = [[s + check_lies[r.me], *rest] for s, *rest in check.body[2]]
            check = Signed.make(r.key, "check", ctx.round_id, values)
        board.append(check)
    evidence: dict[bytes, tuple[torch.Tensor, ...]] = {}
    for r in rounds:
        for accusation in r.accusations(
            board, seed, rate=rate, recompute=recompute if r.me in honest else None
        ):
            board.append(accusation.signed)
            evidence[accusation.signed.signature] = accusation.parts
    if extra is not None:
        extra(ctx, rounds, board, evidence)
    if not show_evidence:
        evidence = {}
    verdicts = {
        m: judge(ctx, board, evidence, result_D=rounds[m].result_D, recompute=recompute)
        for m in sorted(honest)[:judges]
    }
    results = {m: without_banned_owners(ctx, rounds[m].result_D, verdicts[m]) for m in verdicts}
    return Outcome({m: rounds[m].result_D for m in honest}, results, verdicts, seed, board)


def _digests(parts: list[torch.Tensor]) -> list[bytes]:
    return [digest(p) for p in parts]


# ---------------------------------------------------------------- the calibrated experiment (digits, MLP)


def _lookup(gradients: dict[int, torch.Tensor], active: list[int], index: int) -> torch.Tensor:
    return gradients[active[index]]


@dataclass
class Run:
    accuracy: float
    banned: dict[int, str]  # member -> reason
    attackers: set[int]


def train_digits(
    attack: str | None,
    *,
    seed: int,
    verify: bool,
    aggregator: str = "centered_clip",
    n: int = 16,
    byzantine: int = 7,
    steps: int = 400,
    start: int = 100,
    tau: float = 1.0,
    rate: float = 0.25,
) -> Run:
    """§7.1's experiment: n members, MLP 64-64-10, batch 16 each, SGD lr 0.1 momentum 0.9 on the aggregate;
    ``byzantine`` members attack from step ``start``. ``verify``: the full protocol with bans; otherwise plain
    aggregation (``aggregator`` over the whole vector, CenteredClip per share when it is centered_clip)."""
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    members = keys(n)
    attackers = set(range(n - byzantine, n)) if attack else set()
    direction = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(666))
    active = list(range(n))
    banned: dict[int, str] = {}
    previous_seed = hashlib.sha256(f"genesis {seed}".encode()).digest()

    def gradient(member: int, flip: bool = False) -> torch.Tensor:
        # the batch of a round comes from the previous round's shared seed: anyone can replay it
        h = hashlib.sha256(previous_seed + public_key_bytes(members[member])).digest()
        idx = torch.randint(
            0, len(Xtr), (16,), generator=torch.Generator().manual_seed(int.from_bytes(h[:8]) >> 1)
        )
        xb, yb = Xtr[idx], ytr[idx]
        model.zero_grad()
        F.cross_entropy(model(xb), 9 - yb if flip else yb).backward()
        return torch.cat([p.grad.flatten() for p in params]).clone()

    for t in range(steps):
        honest_grads = {m: gradient(m) for m in active}
        sent = dict(honest_grads)
        attacking = [m for m in active if m in attackers and t >= start]
        if attacking:
            H = torch.stack([honest_grads[m] for m in active if m not in attackers])
            mu, sd = H.mean(0), H.std(0)
            for m in attacking:
                g = honest_grads[m]
                if attack == "signflip":
                    sent[m] = -1000 * g
                elif attack == "randdir":
                    sent[m] = direction / direction.norm() * g.norm() * 1000
                elif attack == "labelflip":
                    sent[m] = gradient(m, flip=True)
                elif attack == "alie":
                    sent[m] = mu - ALIE_Z * sd
                else:
                    sent[m] = -IPM_EPS * mu
        if verify:
            group = [members[m] for m in active]
            honest_members = {i for i, m in enumerate(active) if m not in attackers}
            outcome = verified_round(
                hashlib.sha256(f"{seed}/{t}".encode()).digest(),
                group,
                [sent[m] for m in active],
                tau=tau,
                honest=honest_members,
                rate=rate,
                recompute=partial(_lookup, honest_grads, list(active)),
            )
            (verdict,) = outcome.verdicts.values()
            aggregate = outcome.results[min(honest_members)]
            previous_seed = outcome.seed
            for i, reason in verdict.items():
                banned[active[i]] = reason
            active = [m for m in active if m not in banned]
        else:
            G = torch.stack([sent[m] for m in active])
            if aggregator == "mean":
                aggregate = G.mean(0)
            else:
                parts = torch.tensor_split(G, len(active), dim=1)
                aggregate = torch.cat([centered_clip(p, tau) for p in parts])
            previous_seed = hashlib.sha256(previous_seed).digest()
        offset = 0
        for p in params:
            p.grad = aggregate[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
    with torch.no_grad():
        accuracy = (model(Xte).argmax(1) == yte).float().mean().item()
    return Run(accuracy, banned, attackers)
