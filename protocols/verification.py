"""BTARD verification of one averaging round: who lied, proven from what each member signed.

Robust aggregation (``averaging``) bounds what a dishonest *input* can do to a round; it does nothing against a
dishonest *owner* (the member that reduces one share of the vector and sends the result to everyone) and never
removes an attacker. This module is the rest of BTARD (Gorbunov, Borzunov, Diskin, Ryabinin, "Secure Distributed
Training at Scale", ICML 2022): every round, cheap random checks that every member can run, and accusations that
every honest member can verify, so that a peer that lies is banned and stays banned.

Shape legend: D coordinates of the averaged (flat) vector; a share is one owner's parts of it.

**What members sign.** Every statement is a msgpack list signed with the member's identity key (``Signed``); its
author is the key, and the key is the peer id (``dht.identity``). In one round of a group (``RoundContext``: the
round's id, the members' keys in group order, the shares, the clipping radius tau):

1. on the wire, with its parts, each sender gives every owner an ``input`` receipt: the digests of all parts of
   the vector it sends (``MemberRound.input_receipt``); each owner, with its result, a ``result`` receipt: the
   digests of its result's parts. Bytes that do not match their receipt are not taken (no proof, no ban: a
   corrupted stream), and every byte taken is signed by its sender;
2. ``commit``: a hash of a fresh random seed, the senders the member aggregated as an owner, and its result's
   digests (what it claims it sent everyone);
3. ``reveal``: the seed. The round's shared seed hashes all of them: nobody can bias it (commit, then reveal), and
   it is known only once every input and result was sent. It draws a random direction z_j for every share;
4. ``check``: for every owner j, with x the member's input and v the result, s_j = <z_j, clip(x_j - v_j, tau)>
   (clipped part by part, as owners reduce parts), p_j = <z_j, x_j>, and two scales for the tolerances (the
   clipped spread and v's rounding). At CenteredClip's fixed point the clipped differences sum to zero (sum over
   members of s_j = 0): an owner whose result does not fit its inputs breaks the sum;
5. ``accuse``: what the member found, with its proof.

**What is checked, and what proves it** (``judge``: every honest member runs it on the same statements and bans
the same peers):

- an owner whose result digests differ from a ``result`` receipt it signed (different results to different
  members): the receipt proves it;
- a sender whose input was malformed or not finite, or whose check values do not fit the bytes it sent (its owner
  recomputes them): the sender's own receipt and the bytes prove it;
- an owner whose inputs' s do not sum to zero, and who accused none of them: the signed checks prove it;
- a member whose update is not what its data gives: validators, drawn from the shared seed, recompute it (the data
  of a round is drawn from the previous round's seed, so it can be replayed) and compare it with its signed checks; every member verifies an accusation by recomputing too;
- a member that committed but withheld its seed or its checks;
- two different statements of one kind from one member in one round;
- and an accuser whose proof does not hold: a false accusation bans the accuser, not the accused. Where the bytes an
  owner's accusation rests on cannot be shown (``judge`` gets no evidence for it), it is the owner's word against
  the sender's and one of them lies: both are banned (each such dispute costs a dishonest peer its place).

A member that got no result from an owner (or none matching its receipt) signs no check of that share, and the sum
check of the share is skipped that round: a member colluding with a lying owner can thus hide one round's lie
(validators still recompute its update). A dishonest owner can still move its share by what the tolerances allow (1e-3 of the clipped spread) and a
dishonest member can still send an update no validator drew this round: each risks a ban every round it lies.

    ctx = RoundContext(round_id, keys, shares, tau)
    me = MemberRound(ctx, private_key, update_D)
    receipt = me.input_receipt()  # sent with my parts to every owner
    ...  # owners take inputs (take_input), reduce them, send results with their receipt (take_result)
    board = [m.commit() for m in group]; board += [m.reveal() for m in group]; ...
    banned = judge(ctx, board, evidence, result_D=me.result_D, recompute=...)  # {member index: reason}
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm_peer.dht.identity import public_key_bytes

__all__ = [
    "Accusation",
    "MemberRound",
    "RoundContext",
    "Signed",
    "Transcript",
    "digest",
    "equal_shares",
    "flat_index",
    "judge",
    "receipt_digests",
    "round_seed",
    "shared_seed",
    "validators",
    "without_banned_owners",
]

logger = logging.getLogger(__name__)

_DOMAIN = b"swarm-peer/btard/v1\n"  # signatures over these statements are never valid as anything else
_DIGEST_BYTES = 16
_RTOL = 1e-3  # a recomputed value may differ by this fraction of its scale (other hardware, other kernels)
_ATOL = 1e-12
Shares = tuple[tuple[tuple[int, int], ...], ...]  # per owner, its parts as (start, end) of the flat vector


def digest(part: torch.Tensor) -> bytes:
    """16 bytes of SHA-256 over a part's float32 values: what receipts commit to."""
    data = part.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).digest()[:_DIGEST_BYTES]


