"""Robust group averaging: hivemind's butterfly all-reduce, with each part reduced by a robust aggregator.

Peers that share a ``prefix`` (a training run) find each other through the DHT and form groups (hivemind's
matchmaking: at least ``min_group_size`` peers, at most ``target_group_size``). In a group of n, the averaged
vector is split into n parts, one owned by each member; every member streams each owner its copy of that part;
the owner reduces the n copies with the aggregator (``protocols.aggregators``) and sends the one result back to
every member. This is BTARD's ButterflyClip (Gorbunov et al., "Secure Distributed Training at Scale", ICML 2022)
when the aggregator is CenteredClip, and hivemind's all-reduce (DeDLOC, Diskin et al., NeurIPS 2021) when it is the
mean. What differs from hivemind's ``DecentralizedAverager`` (subclassed here, its transport and matchmaking
kept):

- **parts are reduced by the aggregator**, and the weights that senders claim are ignored (an attacker would
  claim a large one); every member owns an equal share of the vector, whatever bandwidth it claims. A member's
  share travels in parts of at most ``part_size_bytes`` (512 KiB by default, fewer bytes for small vectors so
  that every member gets several), each reduced on its own as soon as all copies of it arrived, while the next
  ones stream in: CenteredClip's radius and an attacker's bounded pull apply per part, where BTARD applies them
  to a member's whole share;
- **owners send results, not differences**: every member sets its part to the bytes the owner sent, so the
  members of a group end a round holding identical tensors (hivemind sends ``average - your part``, which a
  receiver adds to its own: rounding, or an owner that lies, then leaves each member with a different vector);
- **inputs are checked** before they are aggregated: a part of the wrong shape or with a NaN or an infinity gets
  its sender dropped from the round and banned from this averager's later rounds (a local ban: it is refused
  as a group member and its inputs are ignored where it still appears);
- **a part whose owner fails** (dies, stalls past ``reducer_timeout``) comes back as zeros, on every member alike,
  and a sender that stalls past ``sender_timeout`` is left out: the others finish the round.

Tensors are averaged in place (hivemind's ``get_tensors()`` gives access between rounds); ``average()`` runs one
round and says who took part::

    averager = RobustAverager([grad], dht, prefix="my-run", aggregator="centered_clip", min_group_size=4)
    with averager.get_tensors() as (averaged,):
        averaged.copy_(my_update)
    result = averager.average(timeout=60)  # AveragingRound, or None when no group formed in time
    with averager.get_tensors() as (averaged,):
        use(averaged)

Groups smaller than the swarm mix it Moshpit-style (Ryabinin et al., "Moshpit SGD", NeurIPS 2021) through
hivemind's group keys: with ``target_group_size=G`` and ``initial_group_bits`` naming a row of a grid (log2 G bits),
members of one row average together, then each moves to a new coordinate drawn from the group's id, so that the
next round mixes across rows: d rounds of groups of G give the exact mean of a full G^d grid.

A result owner can still lie about its part (the same lie to everyone); catching it is verification's job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import AsyncIterator  # noqa: UP035 (hivemind reads RPC stream types from typing's alias only)

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import (
    CompressionInfo,
    NoCompression,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, MSGPackSerializer
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    as_aiter,
    attach_event_on_finished,
    azip,
)
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.streaming import combine_from_streaming

from swarm_peer.dht.identity import peer_id_from_public_key, public_key_bytes
from swarm_peer.dht.process import exit_when_orphaned
from swarm_peer.errors import ValidationError
from swarm_peer.protocols import aggregators
from swarm_peer.protocols.verification import (
    RoundContext,
    Signed,
    Transcript,
    digest,
    flat_index,
    receipt_digests,
)

__all__ = ["AveragingRound", "RobustAverager"]

logger = logging.getLogger(__name__)

_PARTS_PER_MEMBER = 4  # at least this many parts per member, when the vector is small
_IN_FLIGHT = 2  # parts reduced at once by one member, and parts of one sender taken in ahead of its results
_MIN_PART_BYTES = 4096
_KEPT_EVIDENCE = 16  # accusations whose bytes an averager serves


@dataclass(frozen=True)
class AveragingRound:
    """One finished round: the group's members (peer ids, base58), what each gathered along, and, when the
    averager verifies, this member's transcript of it."""

    peers: tuple[str, ...]
    gathered: dict[str, object]
    transcript: Transcript | None = None


