"""Collaborative training with DiLoCo over robust group averaging: volunteers train one model together, each on its
own text, and exchange one update every H local steps.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023; on hivemind:
OpenDiLoCo, Jaghouar et al., 2024): every volunteer keeps the run's global weights θ and a local model. It takes H
inner AdamW steps on its own batches, then the group averages the pseudo-gradients Δ_k = θ - θ_k with a robust
aggregator (``protocols.averaging``: a dishonest volunteer cannot drag the average) and every member takes one
outer step of Nesterov SGD on θ with the averaged Δ (lr 0.7, momentum 0.9: DiLoCo's defaults) and starts its next
H steps from the new θ. A volunteer sends one model-sized vector per H steps instead of one per step.

With H = 1 it is synchronous data-parallel training with a global batch instead (as ``hivemind.Optimizer``): the
gradients are averaged every step and every member takes the same AdamW step on the average; there is no outer
optimizer.

Members of a round receive the same averaged bytes and apply the same deterministic step, so volunteers that start
from the same state and average in every round stay bitwise identical (``--min-peers`` makes each round wait for
all of them). A volunteer that finds no group in time steps on its own update, then takes the most advanced state a
member shares (members offer their state with their last round's step as its priority), so that it is in step for
the next round; one that reaches a round its group took without it (the run's listing shows every member past the
round) does so at once instead of waiting out ``--averaging-timeout``. One that joins later, or restarts, first
downloads the run's state (θ, the outer optimizer's momentum, the step) from a member.

All of that holds while the run fits one group: up to ``--group-size`` G volunteers, as the run's listing in the DHT
shows them at each round. A larger run averages in groups of up to G on a Moshpit grid (Ryabinin et al., "Moshpit
SGD", NeurIPS 2021; ``protocols.moshpit``: the round's group is a line of the grid along one dimension, the next
round's along the next): each volunteer first takes its outer step with its own Δ, then its group averages the
weights θ, as Moshpit SGD averages parameters (averaged Δs would leave the weights of different groups apart for
good); the outer momentum stays each volunteer's own. One averaging round per outer step: the d - 1 further rounds
that would take a full grid to the exact mean are not run, since the next outer steps' rounds, along the other
dimensions, go on mixing, and the weights of groups then differ by about what one round's updates differ, not more;
settling rounds would cost d times the traffic for that. Volunteers are then close, not bitwise identical. The
run's first round is one key for all instead (groups of up to G; every volunteer starts from the same weights, so
averaged Δs do): volunteers started together list each other only seconds apart, and different listings give
different grids.
``--verify`` (validators replay updates from weights every member holds) and ``--inner-steps 1`` (every member
takes the same step on averaged gradients) need one group of all: such a volunteer refuses to train in a run that
lists more than G volunteers.

    trainer = DiLoCoTrainer(model, TokenStream.from_file("shard.txt", tokenizer), settings, dht)
    trainer.join()  # the run's current state, if a member shares it
    for record in trainer.train():  # one StepRecord per local step
        print(record.step, record.loss, record.peers)
    trainer.shutdown()
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization
from torch import nn

from swarm_peer.client.run_view import RunView
from swarm_peer.client.text_data import TokenStream
from swarm_peer.dht.identity import public_key_bytes
from swarm_peer.dht.node import local_identity, local_peer_id
from swarm_peer.errors import ValidationError
from swarm_peer.protocols.averaging import RobustAverager
from swarm_peer.protocols.board import peers_of, run_round
from swarm_peer.protocols.moshpit import MoshpitGroup, moshpit_group
from swarm_peer.protocols.verification import MemberRound, without_banned_owners
from swarm_peer.settings import TrainSettings

__all__ = ["TRAINER_STATE", "TRAIN_LOG", "DiLoCoTrainer", "StepRecord", "latest_checkpoint"]

logger = logging.getLogger(__name__)

_CODECS = {"none": NoCompression, "float16": Float16Compression, "8bit": Uniform8BitQuantization}
_STATE_VERSION = 1
TRAINER_STATE = "trainer_state.pt"  # beside the weights in a checkpoint folder
TRAIN_LOG = "train_log.jsonl"  # and every step's StepRecord, one JSON object a line
LISTING_WAIT = 5.0  # seconds a volunteer waits for its first lookup of the run's listing, before it trains
CATCH_UP_TIMEOUT = (
    10.0  # seconds a volunteer that stepped alone waits for the state of those that had the round
)


@dataclass(frozen=True)
class StepRecord:
    """One local step: its number (from 1), the batch's loss, and, when it ended a round, the round's group size
    (1 when no group formed)."""

    step: int
    loss: float
    peers: int | None = None


class _RunAverager(RobustAverager):
    """The run's averager; shares the trainer's state with volunteers that join (hivemind's state download)."""

    def __init__(self, *args, trainer: DiLoCoTrainer, **kwargs):
        self.trainer = trainer
        super().__init__(*args, **kwargs)

    def get_current_state(self):  # in this (the trainer's) process, from hivemind's background thread
        metadata, tensors = self.trainer.state()
        return metadata, tensors, None


class DiLoCoTrainer:
    """One volunteer of a run (module docstring). ``model``: a causal LM whose parameters all train."""

    def __init__(self, model: nn.Module, stream: TokenStream, settings: TrainSettings, dht):
        self.settings, self.stream = settings, stream
        self.model = model.to(settings.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.inner = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.synchronous = settings.inner_steps == 1
        self.global_params = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.outer = torch.optim.SGD(
            self.global_params, lr=settings.outer_lr, momentum=settings.outer_momentum, nesterov=True
        )
        self.step = 0
        self._global_step = 0  # the step the global weights are from: the last round's end (``global_step``)
        self.history: list[StepRecord] = []  # every local step's record, saved with the checkpoints
        self.last_group: set[str] = set()  # the other members of the last round this volunteer averaged in
        self.generator = torch.Generator().manual_seed(settings.seed)
        self._lock = threading.Lock()  # the state, against the state download (another thread)
        self.dht, self.prefix = dht, f"swarm-train-{settings.run_id}"
        if settings.verify:  # members replay each other's batches: only volunteers on the same text average
            self.prefix += "-" + hashlib.sha256(stream.tokens.numpy().tobytes()).hexdigest()[:12]
        self.key = local_identity(dht) if settings.verify else None
        self.peer_id = str(local_peer_id(dht))
        self.moshpit = not settings.verify and not self.synchronous  # whether a large run averages on a grid
        self.view = RunView(
            dht, settings.run_id
        )  # the run's volunteers and agreed bans, looked up off this thread
        self.view.start()
        # peer id -> why (verified rounds): judged here, or the run's agreed bans
        self.banned: dict[str, str] = {}
        self._round_began = -float("inf")  # when this round's local steps began (time.monotonic)
        self.run_bans_me = False  # whether the run's volunteers agree to ban this one
        self._replica: nn.Module | None = None  # recomputes other members' updates (verified rounds)
        self._round = 0  # the number of the round under way (verified rounds)
        self.averager = _RunAverager(
            [torch.zeros(sum(p.numel() for p in self.params))],  # the update, flat
            dht,
            trainer=self,
            prefix=self.prefix,
            aggregator=settings.aggregator,
            byzantine=settings.byzantine,
            tau=settings.tau,
            verify_key=self.key,
            lie=1.0 if settings.attack == "owner" else 0.0,
            min_group_size=settings.min_peers,
            target_group_size=settings.group_size,
            # a round waits for all the run's volunteers (``_round_size``) at most this long after the first one
            # comes, then goes on with those there (at least --min-peers)
            min_matchmaking_time=settings.averaging_timeout / 2,
            request_timeout=1.0,
            compression=_CODECS[settings.compression](),
            state_compression=NoCompression(),
        )

    @property
    def global_step(self) -> int:
        return self._global_step

    @global_step.setter
    def global_step(self, step: int) -> None:
        """Also this volunteer's priority as a source of the run's state: one that joins, or missed a round, takes
        the most advanced state there is, and so comes back in step with the run's next round."""
        self._global_step = step
        self.averager.state_sharing_priority = step

    # ---------------------------------------------------------------- the run's state

    def state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joining volunteer downloads: the global weights, the step they are from (the last round's end:
        the joiner's first round is then the members' next one), and the optimizer state that every member holds
        alike (the outer momentum; with H = 1, AdamW's moments)."""
        with self._lock:
            tensors = [p.clone() for p in self.global_params] + self._shared_optimizer_tensors()
            return {"version": _STATE_VERSION, "step": self.global_step}, tensors

    def _shared_optimizer_tensors(self) -> list[torch.Tensor]:
        if self.synchronous:
            states = [self.inner.state.get(p, {}) for p in self.params]
            if not all(states):
                return []
            return [s[k].detach().cpu().clone() for s in states for k in ("exp_avg", "exp_avg_sq")]
        states = [self.outer.state.get(p, {}) for p in self.global_params]
        return [s["momentum_buffer"].clone() for s in states] if all(states) else []

    def join(self, timeout: float = 30.0, *, missed_round: bool = False) -> bool:
        """Takes the run's state from a member that shares it, if one does and it is ahead; whether it did.
        ``missed_round``: this volunteer just stepped on its own update (no group in time): its weights are nobody
        else's, so a state from its own step replaces them too.
        With ``--verify``, first applies the run's agreed bans (``apply_run_bans``; waiting, when the run was never
        looked up yet, for the first lookup): the averager never downloads a banned peer's state."""
        if self.key is not None:
            self.view.wait(LISTING_WAIT)
            self.apply_run_bans()
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return False
        metadata, tensors = loaded
        try:
            return self._load(metadata, tensors, newer_than=self.step - 1 if missed_round else self.step)
        except ValidationError as e:
            logger.warning("Ignored the run's state a member sent: %s", e)
            return False

    def _load(self, metadata, tensors: list[torch.Tensor], newer_than: int) -> bool:
        """Takes a state a member sent if it is from a step after ``newer_than``; whether it did."""
        if not isinstance(metadata, dict) or metadata.get("version") != _STATE_VERSION:
            raise ValidationError(f"unknown state format {metadata!r:.100}")
        step = metadata.get("step")
        if type(step) is not int or step < 0:
            raise ValidationError(f"bad step {step!r:.50}")
        n, shapes = len(self.global_params), [p.shape for p in self.global_params]
        # the weights, then the optimizer state (outer momentum per weight; with H = 1, AdamW's two moments each)
        expected = shapes + [shape for shape in shapes for _ in range(2 if self.synchronous else 1)]
        if len(tensors) not in (n, len(expected)):
            raise ValidationError(f"{len(tensors)} tensors, where {n} or {len(expected)} were due")
        for tensor, shape in zip(tensors, expected, strict=False):
            if tensor.shape != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValidationError(
                    f"a state tensor of shape {tuple(tensor.shape)} where {tuple(shape)} was due"
                )
        if step <= newer_than:
            return False
        with self._lock, torch.no_grad():
            for g, p, t in zip(self.global_params, self.params, tensors[:n], strict=True):
                g.copy_(t)
                p.copy_(t)
            extra = tensors[n:]
            if self.synchronous and extra:
                for i, p in enumerate(self.params):
                    self.inner.state[p] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": extra[2 * i].to(p.device),
                        "exp_avg_sq": extra[2 * i + 1].to(p.device),
                    }
            elif extra:
                for g, buffer in zip(self.global_params, extra, strict=True):
                    self.outer.state[g] = {"momentum_buffer": buffer.clone()}
            self.step = self.global_step = step
        logger.info("Joined the run at step %d", step)
        return True

    # ---------------------------------------------------------------- training

    def train(self, until: int | None = None) -> Iterator[StepRecord]:
        """Local steps, a round every ``inner_steps``, until the run's step ``until`` (a joiner that took the state
        at step s takes ``until - s`` of them), or forever."""
        settings = self.settings
        self.view.wait(LISTING_WAIT)
        if not self.moshpit and len(self._volunteers()) > settings.group_size:
            why = "--verify" if settings.verify else "--inner-steps 1"
            raise ValidationError(
                f"run {settings.run_id} lists {len(self._volunteers())} volunteers, more than --group-size "
                f"{settings.group_size}: {why} needs one group of all (raise --group-size)"
            )
        while until is None or self.step < until:
            if self.step % settings.inner_steps == 0:  # a round's local steps begin
                self._round_began = time.monotonic()
                self.view.refresh()  # whom the round waits for, as fresh as the DHT has it when the round comes
                if self.key is not None:
                    self._start_verified_round()
            batch_BT = self.stream.batch(settings.batch_size, settings.seq_len, self.generator).to(
                settings.device
            )
            self.inner.zero_grad(set_to_none=False)
            loss = self._backward(batch_BT)
            peers = None
            if self.synchronous:
                peers = self._average_gradients()
                self.inner.step()
                with self._lock, torch.no_grad():
                    self.step = self.global_step = self.step + 1
                    for g, p in zip(self.global_params, self.params, strict=True):
                        g.copy_(p)
            else:
                self.inner.step()
                self.step += 1
                if self.step % settings.inner_steps == 0:
                    peers = self._outer_step()
                    if peers == 1 and settings.min_peers > 1:
                        # the others' state, if they had a round
                        self.join(timeout=CATCH_UP_TIMEOUT, missed_round=True)
            record = StepRecord(self.step, loss, peers)
            self.history.append(record)
            yield record

    def _backward(self, batch_BT: torch.Tensor) -> float:
        """The batch's mean loss, its gradient accumulated in the parameters: over ``--micro-batches`` micro-batches,
        each one's loss weighed by its share of the batch, run at once (a SWARM trainer keeps the stages busy)."""
        micro = batch_BT.tensor_split(min(self.settings.micro_batches, len(batch_BT)))

        def backward(ids_BT: torch.Tensor) -> float:
            loss = self.model(input_ids=ids_BT, labels=ids_BT).loss * (len(ids_BT) / len(batch_BT))
            if not torch.isfinite(loss):
                raise ValidationError(f"the loss became {loss.item()} at step {self.step + 1}")
            loss.backward()
            return loss.item()

        if len(micro) == 1:
            return backward(batch_BT)
        with ThreadPoolExecutor(len(micro), thread_name_prefix="micro-batch") as pool:
            return sum(pool.map(backward, micro))

    def _average_gradients(self) -> int:
        grads = [p.grad.detach().cpu().float() for p in self.params]
        averaged, peers = self._average(grads)
        with torch.no_grad():
            for p, g in zip(self.params, averaged, strict=True):
                p.grad.copy_(g)
        return peers

    def _outer_step(self) -> int:
        with torch.no_grad():
            deltas = [
                g - p.detach().cpu().float() for g, p in zip(self.global_params, self.params, strict=True)
            ]
        group = self._moshpit_group()
        if group is None:  # one group of all: the average Δ, the same outer step everywhere
            deltas, peers = self._average(deltas)
        with self._lock, torch.no_grad():
            for g, delta in zip(self.global_params, deltas, strict=True):
                g.grad = delta
            self.outer.step()
            self.outer.zero_grad(set_to_none=True)
        if group is not None:  # Moshpit: this volunteer's own step, then the group's average of the weights
            averaged, peers = self._average([g.clone() for g in self.global_params], group)
            with self._lock, torch.no_grad():
                for g, theta in zip(self.global_params, averaged, strict=True):
                    g.copy_(theta)
        with self._lock, torch.no_grad():
            for g, p in zip(self.global_params, self.params, strict=True):
                p.copy_(g)
            self.global_step = self.step
        return peers

    def _volunteers(self) -> list[str]:
        """The run's volunteers as the DHT last listed them (peer ids, sorted; this one always)."""
        return sorted(set(self.view.latest.volunteers) | {self.peer_id})

    def _round_size(self) -> int:
        """How many volunteers a round of one group waits for, up to ``min_matchmaking_time`` after the first one
        comes: the run's listed volunteers that this one does not ban, itself included; at least ``--min-peers``,
        at most ``--group-size``. A volunteer that reaches a round a little after the others (it took the run's
        state after a missed round, or started later) is then in it, and a round where all are there starts at
        once. A listed volunteer that died makes rounds wait out the bound until its record lapses.

        The run's first round waits out the bound whatever the listing (unless ``--min-peers`` is 1): volunteers
        started together come up seconds apart, and the DHT does not list those still starting."""
        if self.global_step == 0 and self.settings.min_peers > 1:
            return self.settings.group_size
        banned = set(self.banned) | self.averager.banned_peers()
        listed = len(set(self._volunteers()) - banned)
        return max(self.settings.min_peers, min(listed, self.settings.group_size))

    def _moshpit_group(self) -> MoshpitGroup | None:
        """This round's group on the Moshpit grid, or None when the run fits one group (module docstring)."""
        # the run's first round is one key for all, in groups of up to G, whatever the listing: volunteers started
        # together list each other only seconds apart, and those that saw different listings would take different
        # keys, average with fewer, and reach the next rounds late
        if not self.moshpit or self.global_step == 0:
            return None
        # the grid must be the same for all: the listing looked up during this round's local steps, if it comes
        # within a second (volunteers' listings differ most while they start)
        self.view.fresh(self._round_began, timeout=1.0)
        volunteers = self._volunteers()
        if len(volunteers) <= self.settings.group_size:
            return None
        number = self.step // self.settings.inner_steps
        return moshpit_group(volunteers, self.peer_id, self.settings.group_size, number)

    def _average(
        self, update: list[torch.Tensor], group: MoshpitGroup | None = None
    ) -> tuple[list[torch.Tensor], int]:
        """The group's robust average of ``update`` (this volunteer's own update when no group formed in time),
        and the group's size. ``group``: this round's group on the grid; None: one group of all (up to G)."""
        update_D = torch.cat([t.flatten() for t in update])
        sent_D = self._attacked(update_D)
        with self.averager.get_tensors() as (buffer_D,):
            buffer_D.copy_(sent_D)
        # a round's group key carries its number: volunteers in different rounds never average together (on the
        # grid, the group's index follows; the keys' lengths differ, so Δ and θ are never averaged together)
        if group is None:
            bits, size = format(self.step // self.settings.inner_steps % 256, "08b"), self._round_size()
        else:
            bits, size = group.key_bits, len(group.members)
        if self._round_went_on(group):
            return update, 1
        # with --verify, this member proposes its update's RMS as the clipping radius (the round takes the median)
        tau = float(update_D.norm()) / max(update_D.numel(), 1) ** 0.5
        result = self.averager.average(
            self.settings.averaging_timeout,
            gather=self.step,
            tau=tau or 1.0,
            group_bits=bits,
            group_size=size,
        )
        if result is None:
            return update, 1
        with self.averager.get_tensors() as (buffer_D,):
            averaged_D = buffer_D.clone()
        if result.transcript is not None:
            averaged_D = self._verify(result.transcript, sent_D, averaged_D)
        averaged, offset = [], 0
        for t in update:
            averaged.append(averaged_D[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        self.last_group = set(result.peers) - {self.peer_id}
        return averaged, len(result.peers)

    def _round_went_on(self, group: MoshpitGroup | None) -> bool:
        """Whether this round's group can no longer form with this volunteer: every other member it would meet
        (``group``'s; for one group of all, the run's listed volunteers it does not ban) is listed past this round
        already, for it took the round without this one, or a state from later. Waiting for a group would then
        cost the whole ``--averaging-timeout``, and reach the next round that much later again; skipping it, the
        volunteer takes the most advanced state (``join``) and is in step for the next round."""
        listed = self.view.latest.volunteers
        if group is not None:
            others = set(group.members)
        else:
            others = set(listed) - set(self.banned) - self.averager.banned_peers()
        others.discard(self.peer_id)
        # a member that finished this round is listed at its end: this step, or the next with H = 1 (this step's
        # gradients are averaged before it is taken)
        done = self.step + (1 if self.synchronous else 0)
        if not others or any(peer not in listed or listed[peer].step < done for peer in others):
            return False
        logger.info("Round at step %d: its group went on without this volunteer; skipping it", self.step)
        return True

    def _attacked(self, update_D: torch.Tensor) -> torch.Tensor:
        """(testing) what a dishonest volunteer sends instead of its update."""
        attack = self.settings.attack
        if attack == "scale":
            return 1000 * update_D
        if attack == "nan":
            return torch.full_like(update_D, float("nan"))
        return update_D

    # ---------------------------------------------------------------- verified rounds (BTARD)

    def _round_seed(self, key: bytes) -> int:
        """The seed of a member's batches in the current round: its key and the round's number, so that any
        member can replay them (``_recompute``)."""
        h = hashlib.sha256(f"{self.settings.run_id}/{self._round}/".encode() + key).digest()
        return int.from_bytes(h[:8], "big") >> 1

    def _start_verified_round(self) -> None:
        """A verified round's update must be replayable from the global weights alone: its batches come from the
        round's seed, and the inner optimizer starts afresh."""
        self._round = self.step // self.settings.inner_steps
        self.apply_run_bans()
        self.generator.manual_seed(self._round_seed(public_key_bytes(self.key)))
        if not self.synchronous:
            self.inner.state.clear()

    def apply_run_bans(self) -> dict[str, str]:
        """Bans the peers the run's volunteers agree to ban (``dht.ban_record.agreed_bans``) that this volunteer
        does not ban yet, as the last lookup of the run found them (``RunView``: it never waits on the DHT); returns
        them, {peer id: reason}. A verified round's start calls it: bans found during a round apply at the next."""
        agreed, me = self.view.latest.bans, self.peer_id
        if me in agreed and not self.run_bans_me:
            logger.warning(
                "The volunteers of run %s agree to ban this peer: %s", self.settings.run_id, agreed[me]
            )
            self.run_bans_me = True
        new = {peer: why for peer, why in agreed.items() if peer not in self.banned and peer != me}
        for peer, why in new.items():
            logger.warning("Applied the run's ban of %s: %s", peer, why)
        if new:
            self.banned.update(new)
            self.averager.ban(list(new))
        return new

    def _recompute(self, key: bytes) -> torch.Tensor:
        """The update a member with this key should have sent this round: its batches, from the global weights
        (H inner AdamW steps from a fresh state; with H = 1, the gradient)."""
        settings = self.settings
        if self._replica is None:
            self._replica = copy.deepcopy(self.model)
        replica = self._replica.train()
        params = [p for p in replica.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, g in zip(params, self.global_params, strict=True):
                p.copy_(g)
        generator = torch.Generator().manual_seed(self._round_seed(key))
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        for _ in range(settings.inner_steps):
            batch_BT = self.stream.batch(settings.batch_size, settings.seq_len, generator).to(settings.device)
            optimizer.zero_grad(set_to_none=False)
            replica(input_ids=batch_BT, labels=batch_BT).loss.backward()
            if self.synchronous:
                return torch.cat([p.grad.detach().cpu().float().flatten() for p in params])
            optimizer.step()
        with torch.no_grad():
            return torch.cat(
                [
                    (g - p.detach().cpu().float()).flatten()
                    for g, p in zip(self.global_params, params, strict=True)
                ]
            )

    def _verify(self, transcript, sent_D: torch.Tensor, averaged_D: torch.Tensor) -> torch.Tensor:
        """Runs the round's checks with the group (``protocols.board``); bans the peers proven to lie; returns the
        average without the shares of owners banned in this round (as every honest member keeps it)."""
        ctx = transcript.ctx
        member = MemberRound.from_transcript(transcript, self.key, sent_D, averaged_D)
        verdict = run_round(
            self.dht,
            self.prefix,
            member,
            rate=self.settings.verify_rate,
            recompute=lambda m: self._recompute(ctx.keys[m]),
            evidence=(self.averager.keep_evidence, self.averager.fetch_evidence),
            timeout=self.settings.averaging_timeout,
        )
        verdict.pop(member.me, None)  # a member cannot ban itself; others judge it
        banned = {peer: why for peer, why in peers_of(ctx.keys, verdict).items() if peer not in self.banned}
        if banned:
            for peer, why in banned.items():
                logger.warning("Banned %s from run %s: %s", peer, self.settings.run_id, why)
            self.banned.update(banned)
            self.averager.ban(list(banned))
        return without_banned_owners(ctx, averaged_D, verdict)

    # ---------------------------------------------------------------- checkpoints

    def save(self, directory: str | Path, tokenizer=None) -> None:
        """Writes the global weights as a Hugging Face folder (config, safetensors; ``from_pretrained`` loads it,
        with the tokenizer when given), ``trainer_state.pt`` (step, optimizers, batch sampler) to resume from, and
        ``train_log.jsonl`` (every step's loss).
        Call it at a round's end, when the local model holds the global weights. The folder is replaced whole:
        an interrupted save leaves the previous one."""
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with self._lock:
            self._write_model(partial)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            state = {
                "version": _STATE_VERSION,
                "run_id": self.settings.run_id,
                "inner_steps": self.settings.inner_steps,
                "step": self.step,
                "inner": self.inner.state_dict(),
                "outer": self.outer.state_dict(),
                "generator": self.generator.get_state(),
            }
            torch.save(state, partial / TRAINER_STATE)
            lines = (json.dumps(dataclasses.asdict(record)) + "\n" for record in self.history)
            (partial / TRAIN_LOG).write_text("".join(lines))
        previous = directory.with_name(directory.name + ".previous")
        if directory.exists():
            shutil.rmtree(previous, ignore_errors=True)
            directory.rename(previous)
        partial.rename(directory)
        shutil.rmtree(previous, ignore_errors=True)

    def _write_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def restore(self, directory: str | Path) -> None:
        """Takes the step, optimizers and sampler from ``save``'s ``trainer_state.pt`` (the weights were loaded with
        the model, from the same folder)."""
        path = Path(directory) / TRAINER_STATE
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises many kinds
            raise ValidationError(f"cannot read the trainer state {path}: {e}") from e
        if state.get("version") != _STATE_VERSION or state.get("run_id") != self.settings.run_id:
            raise ValidationError(f"{path} is not a checkpoint of run {self.settings.run_id!r}")
        if state.get("inner_steps") != self.settings.inner_steps:
            raise ValidationError(
                f"{path} was trained with --inner-steps {state.get('inner_steps')}, not {self.settings.inner_steps}"
            )
        with self._lock:
            self.inner.load_state_dict(state["inner"])
            self.outer.load_state_dict(state["outer"])
            self.generator.set_state(state["generator"])
            self.step = self.global_step = int(state["step"])
        log = Path(directory) / TRAIN_LOG
        if log.is_file():
            self.history = [StepRecord(**json.loads(line)) for line in log.read_text().splitlines()]

    def linger(self) -> bool:
        """At the end of training: goes on sharing this volunteer's state until the other members of its last
        round are listed at that round's end, at most as long as a late member needs (its round's timeout, then
        its catch-up and announcement); whether they were. A member whose last round failed on its side (the
        group's result came after its timeout) takes the state of those that finished it (``join``): leaving at
        once, they would leave it with other weights."""
        deadline = time.monotonic() + self.settings.averaging_timeout + CATCH_UP_TIMEOUT + LISTING_WAIT
        while True:
            asked = time.monotonic()
            self.view.refresh()
            listed = self.view.fresh(asked, timeout=max(0.0, deadline - asked)).volunteers
            banned = set(self.banned) | self.averager.banned_peers()
            behind = [
                peer
                for peer in self.last_group - banned
                if peer not in listed or listed[peer].step < self.global_step
            ]
            if not behind:
                return True
            if time.monotonic() >= deadline:
                logger.info("Left with %d volunteers behind step %d", len(behind), self.global_step)
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def shutdown(self) -> None:
        self.view.stop()
        self.averager.shutdown()


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The folder ``DiLoCoTrainer.save`` left in ``directory`` (or, after a crash between its two renames, the
    previous one), if any."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".previous")):
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    return None
