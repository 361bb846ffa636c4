"""Replicas of one trainable module kept in sync: the peers that host the same expert uid (``peer.experts``), or
serve the same stage of a SWARM run (``peer.stage``), average its weights every ``average_every`` samples, with the
run's averaging layer (``protocols.averaging.RobustAverager``).

A popular expert can be hosted by several peers (``swarm-peer join --experts`` with overlapping grids), and a stage
of a SWARM pipeline is served by several peers; trainers spread their calls over them, and each replica steps its
own optimizer on the gradients it receives (``peer.trainable``). Left alone, the replicas would drift apart into
different modules under one name. So once a module's backward calls have brought ``average_every`` samples since it
last averaged (times its ``share``, ``peer.trainable``: the replicas of a stage then come to a round together), its peer looks up the module's hosts in the DHT and averages the module's weights with them (those
of them that come within the matchmaking time): every replica then holds the group's reduction (the mean, or a
robust aggregate) of the weights, each replica's weighed by the samples it trained on since its last round: a
replica that trainers used little (a slow peer, or one that just joined) does not pull back what the others
learnt, and replicas used alike average plainly. Updates a replica takes while the round runs are kept: it adds
the result minus the weights it sent. The optimizers' moments stay each replica's own.

One averager per peer serves all its modules (all of one size), one module per round: a round's group key is the
module's uid (64 bits of its SHA-256, under a prefix naming the modules' kind), and every member gathers its uid,
and its step count, so that a round whose members turn out to average different modules (keys that collide), or
weights of different steps, is dropped, not applied.
A round waits for all the module's hosts the DHT lists, at most half of ``timeout`` after the first one came, then
goes on with those there; a replica that finds none in time keeps its weights and tries again after its next
``average_every`` samples. A module that has no other host does not average.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import torch

from swarm_peer.peer.trainable import Trainable
from swarm_peer.protocols.averaging import RobustAverager

__all__ = ["Replicas", "StageSteps", "uid_group_bits"]

logger = logging.getLogger(__name__)

_POLL = 0.05  # seconds between two looks for modules due to average (or to step)
_MAX_REPLICAS = 64  # hosts of one uid averaged in one round


def uid_group_bits(uid: str) -> str:
    """The averaging group key of a module's replicas: 64 bits of its uid's SHA-256, as 0s and 1s."""
    return format(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big"), "064b")


class Replicas:
    """Averages the peer's modules that have replicas on other peers (module docstring).

    ``modules()``: the peer's modules (``Trainable``, each with a ``uid``), all of one size; ``hosts(uid)``: the
    peers the DHT lists for a uid, this one included (a blocking lookup; run off the event loop); ``compute`` runs a
    function on the peer's compute thread (``Handlers._compute``), where the modules are read and written. ``kind``
    names the modules' kind and size in the averaging prefix; ``aggregator``: the averaging layer's rule.
    """

    def __init__(
        self,
        modules: Callable[[], Iterable[Trainable]],
        hosts: Callable[[str], Sequence[object]],
        dht,
        compute: Callable[[Callable[[], object]], Awaitable[object]],
        *,
        kind: str,
        average_every: int,
        timeout: float,
        aggregator: str = "mean",
    ):
        self.modules, self.hosts, self.dht, self.compute = modules, hosts, dht, compute
        self.average_every, self.timeout = average_every, timeout
        size = sum(p.numel() for p in next(iter(modules())).module.parameters())
        self.averager = RobustAverager(
            [torch.zeros(size + 1)],  # a module's weights (or gradients) times its samples, then the samples
            dht,
            prefix=f"swarm-{self._what}-{kind}",
            aggregator=aggregator,
            min_group_size=2,
            target_group_size=_MAX_REPLICAS,
            min_matchmaking_time=timeout / 2,
            request_timeout=1.0,
            allow_state_sharing=False,
        )

    _what = "replicas"  # what the rounds average, in the averaging prefix

    def _due(self, module: Trainable) -> bool:
        return module.unaveraged >= self.average_every * module.share

    async def run_forever(self) -> None:
        """Averages each module that is due, one at a time, until cancelled."""
        while True:
            due = [m for m in self.modules() if self._due(m)]
            for module in due:
                try:
                    await self.average(module)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.warning("Averaging %s failed", module.uid, exc_info=True)
            await asyncio.sleep(_POLL)

    async def average(self, module: Trainable) -> int:
        """One round for ``module`` with the other peers that host its uid; the group's size (1: none came)."""
        uid = module.uid
        hosts = await asyncio.to_thread(self.hosts, uid)
        sent, steps = await self.compute(lambda: (self._take(module), module.steps))
        if len(hosts) < 2:  # no other replica listed (ours may not be listed yet): nothing to average with
            await self.compute(lambda: self._alone(module, sent))
            return 1
        result = await asyncio.to_thread(
            self.averager.average,
            self.timeout,
            gather=[uid, steps],
            group_bits=uid_group_bits(uid),
            group_size=min(len(hosts), _MAX_REPLICAS),
        )
        if result is None or not self._agrees(list(result.gathered.values()), uid, steps):
            if result is None:
                logger.info("No replica of %s came to average", uid)
            else:
                logger.info("Dropped an averaging round of %s: its members sent other modules or steps", uid)
            await self.compute(lambda: self._alone(module, sent))
            return 1
        with self.averager.get_tensors() as (buffer,):
            reduced = buffer.clone()
        members = len(result.peers)
        await self.compute(lambda: self._apply(module, sent, reduced, members))
        logger.info("Averaged %s with %d replicas", uid, len(result.peers) - 1)
        return len(result.peers)

    def _take(self, module: Trainable) -> torch.Tensor:
        """(compute thread) The module's weights, flat, into the averager's buffer, weighed by the samples it
        trained on since its last round (plus one: a replica that trained on none still counts a little); its count
        starts again."""
        weight = module.unaveraged + 1.0
        module.unaveraged = 0
        flat = torch.cat([p.detach().flatten().float().cpu() for p in module.module.parameters()])
        with self.averager.get_tensors() as (buffer,):
            buffer[:-1].copy_(flat * weight)
            buffer[-1] = weight
        return flat

    @staticmethod
    def _agrees(gathered: list, uid: str, steps: int) -> bool:
        """Whether a round's members (what each gathered) all sent this module's weights at the same step: weights
        of different steps would not average back into the same weights (each adds what it learnt since)."""
        return all(isinstance(value, list | tuple) and list(value) == [uid, steps] for value in gathered)

    def _alone(self, module: Trainable, sent: torch.Tensor) -> None:
        """(compute thread) What a module does when no group formed: here, keep its weights."""

    def _apply(self, module: Trainable, sent: torch.Tensor, reduced: torch.Tensor, members: int) -> None:
        """(compute thread) Weights = the group's mean weighed by samples + what the module learnt since it sent
        ``sent``."""
        mean = reduced[:-1] / reduced[-1]
        offset = 0
        with torch.no_grad():
            for p in module.module.parameters():
                n = p.numel()
                since = p.detach().flatten().float().cpu() - sent[offset : offset + n]
                p.copy_((mean[offset : offset + n] + since).view_as(p))
                offset += n
        module.dirty = True

    def shutdown(self) -> None:
        self.averager.shutdown()