@dataclass(frozen=True)
class _Finished:
    """What a round returns from the averager's process."""

    gathered: dict
    transcript: Transcript | None


class RobustAverager(DecentralizedAverager):
    """hivemind's ``DecentralizedAverager`` with robust reduction (module docstring). Runs in its own process,
    which ends when the creating process does (even on SIGKILL).

    ``aggregator``, ``byzantine``, ``tau``: the rule (``aggregators.make``). ``verify_key``: this peer's identity key;
    with it, every round is verifiable (``protocols.verification``): each sender's parts come with its signed
    receipt and each owner's result with the owner's, CenteredClip runs with a radius the group agrees on (the
    median of what members propose), and ``average`` returns the member's ``Transcript``. Every other keyword goes to
    ``DecentralizedAverager`` (``prefix``, ``min_group_size``, ``target_group_size``, ``min_matchmaking_time``,
    ``compression``, ``part_size_bytes``, ...); the timeouts default to bounded values here (hivemind's are none).
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht,
        *,
        aggregator: str = "centered_clip",
        byzantine: int | None = None,
        tau: float | None = None,
        verify_key: RSAPrivateKey | None = None,
        lie: float = 0.0,
        sender_timeout: float = 15.0,
        reducer_timeout: float = 30.0,
        allreduce_timeout: float = 120.0,
        next_chunk_timeout: float = 15.0,
        start: bool = True,
        **kwargs,
    ):
        aggregators.make(
            aggregator, byzantine=byzantine, tau=tau
        )  # an unknown rule fails here, not in the child
        if verify_key is not None and aggregator != "centered_clip":
            raise ValidationError(f"verified averaging runs CenteredClip, not {aggregator!r}")
        if verify_key is not None and type(kwargs.get("compression", NoCompression())) is not NoCompression:
            raise ValidationError(
                "verified averaging sends uncompressed parts (receipts cover the exact bytes)"
            )
        self.aggregator, self.byzantine, self.tau = aggregator, byzantine, tau
        self.verify_key = verify_key
        self._lie = lie  # (testing) what this peer adds, as a dishonest owner, to every result it sends
        self._banned: set[PeerID] = set()  # in the averager's process: peers left out of every later round
        self._evidence: dict[bytes, list[torch.Tensor]] = {}  # in the averager's process: ``keep_evidence``
        super().__init__(
            averaged_tensors,
            dht,
            start=False,
            sender_timeout=sender_timeout,
            reducer_timeout=reducer_timeout,
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=next_chunk_timeout,
            **kwargs,
        )
        if start:
            # hivemind ignores SIGINT in the calling process too (for the child it forks): keep Ctrl-C working here
            handler = signal.getsignal(signal.SIGINT)
            try:
                self.run_in_background(await_ready=True)
            finally:
                signal.signal(signal.SIGINT, handler)

    def run(self) -> None:  # in the averager's process
        # reductions run in threads, a few at once, next to the caller's own compute: one torch thread each (more
        # only oversubscribe the cores: a 10M-value round of 8 peers went from 1.45x to 1.2x hivemind's time)
        torch.set_num_threads(1)
        parent = self._parent_pid
        threading.Thread(
            target=exit_when_orphaned, args=(parent,), name="averager-watchdog", daemon=True
        ).start()
        super().run()

    # ---------------------------------------------------------------- the caller's side

    def average(
        self,
        timeout: float,
        gather: object = None,
        tau: float | None = None,
        *,
        group_bits: str | None = None,
        group_size: int | None = None,
    ) -> AveragingRound | None:
        """Runs one round: finds a group (within ``timeout`` seconds) and averages the tensors in place with it.
        ``gather``: a small msgpack-able value every member receives; ``tau``: the clipping radius this member
        proposes, per coordinate (verified averaging only: the round clips each part at the median of the
        proposals times the square root of the part's length). ``group_bits``, ``group_size``: this round's group
        key and group size (a Moshpit round, ``protocols.moshpit``), from this round on; the smallest group stays
        ``min_group_size``, or the whole group when it is smaller. None when no group formed
        or the round failed: the tensors may then hold part of a result, so use your own values instead."""
        if group_bits is not None or group_size is not None:
            # through the control pipe, which the averager's process reads in order: set before the step starts
            future = MPFuture()
            self._outer_pipe.send(("_set_group", [group_bits, group_size], dict(future=future)))
            future.result(timeout=10)
        if self.verify_key is not None:
            gather = [public_key_bytes(self.verify_key), tau, gather]
        try:
            finished = self.step(gather=gather, timeout=timeout, allow_retries=False)
        except Exception as e:  # hivemind raises what failed: matchmaking, all-reduce, timeouts
            logger.info("No averaging this round: %s", e or type(e).__name__)
            return None
        if finished is None:
            return None
        gathered = finished.gathered
        return AveragingRound(
            tuple(str(peer) for peer in gathered),
            {str(p): v for p, v in gathered.items()},
            finished.transcript,
        )

    async def _set_group(self, group_bits: str | None, group_size: int | None, future: MPFuture) -> None:
        matchmaking = self._matchmaking
        if group_bits is not None:
            if not all(bit in "01" for bit in group_bits):
                future.set_exception(ValueError(f"group bits are 0s and 1s, not {group_bits!r}"))
                return
            matchmaking.group_key_manager.group_bits = group_bits
        if group_size is not None:
            # hivemind keeps the target in three places: the matchmaking, the key manager, the leaders' queue
            matchmaking.target_group_size = group_size
            matchmaking.group_key_manager.target_group_size = group_size
            matchmaking.potential_leaders.target_group_size = group_size
            matchmaking.min_group_size = min(self.matchmaking_kwargs["min_group_size"], group_size)
        future.set_result(None)

    def ban(self, peers: Sequence[str]) -> None:
        """Leaves these peers (base58 ids) out of every later round of this averager."""
        future = MPFuture()
        self._outer_pipe.send(("_add_banned", [list(peers)], dict(future=future)))
        future.result(timeout=10)

    async def _add_banned(self, peers: list[str], future: MPFuture) -> None:
        self._banned.update(PeerID.from_base58(peer) for peer in peers)
        future.set_result(None)

    # ---------------------------------------------------------------- evidence of verified rounds

    _rpc_handlers = (
        None  # hivemind collects a class's rpc_* methods once, maybe from the base class: ours too
    )

    def keep_evidence(self, signature: bytes, parts: Sequence[torch.Tensor]) -> None:
        """Serves ``parts`` (the bytes an accusation rests on) to the members that judge it, under the accusation's
        signature; the last ``_KEPT_EVIDENCE`` are kept."""
        future = MPFuture()
        self._outer_pipe.send(("_keep_evidence", [signature, list(parts)], dict(future=future)))
        future.result(timeout=30)

    async def _keep_evidence(self, signature: bytes, parts: list[torch.Tensor], future: MPFuture) -> None:
        self._evidence[signature] = parts
        while len(self._evidence) > _KEPT_EVIDENCE:
            self._evidence.pop(next(iter(self._evidence)))
        future.set_result(None)

    def fetch_evidence(self, peer: str, signature: bytes, timeout: float = 30.0) -> list[torch.Tensor] | None:
        """The parts another member keeps for its accusation with this signature, or None (no answer in time,
        nothing kept, or more values than this averager averages)."""
        future = MPFuture()
        self._outer_pipe.send(("_fetch_evidence", [peer, signature, timeout], dict(future=future)))
        return future.result(timeout=timeout + 10)

    async def _fetch_evidence(self, peer: str, signature: bytes, timeout: float, future: MPFuture) -> None:
        parts: list[torch.Tensor] = []

        async def fetch() -> None:
            stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
            stream = await stub.rpc_evidence(averaging_pb2.AveragingData(group_id=signature))
            async for message in stream:
                parts.append(deserialize_torch_tensor(message.tensor_part))
                if sum(part.numel() for part in parts) > self.total_size:
                    raise ValidationError(f"{peer} sent more evidence than a whole update")

        try:
            await asyncio.wait_for(fetch(), timeout)
            future.set_result(parts or None)
        except Exception as e:  # no answer, a broken stream, too much: no evidence
            logger.info("No evidence from %s: %r", peer, e)
            future.set_result(None)

    async def rpc_evidence(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        for part in self._evidence.get(request.group_id, ()):
            yield averaging_pb2.AveragingData(tensor_part=serialize_torch_tensor(part))

    def banned_peers(self) -> frozenset[str]:
        """Peers this averager left out for sending malformed or non-finite parts (base58 peer ids)."""
        future = MPFuture()
        self._outer_pipe.send(("_get_banned", [], dict(future=future)))
        return future.result(timeout=10)

    async def _get_banned(self, future: MPFuture) -> None:
        future.set_result(frozenset(str(peer) for peer in self._banned))

    # ---------------------------------------------------------------- in the averager's process

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None) -> None:
        """As hivemind's: the state of the first peer that sends one, among those listed under the run's
        ``all_averagers`` key, highest sharing priority first; but never a banned peer's (a liar's state would
        be taken whole)."""
        chunk_timeout = self.next_chunk_timeout or self.request_timeout
        try:
            listed, _ = self.dht.get(f"{self.prefix}.all_averagers", latest=True) or ({}, None)
            candidates = [
                (priority, random.random(), PeerID(peer))  # random: a tie breaker
                for peer, entry in (listed.items() if isinstance(listed, dict) else ())
                if isinstance(peer, bytes)
                and isinstance(priority := getattr(entry, "value", None), float | int)
            ]
            for *_, peer in sorted(candidates, key=lambda c: c[:2], reverse=True):
                if peer == self.peer_id or peer in self._banned:
                    continue
                try:
                    state = await self._download_state(peer, chunk_timeout)
                except Exception as e:  # no answer, a broken stream, garbage: try the next peer
                    logger.info("No state from %s: %r", peer, e)
                    continue
                if state is not None:
                    future.set_result(state)
                    return
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_state(self, peer: PeerID, chunk_timeout: float) -> tuple[object, list] | None:
        """(metadata, tensors) as ``peer`` shares them, or None if it shares none. A tensor arrives as a run of
        parts; the first part of each carries its dtype."""
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, tensors, parts = None, [], []
        async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            if message.HasField("tensor_part"):
                parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return (metadata, tensors) if metadata else None

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if context.remote_id in self._banned:  # as a leader: a banned peer joins no group of ours
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _step(self, **kwargs):
        self._follow_no_banned_leader()
        return await super()._step(**kwargs)

    def _follow_no_banned_leader(self) -> None:
        """As a follower: a banned peer is no leader of ours (hivemind's matchmaking has no hook for it, so its
        join request is wrapped, once)."""
        matchmaking = self._matchmaking
        if getattr(matchmaking, "_refuses_banned", False):
            return
        request_join_group = matchmaking._request_join_group

        async def join_unless_banned(leader: PeerID):
            return None if leader in self._banned else await request_join_group(leader)

        matchmaking._request_join_group = join_unless_banned
        matchmaking._refuses_banned = True

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        """As hivemind's, but every member that aggregates gets an equal share, whatever bandwidth it claims."""
        try:
            members = [self._member(data) for data in group_info.gathered]  # the same list on every member
            fractions = tuple(0.0 if mode == AveragingMode.CLIENT else 1.0 for mode, _ in members)
            verified = None
            if self.verify_key is not None:
                verified = _verified_members(group_info, [user for _, user in members])
                members = [(mode, user[2] if isinstance(user, list) else None) for mode, user in members]
            with self.get_tensors() as local_tensors:  # averaged by this process only: no other writer
                transcript = await self._run_allreduce_inplace_(
                    local_tensors, group_info, peer_fractions=fractions, verified=verified, **kwargs
                )
            gathered = {peer: user for peer, (_, user) in zip(group_info.peer_ids, members, strict=True)}
            return _Finished(gathered, transcript)
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("All-reduce failed", exc_info=True)
            raise AllreduceException(f"unable to run all-reduce: {e!r}") from e

    def _member(self, data: bytes) -> tuple[AveragingMode, object]:
        """A member's mode and gathered value; a member that sent garbage only sends (it owns no part)."""
        try:
            _, mode, user = self.serializer.loads(data)
            return AveragingMode(mode), self.serializer.loads(user)
        except Exception:
            return AveragingMode.CLIENT, None

    async def _run_allreduce_inplace_(
        self, tensors, group_info: GroupInfo, group_id=None, verified=None, **kwargs
    ) -> Transcript | None:
        group_id = group_info.group_id if group_id is None else group_id
        # hivemind hands each member whole parts: parts small enough for several per member keep shares equal
        total_bytes = sum(t.numel() * t.element_size() for t in tensors)
        kwargs["part_size_bytes"] = int(
            min(
                kwargs["part_size_bytes"],
                max(_MIN_PART_BYTES, total_bytes / (_PARTS_PER_MEMBER * group_info.group_size)),
            )
        )
        rule = aggregators.make(self.aggregator, byzantine=self.byzantine, tau=self.tau)
        if verified is not None:  # CenteredClip to its fixed point, with the group's radius (per part)
            part_values = min(kwargs["part_size_bytes"] // 4, max(t.numel() for t in tensors))
            verified = (verified[0], verified[1] * math.sqrt(part_values))
            rule = partial(aggregators.centered_clip, tau=verified[1], iterations=1000)
        if self._lie:
            rule = _shifted(rule, self._lie)
        runner = _RobustRunner(
            rule=rule,
            banned=self._banned,
            verified=verified and (self.verify_key, *verified),
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        async for tensor, result in azip(as_aiter(*tensors), runner):
            tensor.copy_(result)  # the owners' results themselves: every member ends with the same values
        return runner.recorder.transcript() if runner.recorder is not None else None


def _shifted(rule, lie: float):
    return lambda x_ND: rule(x_ND) + lie


def _verified_members(group_info: GroupInfo, gathered: list) -> tuple[tuple[bytes, ...], float]:
    """The members' keys (b"" for a member whose key is not its peer id's: nothing it signs verifies) and the
    round's clipping radius per coordinate: the median of the radii members propose (finite, positive ones)."""
    keys, proposals = [], []
    for peer, user in zip(group_info.peer_ids, gathered, strict=True):
        key = user[0] if isinstance(user, list) and len(user) == 3 and isinstance(user[0], bytes) else b""
        try:
            keys.append(key if peer_id_from_public_key(key) == peer else b"")
        except ValidationError:
            keys.append(b"")
        tau = user[1] if isinstance(user, list) and len(user) == 3 else None
        if keys[-1] and isinstance(tau, float) and math.isfinite(tau) and tau > 0:
            proposals.append(tau)
    if not proposals:
        raise AllreduceException("no member proposed a clipping radius")
    return tuple(keys), statistics.median(proposals)


class _Inputs:
    """Stands in for ``TensorPartReducer``'s running sum: keeps every sender's copy of the part instead (the
    weight a sender claims is ignored)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> None:
        self.parts.append(part)


class _RobustReducer(TensorPartReducer):
    """Reduces each part with ``rule`` over the senders' copies, in a thread (off the event loop). Once all copies
    of a part arrived, the next part is taken in while this one is reduced; at most ``_IN_FLIGHT`` parts are
    reduced at once (memory: that many parts times the senders, beside the part being received)."""

    def __init__(self, part_shapes, num_senders: int, rule):
        self.rule, self._in_flight, self._blocked = rule, 0, False
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _Inputs()

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from < self.num_current_senders or self.finished.is_set():
            return
        if self._in_flight >= _IN_FLIGHT:
            self._blocked = True  # taken up when a reduction ends
            return
        self._blocked = False
        parts, future = self.accumulator.parts, self.current_part_future
        shape = self.part_shapes[self.current_part_index]
        self._in_flight += 1
        task = asyncio.get_running_loop().run_in_executor(None, _reduce, self.rule, parts, shape)
        task.add_done_callback(lambda task: self._reduced(task, future))
        # the next part: its senders' copies are taken in while this one is reduced (the last part finalizes,
        # which cancels the current future: this part's is no longer it)
        self.current_part_future = asyncio.Future()
        self.reset_accumulators()

    def _reduced(self, task: asyncio.Future, future: asyncio.Future) -> None:
        self._in_flight -= 1
        if not future.done():
            if task.exception() is not None:
                future.set_exception(task.exception())
            else:
                future.set_result(task.result())
        if self._blocked:
            self.check_current_part_finished()


def _reduce(rule, parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    if not parts:  # every sender of this part failed
        return torch.zeros(shape)
    x_ND = torch.stack([part.flatten().float() for part in parts])
    return rule(x_ND).reshape(shape)


class _RobustRunner(AllReduceRunner):
    """hivemind's ``AllReduceRunner`` with ``_RobustReducer``, checked inputs, results sent instead of
    differences, and the averager's banned peers left out."""

    def __init__(self, *, rule, banned: set[PeerID], verified=None, **kwargs):
        super().__init__(**kwargs)
        hivemind_reducer = self.tensor_part_reducer
        hivemind_reducer.finished.set()  # unused: not a failed round to warn about
        self.tensor_part_reducer = _RobustReducer(
            hivemind_reducer.part_shapes, hivemind_reducer.num_senders, rule
        )
        self.banned = banned
        container = self.tensor_part_container
        self._expected_shapes = [
            [part.shape for part, _ in parts] for parts in container._input_parts_by_peer
        ]
        self._register = container.register_processed_part
        container.register_processed_part = self._register_checked  # every result, an owner's or our own
        self.recorder = None
        if verified:
            key, keys, tau = verified
            parts_by_owner = [[part for part, _ in parts] for parts in container._input_parts_by_peer]
            self.recorder = _Recorder(
                key, RoundContext(self.group_id, keys, _shares(parts_by_owner), tau), parts_by_owner
            )
        for peer in banned.intersection(self.sender_peer_ids):  # a banned member's inputs are not waited for
            self.active_senders.add(peer)
            self.banned_senders.add(peer)
            self.tensor_part_reducer.on_sender_failed(self.sender_peer_ids.index(peer))
        if len(self.active_senders) == len(self.sender_peer_ids):
            self.all_senders_started.set()

    def _register_checked(self, peer_index: int, part_index: int, part: torch.Tensor) -> None:
        """A result of the wrong shape or with non-finite values counts as no result (zeros, on every member that
        got those bytes alike), and its owner is left out of later rounds."""
        problem = _problem(part, self._expected_shapes[peer_index][part_index])
        if problem:
            owner = self.ordered_peer_ids[peer_index]
            if owner != self.peer_id:
                self.banned.add(owner)
            logger.warning("Left %s out of this run's averaging: as an owner, it returned %s", owner, problem)
            part = torch.zeros(self._expected_shapes[peer_index][part_index])
        self._register(peer_index, part_index, part)

    def _check_reasons_to_reject(self, request, context: P2PContext):
        if context.remote_id in self.banned:
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        return super()._check_reasons_to_reject(request, context)

    async def _communicate_with_peer(self, peer_id: PeerID):
        if peer_id != self.peer_id:
            if self.recorder is not None:
                return await self._communicate_verified(peer_id)
            return await super()._communicate_with_peer(
                peer_id
            )  # it sends its results: registered as they come
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        compression = self.tensor_part_container.compression
        try:
            for part_index, part in enumerate(self.parts_for_local_averaging):
                if self.recorder is not None:
                    self.recorder.take_input(peer_index, part_index, self.recorder.receipt_bytes, part)
                result = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part)
                # what the others get is the result after its trip through the codec: keep exactly that
                result = deserialize_torch_tensor(
                    compression.compress(result, CompressionInfo.from_tensor(result))
                )
                if self.recorder is not None:
                    self.recorder.result_parts.append(result)
                self.tensor_part_container.register_processed_part(peer_index, part_index, result)
        finally:
            if self.recorder is not None:
                self.recorder.sign_result()

    async def _communicate_verified(self, peer_id: PeerID):
        """As hivemind's exchange with one owner, but the owner's result is taken only whole, with the receipt
        that comes with its last part: a result that does not match its receipt counts as none (zeros)."""
        peer_index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            parts, receipt = [], b""

            def decode(message):
                if message.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(message.code)}")
                return deserialize_torch_tensor(message.tensor_part), message.peer_id

            async for part, extra in amap_in_executor(
                decode, aiter_with_timeout(stream, self.reducer_timeout), max_prefetch=container.prefetch
            ):
                parts.append(part)
                receipt = extra or receipt
            if len(parts) != container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"{peer_id} sent {len(parts)} result parts")
            if not self.recorder.take_result(peer_index, receipt, parts):
                logger.warning("Dropped the result of %s: it does not match its receipt", peer_id)
                parts = [torch.zeros_like(part) for part in parts]
            for part_index, part in enumerate(parts):
                container.register_processed_part(peer_index, part_index, part)
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("Exchange with %s failed", peer_id, exc_info=True)
            container.register_failed_reducer(peer_index)
            raise

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        first = True
        async for message in super()._generate_input_for_peer(peer_index):
            if first and self.recorder is not None:
                message.peer_id = (
                    self.recorder.receipt_bytes
                )  # the receipt rides in a field owners do not read
            first = False
            yield message

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """Takes in a sender's parts and answers each with its part's result, in order. Unlike hivemind's, the
        next part is taken in before this one's result is ready (up to ``_IN_FLIGHT`` ahead): reducing a part
        then overlaps receiving the next ones."""
        sender = self.sender_peer_ids[sender_index]
        reducer, delivered = self.tensor_part_reducer, 0
        pending: asyncio.Queue = asyncio.Queue(maxsize=_IN_FLIGHT)  # (result future, codec), None at the end

        async def take_in() -> None:
            part_index = 0
            try:
                async for part, compression, receipt in amap_in_executor(
                    lambda message: (
                        deserialize_torch_tensor(message.tensor_part),
                        message.tensor_part.compression,
                        message.peer_id,
                    ),
                    stream,
                    max_prefetch=self.tensor_part_container.prefetch,
                ):
                    shape = reducer.part_shapes[part_index] if part_index < reducer.num_parts else None
                    problem = None
                    if self.recorder is not None:
                        member = self.ordered_peer_ids.index(sender)
                        problem = self.recorder.take_input(member, part_index, receipt, part)
                    problem = problem or _problem(part, shape)
                    if problem:
                        self.banned.add(sender)
                        logger.warning("Left %s out of this run's averaging: it sent %s", sender, problem)
                        break
                    result = asyncio.ensure_future(reducer.accumulate_part(sender_index, part_index, part))
                    result.add_done_callback(
                        _retrieve
                    )  # its error, if any, is the consumer's to see, or nobody's
                    await pending.put((result, compression))
                    part_index += 1
            except (
                Exception
            ) as e:  # the stream broke or stalled: what came is answered, then the sender is out
                logger.debug("Stream of %s ended: %r", sender, e)
            await pending.put(None)

        taker = asyncio.create_task(take_in())
        loop = asyncio.get_running_loop()
        try:
            while (item := await pending.get()) is not None:
                result, compression = item
                try:
                    averaged = await result
                except BannedException:
                    break  # left out meanwhile (it stalled): nothing more of it is aggregated
                serialized = await loop.run_in_executor(None, serialize_torch_tensor, averaged, compression)
                message = averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART, tensor_part=serialized
                )
                if self.recorder is not None and delivered == reducer.num_parts - 1:
                    message.peer_id = await self.recorder.result_receipt  # with the last part: all are known
                yield message
                delivered += 1
        finally:
            # parts already handed to the reducer stay there (it counts on them); only the intake stops
            taker.cancel()
            if delivered != reducer.num_parts:
                await self._ban_sender(sender)