def equal_shares(size: int, members: int, part_size: int | None = None) -> Shares:
    """A flat vector of ``size`` cut into ``members`` near-equal shares of parts of at most ``part_size``."""
    bounds = [size * j // members for j in range(members + 1)]
    step = part_size or max(size, 1)
    return tuple(
        tuple((a, min(a + step, end)) for a in range(start, end, step))
        for start, end in itertools.pairwise(bounds)
    )


@dataclass(frozen=True)
class Signed:
    """A statement (a msgpack list) and its author's signature; the author is ``key`` (an OpenSSH RSA key)."""

    key: bytes
    payload: bytes
    signature: bytes

    @classmethod
    def make(cls, private_key: RSAPrivateKey, *body) -> Signed:
        payload = MSGPackSerializer.dumps(list(body))
        return cls(public_key_bytes(private_key), payload, private_key.sign(_DOMAIN + payload))

    @cached_property
    def body(self) -> list | None:
        """The statement, or None when the signature does not hold or the payload is not a list."""
        try:
            if not RSAPublicKey.from_bytes(self.key).verify(_DOMAIN + self.payload, self.signature):
                return None
            body = MSGPackSerializer.loads(self.payload)
        except Exception:  # a foreign key format or payload: not a statement
            return None
        return body if isinstance(body, list) and len(body) >= 2 else None

    def to_wire(self) -> list[bytes]:
        return [self.key, self.payload, self.signature]

    @classmethod
    def from_wire(cls, value: object) -> Signed | None:
        if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, bytes) for v in value):
            return cls(*value)
        return None


@dataclass(frozen=True)
class RoundContext:
    """One round of one group, as every member knows it: ``keys`` in group order (member j owns share j)."""

    round_id: bytes
    keys: tuple[bytes, ...]
    shares: Shares
    tau: float

    def __post_init__(self):
        assert len(self.keys) == len(self.shares), "one share per member"

    @property
    def size(self) -> int:
        return len(self.keys)

    def index(self, key: bytes) -> int | None:
        return self.keys.index(key) if key in self.keys else None

    def parts(self, x_D: torch.Tensor, owner: int) -> list[torch.Tensor]:
        return [x_D[a:b] for a, b in self.shares[owner]]

    def statement(self, signed: Signed, kind: str) -> tuple[int, list] | None:
        """(author's member index, statement) when ``signed`` is a valid ``kind`` statement of this round by a
        member, else None."""
        body, author = signed.body, self.index(signed.key)
        if body is None or author is None or body[0] != kind or body[1] != self.round_id:
            return None
        return author, body


def shared_seed(ctx: RoundContext, reveals: Mapping[int, bytes]) -> bytes:
    """The round's seed: a hash of every revealed seed, in member order."""
    h = hashlib.sha256(_DOMAIN + ctx.round_id)
    for member in sorted(reveals):
        h.update(member.to_bytes(4, "big") + reveals[member])
    return h.digest()


def _revealed(statements: Mapping[str, Mapping[int, list]]) -> dict[int, bytes]:
    """The seeds revealed that match their commitment, by member."""
    commits = statements["commit"]
    return {
        member: body[2]
        for member, body in statements["reveal"].items()
        if member in commits and hashlib.sha256(body[2]).digest() == commits[member][2]
    }


def round_seed(ctx: RoundContext, board: Sequence[Signed]) -> bytes:
    """The round's shared seed from the statements on its board (the seeds revealed that match a commitment)."""
    return shared_seed(ctx, _revealed(_latest(ctx, board)))


