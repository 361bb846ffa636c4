"""A hosting peer's life: join the DHT, load a span of blocks (``Peer``) or build a set of experts (``ExpertPeer``),
serve RPCs, announce, leave cleanly (``Hosting``, what both share).

Order matters (DESIGN.md, "what is known to bite"): the DHT forks its own process, so it is created first, from
the main thread, before torch starts threads. Then the blocks are loaded, the handlers registered on a replica
of the DHT's P2P daemon, and the span announced as ONLINE every ``announce_period``.

Without ``--blocks`` the peer measures its speed (``throughput``, cached) and takes the weakest window of the
swarm (``balance.choose_span``). While serving, at a randomized period, it checks whether moving would raise the
swarm's bottleneck enough (``balance.plan_move``) and, if a fresh look a little later agrees, moves (``move``).

On SIGTERM or SIGINT the peer announces OFFLINE (clients stop routing to it), refuses new sessions, waits up to
``shutdown_grace`` seconds for in-flight work, and exits.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Coroutine

import hivemind
import torch
import uvloop

import swarm_peer
from swarm_peer.dht import (
    Announcer,
    ExpertAnnouncer,
    ServerInfo,
    ServerState,
    create_dht,
    get_block_servers,
    get_experts,
    run_model_id,
)
from swarm_peer.dht.records import MAX_CACHE_MB, MAX_CACHE_TOKENS
from swarm_peer.errors import SwarmError, ValidationError
from swarm_peer.models import Checkpoint, attention_shape, resolve_checkpoint
from swarm_peer.peer import balance
from swarm_peer.peer.balance import spans_from_servers
from swarm_peer.peer.blocks import DTYPES, BlockSpan
from swarm_peer.peer.expert_handlers import ExpertHandlers
from swarm_peer.peer.experts import HostedExperts
from swarm_peer.peer.handlers import BlockHandlers, Handlers
from swarm_peer.peer.replicas import Replicas, StageSteps
from swarm_peer.peer.stage import TrainableStage
from swarm_peer.peer.stage_balance import plan_stage_move
from swarm_peer.peer.throughput import announced, cached_probe, decode_threads
from swarm_peer.protocols import swarm_pb2
from swarm_peer.protocols.stage_state import fetch_state
from swarm_peer.settings import PeerSettings
from swarm_peer.threads import MachineShare

__all__ = ["ExpertPeer", "Hosting", "Peer", "blocks_that_fit"]

logger = logging.getLogger(__name__)

_SHARE_PERIOD = 5.0  # seconds between two looks at how many peers share this machine's cores


class Hosting:
    """What every hosting peer does, blocks or experts: serve its handlers on a replica of the DHT's P2P daemon, keep
    its announcer running, and leave cleanly. ``run()`` serves until SIGTERM/SIGINT or ``stop()``.

    A subclass sets ``dht`` (created first), ``handlers`` (``peer.handlers.Handlers``), ``announcer``, ``settings``
    and ``_stop`` (an ``asyncio.Event``), and says what happens before it is announced (``_prepare``), once it serves
    (``_started``: log, and background coroutines to run) and when it leaves (``_leaving``, at once; ``_finish``, after in-flight work, on the compute
    thread).
    """

    dht: hivemind.DHT
    handlers: Handlers
    announcer: Announcer | ExpertAnnouncer
    settings: PeerSettings
    share: MachineShare | None = None

    def _set_threads(self) -> None:
        """torch's threads: ``--compute-threads``, or on a CPU this peer's share of the machine's cores
        (``MachineShare``: peers that share a machine divide its cores), which ``_follow_share`` keeps up to date."""
        settings = self.settings
        if settings.compute_threads:
            torch.set_num_threads(settings.compute_threads)
        elif settings.device == "cpu":
            self.share = MachineShare()
            torch.set_num_threads(self.share.threads())

    async def _follow_share(self) -> None:
        """Takes this peer's share of the cores again every ``_SHARE_PERIOD`` seconds, as peers on the machine come
        and go (on the compute thread: the threads are set for the thread that computes)."""
        while True:
            await asyncio.sleep(_SHARE_PERIOD)
            threads = await asyncio.to_thread(self.share.threads)
            if threads != self.handlers.threads:
                await self.handlers._compute(torch.set_num_threads, threads)
                logger.info(
                    "Computing on %d threads: this machine's %d cores shared with other peers",
                    threads,
                    self.share.cores,
                )
                self.handlers.threads = threads

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serves until SIGTERM/SIGINT; ``on_ready`` is called once the peer is announced."""
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._serve(on_ready))

    async def _serve(self, on_ready: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        p2p = await self.dht.replicate_p2p()
        await self.handlers.register(p2p)
        if self.settings.metrics_port is not None:
            self.handlers.metrics.start_server(self.settings.network.host, self.settings.metrics_port)
        await self._prepare()
        started = self._started(p2p.peer_id) + ([self._follow_share()] if self.share is not None else [])
        background = [asyncio.create_task(coro) for coro in started]
        self.announcer.start()
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            for task in background:
                task.cancel()
            await self._leave()

    async def _prepare(self) -> None:
        """What must be done, once the handlers are registered, before the peer is announced."""

    def _started(self, peer_id) -> list[Coroutine]:
        return []

    def _leaving(self) -> None:
        pass

    def _finish(self) -> None:
        pass

    async def _leave(self) -> None:
        logger.info("Leaving: announcing offline and finishing in-flight work")
        self._leaving()
        loop = asyncio.get_running_loop()  # these wait for threads and processes: not on the loop
        await loop.run_in_executor(None, self.announcer.stop)
        deadline = time.monotonic() + self.settings.shutdown_grace
        while self.handlers.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.handlers._compute(self._finish)
        await loop.run_in_executor(None, self.handlers.shutdown)
        await loop.run_in_executor(None, self.handlers.metrics.stop_server)
        await loop.run_in_executor(None, self.dht.shutdown)
        if self.share is not None:
            self.share.close()

    def stop(self) -> None:
        self._stop.set()


class Peer(Hosting):
    """A peer that hosts a span of blocks: ``Peer(settings).run()`` serves until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, settings: PeerSettings):
        self.settings = settings
        self.checkpoint: Checkpoint = resolve_checkpoint(settings.model, progress=settings.progress)
        train = settings.train
        # the fingerprint of its manifest (the same for every copy); a training run's weights change: the run's name
        self.model_id = run_model_id(train.run_id) if train else self.checkpoint.model_id
        self.model_name = settings.model_name or self.checkpoint.name
        self.dht: hivemind.DHT = create_dht(**settings.network.model_dump())
        self._set_threads()
        self.probe = (
            None
            if isinstance(settings.throughput, float)
            else cached_probe(
                self.checkpoint,
                device=settings.device,
                dtype=settings.dtype,
                remeasure=settings.throughput == "eval",
            )
        )
        start, end = settings.blocks or self._choose_span()
        if end > self.checkpoint.num_blocks:
            raise ValidationError(
                f"blocks {start}:{end} exceed the model's {self.checkpoint.num_blocks} blocks"
            )
        self.state = ServerState.JOINING
        t0 = time.perf_counter()
        self.span = BlockSpan(
            self.checkpoint,
            start,
            end,
            dtype=settings.dtype,
            device=settings.device,
            adapters=settings.adapters,
            progress=settings.progress,
        )
        logger.info(
            "Loaded blocks %d:%d of %s (%s) in %.1f s",
            start,
            end,
            self.model_name,
            self.model_id,
            time.perf_counter() - t0,
        )
        threads = settings.compute_threads or decode_threads(
            self.span, remeasure=settings.throughput == "eval"
        )
        logger.info("Single-token steps run on %d of %d compute threads", threads, torch.get_num_threads())
        self.stage = TrainableStage(self.span, train, self.model_id) if train else None
        # one thread if that is as fast as several; else as many as the peer computes on (its share may change)
        decode = 1 if threads == 1 < torch.get_num_threads() else None
        self.handlers = BlockHandlers(
            self.span, self.model_id, settings, self._info_json, decode_threads=decode, stage=self.stage
        )
        self.replicas, self.steps = None, None
        self._stage_hosts: list = []  # the stage's peers, as the DHT last listed them (``_follow_stage``)
        # a stage's rounds are keyed by its uid under a prefix of the run and the stages' size: a peer that moves to
        # another stage of its size keeps its averagers
        size = sum(p.numel() for p in self.span.layers.parameters())
        if train is not None:  # the stage's peers step together, and average their weights now and then
            self.stage.steps_itself = False
            self.steps = StageSteps(
                lambda: [self.stage],
                lambda uid: self._stage_hosts,
                self.dht,
                self.handlers._compute,
                kind=f"{self.model_id}-{size}",
                average_every=1,
                timeout=train.averaging_timeout,
                aggregator=train.aggregator,
            )
        if train is not None and train.average_every is not None:
            self.replicas = Replicas(
                lambda: [self.stage],
                lambda uid: list(self._stage_peers()),
                self.dht,
                self.handlers._compute,
                kind=f"{self.model_id}-{size}",
                average_every=train.average_every,
                timeout=train.averaging_timeout,
                aggregator=train.aggregator,
            )
        self.announcer = Announcer(
            self.dht,
            self.model_id,
            self.server_info,
            period=settings.announce_period,
            num_blocks=self.checkpoint.num_blocks,
            model_name=self.model_name,
        )
        self._stop = asyncio.Event()

    def speed(self, num_blocks: int) -> dict[str, float]:
        """What this peer announces about its speed when it serves ``num_blocks`` blocks."""
        if self.probe is None:
            return {"throughput": float(self.settings.throughput)}
        return announced(
            self.probe,
            num_blocks=num_blocks,
            hidden_size=int(self.checkpoint.config.hidden_size),
            dtype=self.settings.dtype,
            bandwidth_mbps=self.settings.bandwidth_mbps,
        )

    def _choose_span(self) -> tuple[int, int]:
        """The weakest window of the swarm, as long as ``--num-blocks`` or as many blocks as fit in memory."""
        total = self.checkpoint.num_blocks
        length = min(self.settings.num_blocks or blocks_that_fit(self.checkpoint, self.settings), total)
        spans = spans_from_servers(get_block_servers(self.dht, self.model_id, range(total)))
        spans.pop(self.dht.peer_id, None)  # a restarting peer's own old records: it is choosing anew
        return balance.choose_span(spans, total, length)

    def server_info(self) -> ServerInfo:
        span, cache_left = self.span, self.handlers.budget.bytes_left
        tokens_left = min(cache_left // span.cache_bytes_per_token(span.start, span.end), MAX_CACHE_TOKENS)
        return ServerInfo(
            state=self.state,
            start_block=span.start,
            end_block=span.end,
            **self.speed(span.end - span.start),
            cache_tokens_left=tokens_left,
            cache_mb_left=min(cache_left / 2**20, MAX_CACHE_MB),
            graph_cache_mb_left=min(self.handlers.graphs.bytes_left / 2**20, MAX_CACHE_MB),
            version=swarm_peer.__version__,
            dtype=self.settings.dtype,
            public_name=self.settings.public_name,
            adapters=tuple(span.adapters),
            **(
                {}
                if self.stage is None
                else {"training_step": self.stage.steps, "samples_per_second": self.stage.samples_per_second}
            ),
        )

    def _info_json(self) -> bytes:
        info = json.loads(self.server_info().model_dump_json())
        return json.dumps(
            {
                "model_id": self.model_id,
                "model_name": self.model_name,
                "peer_id": self.dht.peer_id.to_base58(),
                **info,
            }
        ).encode()

    def _started(self, peer_id) -> list[Coroutine]:
        self.state = ServerState.ONLINE
        logger.info(
            "Serving blocks %d:%d of %s (%s) as %s",
            self.span.start,
            self.span.end,
            self.model_name,
            self.model_id,
            peer_id,
        )
        if self.stage is not None:  # a training stage steps and averages with its stage's peers, and may move
            background = [self._follow_stage(), self.steps.run_forever()]
            background += [] if self.replicas is None else [self.replicas.run_forever()]
            return background + ([self._rebalance_stages_forever()] if self.settings.rebalance_period else [])
        return [self._rebalance_forever()] if self.settings.rebalance_period else []

    async def _prepare(self) -> None:
        """A training stage takes the stage's state from a peer that serves it, the most advanced first; the stage's
        first peer starts from the checkpoint's weights."""
        if self.stage is not None and not await self._take_state(self.stage):
            logger.info(
                "No peer trains blocks %d:%d of the run yet: starting from the checkpoint's weights",
                self.span.start,
                self.span.end,
            )

    async def _follow_stage(self) -> None:
        """Every announce period, this peer's share of the samples its stage trains on (``peer.trainable``): its own
        rate over the rates its stage's peers announce; 1/n of n peers while it has none."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                peers = await loop.run_in_executor(None, self._stage_peers)
                self._stage_hosts = list(peers)  # whom a step waits for (without a lookup per step)
                peers.pop(self.dht.peer_id, None)
                own = self.stage.samples_per_second
                total = own + sum(info.samples_per_second for info in peers.values())
                self.stage.share = own / total if own > 0 else 1 / (len(peers) + 1)
            except Exception:
                logger.warning(
                    "Could not look up the stage's peers; keeping a share of %.2f",
                    self.stage.share,
                    exc_info=True,
                )
            await asyncio.sleep(self.settings.announce_period)

    async def _rebalance_stages_forever(self) -> None:
        """A training stage's ``_rebalance_forever``: every ``rebalance_period`` seconds on average, plans a move to
        another stage of the run (``peer.stage_balance``), confirms it after one to two announce periods, and
        makes it (``move_stage``)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.rebalance_period * random.uniform(0.5, 1.5))
            try:
                target = await loop.run_in_executor(None, self._planned_stage)
                if target is None:
                    continue
                await asyncio.sleep(self.settings.announce_period * random.uniform(1.0, 2.0))
                if await loop.run_in_executor(None, self._planned_stage) == target:
                    await self.move_stage(*target)
            except Exception:
                logger.warning("A rebalancing check failed; the peer keeps its stage", exc_info=True)

    def _run_stages(self) -> dict[tuple[int, int], dict]:
        """The run's stages of this peer's length: span -> {peer: its announced throughput}, ONLINE peers only."""
        length = self.span.end - self.span.start
        stages: dict[tuple[int, int], dict] = {}
        for block_servers in get_block_servers(self.dht, self.model_id, range(self.checkpoint.num_blocks)):
            for peer_id, info in block_servers.items():
                if info.state == ServerState.ONLINE and info.end_block - info.start_block == length:
                    stages.setdefault((info.start_block, info.end_block), {})[peer_id] = info.throughput
        return stages

    def _planned_stage(self) -> tuple[int, int] | None:
        stages = self._run_stages()
        if self.dht.peer_id not in stages.get((self.span.start, self.span.end), {}):
            return None  # our own record is not visible yet
        return plan_stage_move(self.dht.peer_id, stages, quality=self.settings.balance_quality)

    async def move_stage(self, start: int, end: int) -> bool:
        """Moves this training peer to the stage ``[start, end)``: loads its blocks (those it shares with the current
        span are reused), downloads the stage's state from a peer of it, then serves it. Whether it moved (it stays
        if no peer of the stage sends its state)."""
        loop, train = asyncio.get_running_loop(), self.settings.train
        logger.info(
            "Rebalancing: moving from blocks %d:%d to %d:%d", self.span.start, self.span.end, start, end
        )

        def load() -> BlockSpan:
            device = self.settings.device
            return BlockSpan(self.checkpoint, start, end, dtype="float32", device=device, reuse=self.span)

        span = await loop.run_in_executor(None, load)
        stage = TrainableStage(span, train, self.model_id)
        stage.steps_itself = False
        if not await self._take_state(stage):
            return False

        def switch() -> None:  # on the compute thread: between two computations, of the old stage or the new
            self.span, self.stage = span, stage
            self.handlers.span, self.handlers.stage = span, stage

        await self.handlers._compute(switch)
        self._stage_hosts = []
        self.announcer.update()
        logger.info("Moved to blocks %d:%d, at the stage's step %d", start, end, stage.steps)
        return True

    async def _take_state(self, stage: TrainableStage) -> bool:
        """Takes ``stage``'s state from a peer that serves it, the most advanced first; whether one sent it."""
        span = swarm_pb2.Span(model_id=self.model_id, start_block=stage.span.start, end_block=stage.span.end)
        peers = await asyncio.get_running_loop().run_in_executor(None, lambda: self._stage_peers(stage.span))
        peers.pop(self.dht.peer_id, None)
        for peer_id, _ in sorted(peers.items(), key=lambda item: -(item[1].training_step or 0)):
            try:
                state = await fetch_state(
                    self.handlers.p2p, peer_id, span, stage.shapes(), self.settings.max_request_seconds
                )
            except SwarmError as e:
                logger.warning("Could not download the stage's state from %s: %s", peer_id, e)
                continue
            await self.handlers._compute(stage.load_state, state)
            logger.info("Took the stage's state at step %d from %s", state.steps, peer_id)
            return True
        return False

    def _stage_peers(self, span: BlockSpan | None = None) -> dict:
        """The peers the DHT lists as serving (or joining) exactly the span of this stage (or of ``span``) of the run,
        this one included."""
        span = span or self.span
        (servers,) = get_block_servers(self.dht, self.model_id, [span.start])
        return {
            peer_id: info
            for peer_id, info in servers.items()
            if (info.start_block, info.end_block) == (span.start, span.end)
            and info.state != ServerState.OFFLINE
        }

    async def _rebalance_forever(self) -> None:
        """Every ``rebalance_period`` seconds on average (randomized, so peers do not decide in lockstep), plans a
        move, confirms it after one to two announce periods, and makes it (``move``).

        The wait before confirming is what keeps peers from acting on a passing view of the swarm: by then a
        record that lapsed (a slow announcement under load, a lookup that missed some replicas) has been
        refreshed, and a peer that planned the same move at about the same time has announced it, so only one of
        them moves.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.rebalance_period * random.uniform(0.5, 1.5))
            try:
                start = await loop.run_in_executor(None, self._planned_start)
                if start is None:
                    continue
                await asyncio.sleep(self.settings.announce_period * random.uniform(1.0, 2.0))
                await loop.run_in_executor(None, self.move, start)
            except Exception:
                logger.warning("A rebalancing check failed; the peer keeps its blocks", exc_info=True)

    def move(self, start: int) -> bool:
        """Moves to the span starting at ``start`` if a fresh view of the swarm still plans that move.

        The new blocks are loaded first (blocks shared with the current span are reused, not read again), the plan
        is checked once more, and only then does the peer switch, announce its new span, and give sessions on the
        old one ``shutdown_grace`` seconds before handing them back.
        """
        if not self._still_planned(start):
            return False
        end = start + self.span.end - self.span.start
        logger.info(
            "Rebalancing: loading blocks %d:%d to replace %d:%d", start, end, self.span.start, self.span.end
        )
        span = BlockSpan(
            self.checkpoint,
            start,
            end,
            dtype=self.settings.dtype,
            device=self.settings.device,
            reuse=self.span,
            adapters=self.settings.adapters,
        )
        if not self._still_planned(start):
            return False
        old = self.span
        self.span = span
        self.handlers.switch(span, drain_seconds=self.settings.shutdown_grace)
        self.announcer.update()
        logger.info("Moved from blocks %d:%d to %d:%d", old.start, old.end, start, end)
        return True

    def _still_planned(self, start: int) -> bool:
        if self._planned_start() == start:
            return True
        logger.info(
            "Rebalancing: the swarm changed; staying on %d:%d instead of moving to %d",
            self.span.start,
            self.span.end,
            start,
        )
        return False

    def _planned_start(self) -> int | None:
        total = self.checkpoint.num_blocks
        spans = spans_from_servers(get_block_servers(self.dht, self.model_id, range(total)))
        me = self.dht.peer_id
        if me not in spans:
            return None  # our own record is not visible yet
        return balance.plan_move(me, spans, total, quality=self.settings.balance_quality)

    def _leaving(self) -> None:
        self.state = ServerState.OFFLINE
        self.handlers.budget.close()

    def _finish(self) -> None:
        for averaging in (self.replicas, self.steps):
            if averaging is not None:
                averaging.shutdown()


class ExpertPeer(Hosting):
    """A peer that hosts trainable experts (``settings.experts``; ``peer.experts``, ``peer.expert_handlers``):
    ``ExpertPeer(settings).run()`` serves until SIGTERM/SIGINT or ``stop()``.

    It imports ``settings.experts.expert_modules`` (which may register expert types), builds or restores its experts, and
    keeps them declared on their grid in the DHT (``ExpertAnnouncer``: every prefix level, signed); on leaving it
    withdraws them, finishes in-flight calls and saves the experts that changed. With a checkpoint directory, it
    also saves them every ``checkpoint_period`` seconds; with ``average_every``, it averages each expert with the
    other peers that host its uid (``peer.replicas``).
    """

    def __init__(self, settings: PeerSettings):
        self.settings = settings
        experts = settings.experts
        self.dht: hivemind.DHT = create_dht(**settings.network.model_dump())
        self._set_threads()
        for module in experts.expert_modules:
            importlib.import_module(module)
        t0 = time.perf_counter()
        self.experts = HostedExperts(experts, device=settings.device)
        logger.info(
            "Built %d %s experts of width %d in %.1f s",
            len(self.experts),
            experts.expert_type,
            experts.hidden,
            time.perf_counter() - t0,
        )
        self.handlers = ExpertHandlers(self.experts, settings, self._info_json)
        self.announcer = ExpertAnnouncer(self.dht, lambda: experts.uids, period=settings.announce_period)
        self.replicas = None
        if experts.average_every is not None:
            self.replicas = Replicas(
                lambda: self.experts.experts.values(),
                lambda uid: get_experts(self.dht, [uid]).get(uid, ()),
                self.dht,
                self.handlers._compute,
                kind=f"experts-{experts.expert_type}-{experts.hidden}",
                average_every=experts.average_every,
                timeout=experts.averaging_timeout,
            )
        self._stop = asyncio.Event()

    def _info_json(self) -> bytes:
        experts = self.settings.experts
        return json.dumps(
            {
                "peer_id": self.dht.peer_id.to_base58(),
                "expert_type": experts.expert_type,
                "hidden": experts.hidden,
                "experts": list(experts.uids),
                "graph_cache_mb_left": self.handlers.graphs.bytes_left / 2**20,
                "version": swarm_peer.__version__,
                "public_name": self.settings.public_name,
            }
        ).encode()

    def _started(self, peer_id) -> list[Coroutine]:
        logger.info("Serving %d experts as %s", len(self.experts), peer_id)
        period = self.settings.experts.checkpoint_period
        background = [self._save_forever(period)] if self.experts.checkpoint_dir and period else []
        return background + ([self.replicas.run_forever()] if self.replicas is not None else [])

    async def _save_forever(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.handlers._compute(self.experts.save)
            except Exception:
                logger.warning("Saving the experts failed; trying again in %.0f s", period, exc_info=True)

    def _finish(self) -> None:
        if self.replicas is not None:
            self.replicas.shutdown()
        saved = self.experts.save()
        if saved:
            logger.info("Saved %d experts to %s", saved, self.experts.checkpoint_dir)


def blocks_that_fit(checkpoint: Checkpoint, settings: PeerSettings) -> int:
    """How many blocks half of the device's free memory holds (the rest is left for caches and the system)."""
    config = checkpoint.config
    hidden = int(config.hidden_size)
    heads, kv_heads, head_dim = attention_shape(config)
    params = (
        2 * hidden * heads * head_dim
        + 2 * hidden * kv_heads * head_dim
        + 3 * hidden * int(config.intermediate_size)
    )
    block_bytes = params * DTYPES[settings.dtype].itemsize
    if settings.device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(settings.device))[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, int(free * 0.5 // block_bytes))
