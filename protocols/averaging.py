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
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import AsyncIterator  # noqa: UP035 (hivemind reads RPC stream types from typing's alias only)

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip

from swarm_peer.dht.process import exit_when_orphaned
from swarm_peer.protocols import aggregators

__all__ = ["AveragingRound", "RobustAverager"]

logger = logging.getLogger(__name__)

_PARTS_PER_MEMBER = 4  # at least this many parts per member, when the vector is small
_IN_FLIGHT = 2  # parts reduced at once by one member, and parts of one sender taken in ahead of its results
_MIN_PART_BYTES = 4096


@dataclass(frozen=True)
class AveragingRound:
    """One finished round: the group's members (peer ids, base58) and what each gathered along."""

    peers: tuple[str, ...]
    gathered: dict[str, object]


class RobustAverager(DecentralizedAverager):
    """hivemind's ``DecentralizedAverager`` with robust reduction (module docstring). Runs in its own process,
    which ends when the creating process does (even on SIGKILL).

    ``aggregator``, ``byzantine``, ``tau``: the rule (``aggregators.make``). Every other keyword goes to
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
        self.aggregator, self.byzantine, self.tau = aggregator, byzantine, tau
        self._banned: set[PeerID] = set()  # in the averager's process: peers left out of every later round
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

    def average(self, timeout: float, gather: object = None) -> AveragingRound | None:
        """Runs one round: finds a group (within ``timeout`` seconds) and averages the tensors in place with it.
        ``gather``: a small msgpack-able value every member receives. None when no group formed or the round
        failed: the tensors may then hold part of a result, so use your own values instead."""
        try:
            gathered = self.step(gather=gather, timeout=timeout, allow_retries=False)
        except Exception as e:  # hivemind raises what failed: matchmaking, all-reduce, timeouts
            logger.info("No averaging this round: %s", e or type(e).__name__)
            return None
        if gathered is None:
            return None
        return AveragingRound(tuple(str(peer) for peer in gathered), {str(p): v for p, v in gathered.items()})

    def banned_peers(self) -> frozenset[str]:
        """Peers this averager left out for sending malformed or non-finite parts (base58 peer ids)."""
        future = MPFuture()
        self._outer_pipe.send(("_get_banned", [], dict(future=future)))
        return future.result(timeout=10)

    async def _get_banned(self, future: MPFuture) -> None:
        future.set_result(frozenset(str(peer) for peer in self._banned))

    # ---------------------------------------------------------------- in the averager's process

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
            with self.get_tensors() as local_tensors:  # averaged by this process only: no other writer
                await self._run_allreduce_inplace_(
                    local_tensors, group_info, peer_fractions=fractions, **kwargs
                )
            return {peer: user for peer, (_, user) in zip(group_info.peer_ids, members, strict=True)}
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

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        # hivemind hands each member whole parts: parts small enough for several per member keep shares equal
        total_bytes = sum(t.numel() * t.element_size() for t in tensors)
        kwargs["part_size_bytes"] = int(
            min(
                kwargs["part_size_bytes"],
                max(_MIN_PART_BYTES, total_bytes / (_PARTS_PER_MEMBER * group_info.group_size)),
            )
        )
        runner = _RobustRunner(
            rule=aggregators.make(self.aggregator, byzantine=self.byzantine, tau=self.tau),
            banned=self._banned,
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

    def __init__(self, *, rule, banned: set[PeerID], **kwargs):
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
            return await super()._communicate_with_peer(
                peer_id
            )  # it sends its results: registered as they come
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        compression = self.tensor_part_container.compression
        for part_index, part in enumerate(self.parts_for_local_averaging):
            result = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part)
            # what the others get is the result after its trip through the codec: keep exactly that
            result = deserialize_torch_tensor(
                compression.compress(result, CompressionInfo.from_tensor(result))
            )
            self.tensor_part_container.register_processed_part(peer_index, part_index, result)

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
                async for part, compression in amap_in_executor(
                    lambda message: (
                        deserialize_torch_tensor(message.tensor_part),
                        message.tensor_part.compression,
                    ),
                    stream,
                    max_prefetch=self.tensor_part_container.prefetch,
                ):
                    shape = reducer.part_shapes[part_index] if part_index < reducer.num_parts else None
                    problem = _problem(part, shape)
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
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
                delivered += 1
        finally:
            # parts already handed to the reducer stay there (it counts on them); only the intake stops
            taker.cancel()
            if delivered != reducer.num_parts:
                await self._ban_sender(sender)


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