def _direction(seed: bytes, owner: int, part: int, size: int) -> torch.Tensor:
    """z for one part of one share: standard normal, drawn from the round's seed."""
    h = hashlib.sha256(seed + owner.to_bytes(4, "big") + part.to_bytes(4, "big")).digest()
    return torch.randn(size, generator=torch.Generator().manual_seed(int.from_bytes(h[:8], "big") >> 1))


def _projections(
    ctx: RoundContext,
    seed: bytes,
    owner: int,
    inputs: Sequence[Sequence[torch.Tensor]],
    v_parts: Sequence[torch.Tensor],
) -> list[tuple[float, float, float, float, float]]:
    """What members sign about their inputs x (each a list of parts) to one owner whose result is v, in float64,
    each a sum over the share's parts (each part is clipped on its own, as owners reduce them):
    s = <z, clip(x - v, tau)>, p = <z, x>, c = sum of min(tau, ||x - v||) (the clipped spread: the scale of s),
    r = sum of ||v|| min(1, tau / ||x - v||) (the scale of v's float32 rounding in s); and ||x||, the scale of p
    (z is standard normal). An owner checks every sender's input at once: z and v are made once per part."""
    if any(len(x_parts) != len(v_parts) for x_parts in inputs):
        raise ValueError("an input's parts are not the share's")
    sums = [[0.0] * 5 for _ in inputs]
    for index, v in enumerate(v_parts):
        z = _direction(seed, owner, index, v.numel()).double()
        v = v.double().flatten()
        v_norm = float(v.norm())
        for x_parts, acc in zip(inputs, sums, strict=True):
            x = x_parts[index].double().flatten()
            diff = x - v
            d = float(diff.norm())
            scale = min(1.0, ctx.tau / d) if d > 0 else 1.0
            acc[0] += scale * float(z @ diff)
            acc[1] += float(z @ x)
            acc[2] += min(ctx.tau, d)
            acc[3] += scale * v_norm
            acc[4] += float(x @ x)
    return [(s, p, c, r, xx**0.5) for s, p, c, r, xx in sums]


def _close(claimed: float, actual: float, scale: float) -> bool:
    return abs(claimed - actual) <= _RTOL * scale + _ATOL


def validators(ctx: RoundContext, seed: bytes, rate: float) -> dict[int, int]:
    """Which members get their update recomputed this round, and by whom: {target: validator}, drawn from the
    round's seed (each member is a target with probability ``rate``, its validator any other member)."""
    rng = random.Random(seed)
    chosen = {}
    for target in range(ctx.size):
        if rng.random() < rate and ctx.size > 1:
            chosen[target] = rng.choice([m for m in range(ctx.size) if m != target])
    return chosen


@dataclass(frozen=True)
class Accusation:
    """A signed ``accuse`` statement, and the bytes it rests on when it needs them (an input's parts)."""

    signed: Signed
    parts: tuple[torch.Tensor, ...] = ()


def receipt_digests(ctx: RoundContext, receipt: Signed | None, kind: str, author: int) -> list[bytes] | None:
    """The digests of a valid ``kind`` receipt signed by member ``author``, or None."""
    if receipt is None:
        return None
    statement = ctx.statement(receipt, kind)
    if statement is None or statement[0] != author:
        return None
    body = statement[1]
    digests = body[-1]
    if not isinstance(digests, list) or not all(isinstance(d, bytes) for d in digests):
        return None
    return digests


def flat_index(ctx: RoundContext, owner: int) -> int:
    """Where owner's parts start in a list of every part of the vector (owner-major order)."""
    return sum(len(parts) for parts in ctx.shares[:owner])


def _input_problem(
    ctx: RoundContext, sender: int, owner: int, receipt: Signed, parts
) -> tuple[bool, str | None]:
    """(proven, problem) for parts a sender gave an owner (its whole share, or the first parts up to a bad one):
    proven is whether the sender's receipt covers these bytes (so that a problem is its own signed doing);
    problem is None for good parts."""
    digests = receipt_digests(ctx, receipt, "input", sender)
    total = sum(len(p) for p in ctx.shares)
    if digests is None or len(digests) != total:
        return False, "no valid receipt"
    expected = ctx.shares[owner]
    if not 0 < len(parts) <= len(expected):
        return False, "a wrong number of parts"
    start = flat_index(ctx, owner)
    for index, (part, (a, b)) in enumerate(zip(parts, expected, strict=False)):  # a bad part ends the proof
        if not isinstance(part, torch.Tensor) or digest(part) != digests[start + index]:
            return False, "bytes that do not match its receipt"
        if part.shape != (b - a,) or not part.is_floating_point():
            return True, f"a part of shape {tuple(part.shape)} where {b - a} floats were due"
        if not torch.isfinite(part).all():
            return True, "a part with NaN or infinite values"
    return True, None