def _shares(parts_by_owner: list[list[torch.Tensor]]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Each owner's parts as (start, end) of the flat vector: hivemind assigns parts to owners in flat order."""
    shares, start = [], 0
    for parts in parts_by_owner:
        share = []
        for part in parts:
            share.append((start, start + part.numel()))
            start += part.numel()
        shares.append(tuple(share))
    return tuple(shares)


class _Recorder:
    """A verified round's bookkeeping in the averager's process: signs this member's receipts, checks each
    sender's parts and each owner's result against theirs, and keeps what the member's ``Transcript`` holds."""

    def __init__(self, key: RSAPrivateKey, ctx: RoundContext, parts_by_owner: list[list[torch.Tensor]]):
        self.key, self.ctx = key, ctx
        self.me = ctx.index(public_key_bytes(key))
        digests = [digest(part) for parts in parts_by_owner for part in parts]
        self.receipt = Signed.make(key, "input", ctx.round_id, digests)
        self.receipt_bytes = MSGPackSerializer.dumps(self.receipt.to_wire())
        self.inputs: dict[int, tuple[Signed, list[torch.Tensor]]] = {}
        self.rejected: dict[int, tuple[Signed, list[torch.Tensor]]] = {}
        self.results: dict[int, Signed] = {}
        self.result_parts: list[torch.Tensor] = []
        self.result_receipt: asyncio.Future = asyncio.get_running_loop().create_future()
        self._receipts: dict[int, tuple[Signed, list[bytes]]] = {}

    def take_input(self, sender: int, index: int, receipt: bytes, part: torch.Tensor) -> str | None:
        """Why a sender's part cannot be aggregated, or None. A part its receipt covers that is malformed or not
        finite is kept, with the parts before it, as proof against the sender."""
        if index == 0:
            signed = _signed(receipt)
            digests = receipt_digests(self.ctx, signed, "input", sender)
            if digests is None or len(digests) != sum(len(share) for share in self.ctx.shares):
                return "no valid receipt"
            self._receipts[sender] = (signed, digests)
            self.inputs[sender] = (signed, [])
        if sender not in self.inputs:
            return "no valid receipt"
        signed, digests = self._receipts[sender]
        if (
            index >= len(self.ctx.shares[self.me])
            or digest(part) != digests[flat_index(self.ctx, self.me) + index]
        ):
            del self.inputs[sender]
            return "bytes that do not match its receipt"
        self.inputs[sender][1].append(part)
        a, b = self.ctx.shares[self.me][index]
        problem = _problem(part, torch.Size([b - a]))
        if problem is not None:
            self.rejected[sender] = self.inputs.pop(sender)
        return problem

    def sign_result(self) -> None:
        if not self.result_receipt.done():
            receipt = Signed.make(
                self.key, "result", self.ctx.round_id, self.me, [digest(p) for p in self.result_parts]
            )
            self.results[self.me] = receipt
            self.result_receipt.set_result(MSGPackSerializer.dumps(receipt.to_wire()))

    def take_result(self, owner: int, receipt: bytes, parts: list[torch.Tensor]) -> bool:
        signed = _signed(receipt)
        digests = receipt_digests(self.ctx, signed, "result", owner)
        if digests is None or digests != [digest(part) for part in parts]:
            return False
        self.results[owner] = signed
        return True

    def transcript(self) -> Transcript:
        complete = {
            sender: (signed, parts)
            for sender, (signed, parts) in self.inputs.items()
            if len(parts) == len(self.ctx.shares[self.me])
        }
        result_parts = self.result_parts if self.me in self.results else None
        return Transcript(
            self.ctx, self.receipt, complete, dict(self.rejected), dict(self.results), result_parts
        )


def _signed(data: bytes) -> Signed | None:
    try:
        return Signed.from_wire(MSGPackSerializer.loads(data)) if data else None
    except Exception:  # not msgpack: no receipt
        return None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _problem(part: torch.Tensor, shape: torch.Size | None) -> str | None:
    """Why a received part cannot be aggregated, or None."""
    if shape is None:
        return "more parts than it owes"
    if part.shape != shape or not part.is_floating_point():
        return f"a {part.dtype} part of shape {tuple(part.shape)} where {tuple(shape)} floats were due"
    if not torch.isfinite(part).all():
        return "a part with NaN or infinite values"
    return None
