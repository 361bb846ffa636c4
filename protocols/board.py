"""The board of a verified round: where the members of one averaging group post their signed statements, in the
DHT, and run the phases of ``verification`` after the all-reduce.

Each phase has its own key, ``"{prefix}.btard.{round id}.{phase}"``; a member posts its statements of the phase
as one value in the subkey it owns (``dht.local_subkey``: nobody else can overwrite or erase it), then reads the
key until every member posted or ``timeout`` ran out. The statements carry their own signatures, so the DHT is
only trusted to relay them::

    member = MemberRound.from_transcript(round.transcript, key, sent_D, result_D)
    verdict = run_round(dht, "swarm-train-my-run", member, rate=0.25, recompute=replay, timeout=30)
    # {member index: why it is banned}; every honest member finds the same

A phase's value must stay small (the DHT process dies on requests over ~16 KiB): statements that would not fit
are left out, and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import hivemind
import torch
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm_peer.dht.identity import peer_id_from_public_key
from swarm_peer.dht.keys import parse_peer_subkey
from swarm_peer.dht.node import local_subkey, run_in_dht
from swarm_peer.errors import ValidationError
from swarm_peer.protocols.verification import MemberRound, Signed, judge, round_seed

__all__ = ["PHASES", "collect", "peers_of", "post", "run_round"]

logger = logging.getLogger(__name__)

PHASES = ("commit", "reveal", "check", "accuse", "fetched")
_TTL = 600.0  # seconds a round's statements stay on the board
_MAX_VALUE_BYTES = 12 * 1024
_POLL = 0.1
_FETCHES = 2  # tries to get an accusation's bytes from its accuser


def _key(prefix: str, round_id: bytes, phase: str) -> str:
    return f"{prefix}.btard.{round_id.hex()}.{phase}"


async def _store(
    _dht, node: hivemind.DHTNode, *, timeout: float, key: str, subkey: bytes, value: Any, expiration: float
):
    try:
        return bool(await asyncio.wait_for(node.store(key, value, expiration, subkey=subkey), timeout))
    except TimeoutError:
        return None


async def _get(_dht, node: hivemind.DHTNode, *, timeout: float, key: str) -> list | None:
    try:
        found = await asyncio.wait_for(node.get(key, latest=True), timeout)
    except TimeoutError:
        return None
    if found is None or not isinstance(found.value, dict):
        return []
    return [(subkey, entry.value) for subkey, entry in found.value.items()]


def post(dht: hivemind.DHT, prefix: str, round_id: bytes, phase: str, statements: Sequence[Signed]) -> bool:
    """Posts this member's statements of a phase (replacing what it posted there before)."""
    wires = []
    for statement in statements:
        wire = statement.to_wire()
        if len(MSGPackSerializer.dumps(wires + [wire])) > _MAX_VALUE_BYTES:
            logger.warning("Left a %s statement off the board: too large for the DHT", phase)
            continue
        wires.append(wire)
    return bool(
        run_in_dht(
            dht,
            _store,
            timeout=10.0,
            key=_key(prefix, round_id, phase),
            subkey=local_subkey(dht),
            value=wires,
            expiration=get_dht_time() + _TTL,
        )
    )


def collect(
    dht: hivemind.DHT, prefix: str, round_id: bytes, phase: str, keys: Sequence[bytes], timeout: float
) -> list[Signed]:
    """Every statement of a phase on the board, once each member (by key) posted (maybe nothing: no accusation),
    or when ``timeout`` ran out. Values that are not lists of statements are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        found = run_in_dht(
            dht,
            _get,
            timeout=max(1.0, min(5.0, deadline - time.monotonic())),
            key=_key(prefix, round_id, phase),
        )
        statements, posted = [], set()
        for subkey, value in found or ():
            try:
                posted.add(parse_peer_subkey(subkey)[1])  # the DHT lets only the key's owner write its subkey
            except ValidationError:
                continue
            if isinstance(value, list):
                statements += [signed for wire in value if (signed := Signed.from_wire(wire)) is not None]
        if all(key in posted for key in keys if key) or time.monotonic() >= deadline:
            return statements
        time.sleep(_POLL)


def run_round(
    dht: hivemind.DHT,
    prefix: str,
    member: MemberRound,
    *,
    rate: float,
    recompute: Callable[[int], torch.Tensor | None],
    evidence: tuple[
        Callable[[bytes, Sequence[torch.Tensor]], None], Callable[[str, bytes], Sequence[torch.Tensor] | None]
    ]
    | None = None,
    timeout: float,
) -> dict[int, str]:
    """Runs the phases after the all-reduce (commit, reveal, check, accuse, fetched) and judges the round: {member index:
    reason} for those proven dishonest. ``recompute(member)``: the update that member's data gives (validation,
    and to judge ``update`` accusations); ``evidence``: (keep, fetch), how the bytes that an ``input`` accusation
    rests on reach the judges: ``keep(signature, parts)`` serves this member's, ``fetch(accuser's peer id,
    signature)`` gets another's, tried twice (without them, the member judges such an accusation a dispute: both
    sides banned). Then each member posts that it fetched what it needed (phase ``fetched``, no statement), and a
    member that serves bytes waits for all to say so (at most ``timeout``): a volunteer that leaves the run after
    its last round would otherwise take its bytes with it, and its honest accusation would become a dispute."""
    ctx = member.ctx
    keys = [key for key in ctx.keys if key]
    board: list[Signed] = []

    def phase(name: str, statements: Sequence[Signed]) -> None:
        post(dht, prefix, ctx.round_id, name, statements)
        board.extend(collect(dht, prefix, ctx.round_id, name, keys, timeout))

    phase("commit", [member.commit()])
    phase("reveal", [member.reveal()])
    seed = round_seed(ctx, board)
    phase("check", [member.check(seed)])
    found = member.accusations(board, seed, rate=rate, recompute=recompute)
    own = {a.signed.signature: a.parts for a in found}
    if evidence is not None:
        for accusation in found:
            if accusation.parts:
                evidence[0](accusation.signed.signature, accusation.parts)
    phase("accuse", [a.signed for a in found])
    proofs: dict[bytes, Sequence[torch.Tensor]] = {}
    for signed in board:
        body = signed.body
        if body is None or body[0] != "accuse" or len(body) < 4 or body[3] != "input":
            continue
        if evidence is None:  # nobody can see the bytes: every member judges it a dispute alike
            continue
        parts = own.get(signed.signature)
        if parts is None and ctx.index(signed.key) is not None:
            accuser = peer_id_from_public_key(signed.key).to_base58()
            # a lost answer would make this member's verdict differ from the others'
            for _ in range(_FETCHES):
                if (parts := evidence[1](accuser, signed.signature)) is not None:
                    break
        if parts is not None:
            proofs[signed.signature] = parts
    if evidence is not None:
        post(dht, prefix, ctx.round_id, "fetched", [])
        if any(own.values()):
            collect(dht, prefix, ctx.round_id, "fetched", keys, timeout)
    result_D = member.result_D
    if result_D is None:  # some owner's result never came: nothing to judge with
        return {}
    return judge(ctx, board, proofs, result_D=result_D, recompute=recompute)


def peers_of(ctx_keys: Sequence[bytes], verdict: Mapping[int, str]) -> dict[str, str]:
    """A verdict by peer id (base58)."""
    return {peer_id_from_public_key(ctx_keys[m]).to_base58(): why for m, why in verdict.items()}