@dataclass(frozen=True)
class Transcript:
    """What one member of a verified round signed, took in and got (``protocols.verification``): the round's
    context, its own input receipt, each sender's receipt and parts it took in as an owner (member index ->
    (receipt, parts)), the inputs it refused with proof (member index -> (receipt, parts up to the bad one)), each
    owner's result receipt (member index -> receipt), and its own result's parts as an owner."""

    ctx: RoundContext
    receipt: Signed
    inputs: dict[int, tuple[Signed, list[torch.Tensor]]]
    rejected: dict[int, tuple[Signed, list[torch.Tensor]]]
    results: dict[int, Signed]
    result_parts: list[torch.Tensor] | None


@dataclass
class MemberRound:
    """One member's side of a verified round: what it signs, takes in and finds (module docstring)."""

    ctx: RoundContext
    key: RSAPrivateKey
    update_D: torch.Tensor
    seed: bytes = field(default_factory=lambda: os.urandom(32))

    def __post_init__(self):
        self.me = self.ctx.index(public_key_bytes(self.key))
        assert self.me is not None, "not a member of this round"
        self.update_D = self.update_D.detach().to("cpu", torch.float32).flatten()
        self.inputs: dict[int, tuple[Signed, list[torch.Tensor]]] = {}  # as owner: what each sender gave
        self.rejected: list[Accusation] = []  # senders whose bad input is proven
        self.result_parts: list[torch.Tensor] | None = None  # my result, as owner
        self.results: dict[int, tuple[Signed, list[torch.Tensor]]] = {}  # each owner's result, as received
        self.received_D: torch.Tensor | None = None  # the whole result, when an averager assembled it

    @classmethod
    def from_transcript(
        cls, transcript: Transcript, key: RSAPrivateKey, update_D: torch.Tensor, result_D: torch.Tensor
    ) -> MemberRound:
        """The member's side of a round that an averager ran (``averaging.RobustAverager`` with a key):
        ``update_D`` is what it sent, ``result_D`` what it got."""
        ctx = transcript.ctx
        member = cls(ctx, key, update_D)
        member.inputs = dict(transcript.inputs)
        for sender, (receipt, parts) in transcript.rejected.items():
            if sender == member.me:
                continue  # its own bad input: nothing to accuse
            signed = member._sign("accuse", sender, "input", receipt.to_wire())
            member.rejected.append(Accusation(signed, tuple(parts)))
        result_D = result_D.detach().to("cpu", torch.float32).flatten()
        member.results = {owner: (r, ctx.parts(result_D, owner)) for owner, r in transcript.results.items()}
        member.result_parts = transcript.result_parts
        member.received_D = result_D
        return member

    def _sign(self, kind: str, *fields) -> Signed:
        return Signed.make(self.key, kind, self.ctx.round_id, *fields)

    # ------------------------------------------------------------ the all-reduce

    def input_receipt(self) -> Signed:
        digests = [digest(p) for owner in range(self.ctx.size) for p in self.ctx.parts(self.update_D, owner)]
        return self._sign("input", digests)

    def take_input(self, sender: int, receipt: Signed, parts: Sequence[torch.Tensor]) -> bool:
        """As an owner: whether a sender's parts can be aggregated. A bad input its receipt covers is accused."""
        proven, problem = _input_problem(self.ctx, sender, self.me, receipt, parts)
        if proven and problem is None:
            self.inputs[sender] = (receipt, [p.float() for p in parts])
            return True
        logger.warning("Member %d of round %s sent %s", sender, self.ctx.round_id.hex()[:8], problem)
        if proven:
            signed = self._sign("accuse", sender, "input", receipt.to_wire())
            self.rejected.append(Accusation(signed, tuple(parts)))
        return False

    def used_inputs(self) -> tuple[list[int], torch.Tensor]:
        """The senders taken in, and their shares stacked: [N, share size]."""
        senders = sorted(self.inputs)
        return senders, torch.stack([torch.cat(self.inputs[s][1]) for s in senders])

    def result_receipt(self, result_parts: Sequence[torch.Tensor]) -> Signed:
        """As an owner: the receipt sent with my result (``result_parts``: my share's parts of it)."""
        self.result_parts = [p.detach().float() for p in result_parts]
        return self._sign("result", self.me, [digest(p) for p in self.result_parts])

    def take_result(self, owner: int, receipt: Signed, parts: Sequence[torch.Tensor]) -> bool:
        """Whether an owner's result matches the receipt it came with (if not, it counts as no result)."""
        digests = receipt_digests(self.ctx, receipt, "result", owner)
        if digests is None or len(digests) != len(parts) or len(parts) != len(self.ctx.shares[owner]):
            return False
        if any(digest(p) != d for p, d in zip(parts, digests, strict=True)):
            return False
        self.results[owner] = (receipt, [p.float() for p in parts])
        return True

    @property
    def result_D(self) -> torch.Tensor | None:
        """The averaged vector, once every owner's result came (or as the averager left it)."""
        if self.received_D is not None:
            return self.received_D
        if len(self.results) != self.ctx.size:
            return None
        return torch.cat([p for owner in range(self.ctx.size) for p in self.results[owner][1]])

    # ------------------------------------------------------------ the statements after it

    def commit(self) -> Signed:
        digests = [digest(p) for p in self.result_parts] if self.result_parts is not None else []
        return self._sign("commit", hashlib.sha256(self.seed).digest(), sorted(self.inputs), digests)

    def reveal(self) -> Signed:
        return self._sign("reveal", self.seed)

    def check(self, seed: bytes) -> Signed:
        """The checks (s, p, c, r) of every owner's share ([] where no result came, or none that matched its
        receipt: the sum check of that share is then skipped this round)."""
        values = []
        for owner in range(self.ctx.size):
            if owner in self.results:
                x = self.ctx.parts(self.update_D, owner)
                values.append(list(_projections(self.ctx, seed, owner, [x], self.results[owner][1])[0][:4]))
            else:
                logger.warning("No result from owner %d in round %s", owner, self.ctx.round_id.hex()[:8])
                values.append([])
        return self._sign("check", values)

    def accusations(
        self,
        board: Sequence[Signed],
        seed: bytes,
        *,
        rate: float = 0.0,
        recompute: Callable[[int], torch.Tensor | None] | None = None,
    ) -> list[Accusation]:
        """What this member finds once every check is out: owners that sent it a result other than they claim,
        senders whose checks do not fit what they gave it, and (when drawn as a validator, with ``recompute``)
        members whose update is not what their data gives."""
        found = list(self.rejected)
        statements = _latest(self.ctx, board)
        for owner, (receipt, _) in self.results.items():
            commit = statements["commit"].get(owner)
            if commit is not None and commit[4] != receipt_digests(self.ctx, receipt, "result", owner):
                found.append(Accusation(self._sign("accuse", owner, "result", receipt.to_wire())))
        if self.result_parts is not None:
            checked = [
                (sender, receipt, parts, check[2][self.me])
                for sender, (receipt, parts) in self.inputs.items()
                if sender != self.me
                and (check := statements["check"].get(sender)) is not None
                and len(check[2]) == self.ctx.size
                and check[2][self.me] != []
            ]
            actuals = _projections(self.ctx, seed, self.me, [c[2] for c in checked], self.result_parts)
            for (sender, receipt, parts, claimed), actual in zip(checked, actuals, strict=True):
                if not _fits(self.ctx, claimed, actual):
                    found.append(
                        Accusation(self._sign("accuse", sender, "input", receipt.to_wire()), tuple(parts))
                    )
        if recompute is not None:
            result_D = self.result_D
            for target, validator in validators(self.ctx, seed, rate).items():
                check = statements["check"].get(target)
                if validator != self.me or check is None or result_D is None:
                    continue
                if not _update_fits(self.ctx, seed, check[2], recompute(target), result_D):
                    found.append(Accusation(self._sign("accuse", target, "update", None)))
        return found


