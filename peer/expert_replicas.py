"""Replicas of one expert kept in sync: the peers that host the same uid average its weights every
``--average-every`` samples, with the run's averaging layer (``protocols.averaging.RobustAverager``).

A popular expert can be hosted by several peers (``swarm-peer join --experts`` with overlapping grids); trainers
spread their calls over the replicas (``moe.mixture``), and each replica steps its own optimizer on the gradients
it receives (``peer.experts``). Left alone, the replicas would drift apart into different experts under one uid.
So once an expert's backward calls have brought ``average_every`` samples since it last averaged, its peer looks
up the uid's hosts in the DHT and averages the expert's weights with them (those of them that come within the
matchmaking time): every replica then holds the group's mean. Updates a replica takes while the round runs are
kept: it adds the mean minus the weights it sent. The optimizers' moments stay each replica's own.

All experts of a peer have one type and width, so one averager per peer serves them all, one expert per round: a
round's group key is the uid's (64 bits of its SHA-256, under a prefix naming the type and width), and every member
gathers its uid, so that a round whose members turn out to average different experts (keys that collide) is
dropped, not applied. A round waits for all the uid's hosts the DHT lists, at most half of ``averaging_timeout``
after the first one came, then goes on with those there; a replica that finds none in time keeps its weights and
tries again after its next ``average_every`` samples. An expert whose uid has no other host does not average.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

import torch

from swarm_peer.dht import get_experts
from swarm_peer.peer.experts import HostedExpert, HostedExperts
from swarm_peer.protocols.averaging import RobustAverager

__all__ = ["ExpertReplicas", "uid_group_bits"]

logger = logging.getLogger(__name__)

_POLL = 0.2  # seconds between two looks for experts due to average
_MAX_REPLICAS = 64  # hosts of one uid averaged in one round


def uid_group_bits(uid: str) -> str:
    """The averaging group key of an expert's replicas: 64 bits of its uid's SHA-256, as 0s and 1s."""
    return format(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big"), "064b")


class ExpertReplicas:
    """Averages the hosted experts that have replicas on other peers (module docstring). ``compute`` runs a function
    on the peer's compute thread (``Handlers._compute``), where the experts are read and written."""

    def __init__(
        self,
        experts: HostedExperts,
        dht,
        compute: Callable[[Callable[[], object]], Awaitable[object]],
        *,
        average_every: int,
        timeout: float,
    ):
        self.experts, self.dht, self.compute = experts, dht, compute
        self.average_every, self.timeout = average_every, timeout
        settings = experts.settings
        size = sum(p.numel() for p in next(iter(experts.experts.values())).module.parameters())
        self.averager = RobustAverager(
            [torch.zeros(size)],
            dht,
            prefix=f"swarm-experts-{settings.expert_type}-{settings.hidden}",
            aggregator="mean",
            min_group_size=2,
            target_group_size=_MAX_REPLICAS,
            min_matchmaking_time=timeout / 2,
            request_timeout=1.0,
            allow_state_sharing=False,
        )

    async def run_forever(self) -> None:
        """Averages each expert that is due, one at a time, until cancelled."""
        while True:
            due = [e for e in self.experts.experts.values() if e.unaveraged >= self.average_every]
            for expert in due:
                try:
                    await self.average(expert)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.warning("Averaging expert %s failed", expert.uid, exc_info=True)
            await asyncio.sleep(_POLL)

    async def average(self, expert: HostedExpert) -> int:
        """One round for ``expert`` with the other peers that host its uid; the group's size (1: none came)."""
        uid = expert.uid
        hosts = (await asyncio.to_thread(get_experts, self.dht, [uid])).get(uid, ())
        sent = await self.compute(lambda: self._take(expert))
        if len(hosts) < 2:  # no other replica listed (ours may not be listed yet): nothing to average with
            return 1
        result = await asyncio.to_thread(
            self.averager.average,
            self.timeout,
            gather=uid,
            group_bits=uid_group_bits(uid),
            group_size=min(len(hosts), _MAX_REPLICAS),
        )
        if result is None:
            logger.info("No replica of expert %s came to average", uid)
            return 1
        if set(result.gathered.values()) != {uid}:
            logger.warning("Dropped an averaging round of expert %s: its group averaged other experts", uid)
            return 1
        with self.averager.get_tensors() as (buffer,):
            mean = buffer.clone()
        await self.compute(lambda: self._apply(expert, sent, mean))
        logger.info("Averaged expert %s with %d replicas", uid, len(result.peers) - 1)
        return len(result.peers)

    def _take(self, expert: HostedExpert) -> torch.Tensor:
        """(compute thread) The expert's weights, flat, into the averager's buffer; its count starts again."""
        expert.unaveraged = 0
        flat = torch.cat([p.detach().flatten().float().cpu() for p in expert.module.parameters()])
        with self.averager.get_tensors() as (buffer,):
            buffer.copy_(flat)
        return flat

    def _apply(self, expert: HostedExpert, sent: torch.Tensor, mean: torch.Tensor) -> None:
        """(compute thread) Weights = the group's mean + what the expert learnt since it sent ``sent``."""
        offset = 0
        with torch.no_grad():
            for p in expert.module.parameters():
                n = p.numel()
                since = p.detach().flatten().float().cpu() - sent[offset : offset + n]
                p.copy_((mean[offset : offset + n] + since).view_as(p))
                offset += n
        expert.dirty = True

    def shutdown(self) -> None:
        self.averager.shutdown()