class StageSteps(Replicas):
    """The peers of a stage of a SWARM run step together (SWARM's stage optimizer): once a peer's backward calls
    brought its share of ``target_batch_size`` samples (``peer.trainable``), it averages its accumulated gradient
    with the stage's peers that come (weighed by their samples: the stage's gradient over the batch, as one process
    would take it) and every member takes the same AdamW step on it; one that finds none in time steps on its own.
    Peers that step together from the same weights keep the same weights; ``Replicas`` rounds every
    ``--average-every`` samples bring together those that drifted (a missed round, a joiner).

    Gradients that backward calls bring while a round runs are kept for the next step. The stage's module must
    leave its steps to this (``Trainable.steps_itself = False``)."""

    _what = "steps"

    @staticmethod
    def _agrees(gathered: list, uid: str, steps: int) -> bool:
        return all(isinstance(value, list | tuple) and list(value[:1]) == [uid] for value in gathered)

    def _due(self, module: Trainable) -> bool:
        return module.samples >= module.update_every * module.share

    def _take(self, module: Trainable) -> torch.Tensor:
        """(compute thread) The accumulated gradient, flat, times the samples it came from (then those samples),
        into the averager's buffer; the module accumulates anew."""
        params = list(module.module.parameters())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.detach().flatten().float().cpu() for g in grads])
        weight = float(module.samples)
        module.samples = 0
        module.optimizer.zero_grad(set_to_none=True)
        with self.averager.get_tensors() as (buffer,):
            buffer[:-1].copy_(flat)
            buffer[-1] = weight
        return flat

    def _alone(self, module: Trainable, sent: torch.Tensor) -> None:
        module.step_on(sent)

    def _apply(self, module: Trainable, sent: torch.Tensor, reduced: torch.Tensor, members: int) -> None:
        """(compute thread) One AdamW step on the group's summed gradient, the gradient accumulated meanwhile kept
        for the next one."""
        # each member's gradient is a sum over its samples: so is the step's
        module.step_on(reduced[:-1] * members)