def _fits(ctx: RoundContext, claimed: object, actual: tuple[float, float, float, float, float]) -> bool:
    """Whether signed (s, p, c, r) values match recomputed ones."""
    if not isinstance(claimed, list) or len(claimed) != 4 or not all(isinstance(v, float) for v in claimed):
        return False
    s, p, c, r, x_norm = actual
    return (
        _close(claimed[0], s, c)
        and _close(claimed[1], p, x_norm)
        and _close(claimed[2], c, c)
        and _close(claimed[3], r, r)
    )


def _update_fits(
    ctx: RoundContext, seed: bytes, claimed: object, update_D: torch.Tensor | None, result_D: torch.Tensor
) -> bool:
    """Whether a member's signed checks fit the update it should have sent (``update_D``, recomputed)."""
    if update_D is None:
        return True  # nothing to compare with: no accusation
    if not isinstance(claimed, list) or len(claimed) != ctx.size:
        return False
    update_D = update_D.detach().to("cpu", torch.float32).flatten()
    for owner in range(ctx.size):
        if claimed[owner] == []:
            continue  # it got no result from this owner: nothing it signed to compare
        x = ctx.parts(update_D, owner)
        actual = _projections(ctx, seed, owner, [x], ctx.parts(result_D, owner))[0]
        if not _fits(ctx, claimed[owner], actual):
            return False
    return True


_SHAPES = {  # kind -> number of fields after (kind, round id), and their types
    "commit": (bytes, list, list),
    "reveal": (bytes,),
    "check": (list,),
    "accuse": (int, str, object),
}


def _latest(ctx: RoundContext, board: Sequence[Signed]) -> dict[str, dict[int, list]]:
    """The round's well-formed statements by kind and author (a second, different one of a kind is kept apart by
    ``judge``; here the first counts)."""
    found: dict[str, dict[int, list]] = {kind: {} for kind in _SHAPES}
    for signed in board:
        for kind, types in _SHAPES.items():
            statement = ctx.statement(signed, kind)
            if statement is None:
                continue
            author, body = statement
            if len(body) == 2 + len(types) and all(
                isinstance(v, t) for v, t in zip(body[2:], types, strict=True)
            ):
                found[kind].setdefault(author, body)
    return found


def judge(
    ctx: RoundContext,
    board: Sequence[Signed],
    evidence: Mapping[bytes, Sequence[torch.Tensor]],
    *,
    result_D: torch.Tensor,
    recompute: Callable[[int], torch.Tensor | None] | None = None,
) -> dict[int, str]:
    """Who of the round's members is proven dishonest, and why: {member index: reason}. Deterministic in its
    inputs, so every honest member bans the same peers. ``board``: every statement of the round (commits,
    reveals, checks, accusations); ``evidence``: the parts an ``input`` accusation rests on, by the accusation's
    signature (an accusation without an entry is a dispute: both sides are banned); ``result_D``: the averaged vector as this member got it; ``recompute``: a member's update as its
    data gives it (to verify ``update`` accusations; without it they are not judged)."""
    banned: dict[int, str] = {}

    def ban(member: int, reason: str) -> None:
        banned.setdefault(member, reason)

    # two different statements of one kind in one round
    seen: dict[tuple[int, str], bytes] = {}
    for signed in board:
        for kind in ("commit", "reveal", "check"):
            statement = ctx.statement(signed, kind)
            if statement is not None:
                previous = seen.setdefault((statement[0], kind), signed.payload)
                if previous != signed.payload:
                    ban(statement[0], f"signed two different {kind} statements")
    statements = _latest(ctx, board)
    commits, checks = statements["commit"], statements["check"]

    # commit, then reveal: a seed must match its hash; a member that committed shows its seed and its checks
    reveals = _revealed(statements)
    for member in commits:
        if member not in reveals:
            ban(member, "withheld its seed")
        elif (
            member not in checks
            or not isinstance(checks[member][2], list)
            or len(checks[member][2]) != ctx.size
        ):
            ban(member, "withheld its checks")
    seed = shared_seed(ctx, reveals)

    # accusations, each proven or held against its author; an owner proven to have sent different results first:
    # its accusations about its share rest on a result other members did not get, and are void
    accusations = []
    for signed in board:
        statement = ctx.statement(signed, "accuse")
        if statement is None:
            continue
        accuser, body = statement
        if (
            len(body) != 5
            or not isinstance(body[2], int)
            or not 0 <= body[2] < ctx.size
            or body[2] == accuser
        ):
            ban(accuser, "signed a malformed accusation")
            continue
        accusations.append((signed, accuser, body[2], body[3], body[4]))
    accusations.sort(key=lambda a: a[3] != "result")
    equivocated: set[int] = set()
    upheld: set[tuple[int, int]] = set()  # (owner, sender) pairs where an owner proved a sender's input bad
    false: list[tuple[int, str]] = []  # (accuser, reason) of the accusations not proven
    for signed, accuser, accused, reason, proof in accusations:
        if reason == "result":
            digests = receipt_digests(ctx, Signed.from_wire(proof), "result", accused)
            commit = commits.get(accused)
            proven = digests is not None and commit is not None and commit[4] != digests
            if proven:
                equivocated.add(accused)
        elif reason == "input":
            if accuser in equivocated:
                continue
            if signed.signature not in evidence:
                # its bytes are not at hand: an owner's word against a sender's, and one of them lies
                ban(accused, f"disputed by member {accuser} (input, unshown)")
                ban(accuser, f"disputed member {accused} (input, unshown)")
                upheld.add((accuser, accused))
                continue
            proven = _input_accusation_holds(
                ctx,
                seed,
                accuser,
                accused,
                Signed.from_wire(proof),
                evidence.get(signed.signature),
                checks,
                result_D,
            )
            if proven:
                upheld.add((accuser, accused))
        elif reason == "update":
            if recompute is None or accused not in checks:
                continue
            proven = not _update_fits(ctx, seed, checks[accused][2], recompute(accused), result_D)
        else:
            proven = False
        if proven:
            ban(accused, f"accused by member {accuser}: {reason}")
        else:
            false.append((accuser, f"accused member {accused} falsely ({reason})"))
    for accuser, reason in false:  # after the proven ones: a lie shown on its own bytes is the reason given
        ban(accuser, reason)

    # every owner's result must fit its inputs: the clipped differences sum to zero
    for owner, commit in commits.items():
        used = commit[3]
        if owner in banned or not used or not all(isinstance(m, int) and m in checks for m in used):
            continue
        if any((owner, sender) in upheld for sender in used):
            continue  # a sender lied about its checks: the sum proves nothing about the owner
        values = [checks[m][2][owner] for m in used]
        if not all(isinstance(v, list) and len(v) == 4 for v in values):
            continue
        total = sum(float(v[0]) for v in values)
        # 1e-3 of the clipped spread, and the float32 rounding of v (1e-6 of it, weighed by each clip scale)
        tolerance = _RTOL * sum(abs(float(v[2])) for v in values) + 1e-6 * sum(
            abs(float(v[3])) for v in values
        )
        if abs(total) > tolerance + _ATOL:
            ban(
                owner,
                f"its result does not fit its inputs (clipped differences of {len(used)} sum to {total:.3g}, "
                f"tolerance {tolerance:.3g})",
            )
    return banned


def without_banned_owners(
    ctx: RoundContext, result_D: torch.Tensor, banned: Mapping[int, str]
) -> torch.Tensor:
    """The round's result with the shares of owners banned in it set to zero (as for an owner that fails): what
    every honest member keeps, whatever a lying owner sent each of them."""
    result_D = result_D.clone()
    for owner in banned:
        for a, b in ctx.shares[owner]:
            result_D[a:b] = 0
    return result_D


def _input_accusation_holds(
    ctx: RoundContext,
    seed: bytes,
    owner: int,
    sender: int,
    receipt: Signed | None,
    parts: Sequence[torch.Tensor] | None,
    checks: Mapping[int, list],
    result_D: torch.Tensor,
) -> bool:
    """An owner's accusation of a sender: the sender's receipt covers the parts shown, and the parts are bad, or
    do not give the checks the sender signed."""
    if receipt is None or parts is None:
        return False
    proven, problem = _input_problem(ctx, sender, owner, receipt, list(parts))
    if not proven:
        return False
    if problem is not None:
        return True
    if len(parts) != len(ctx.shares[owner]):
        return False
    check = checks.get(sender)
    if check is None or not isinstance(check[2], list) or len(check[2]) != ctx.size:
        return False
    actual = _projections(ctx, seed, owner, [[p.float() for p in parts]], ctx.parts(result_D, owner))[0]
    return not _fits(ctx, check[2][owner], actual)
