"""The experts a peer hosts and trains: forward, backward that accumulates gradients, an optimizer step per expert
after ``update_every`` samples, and their state on disk.

Shape legend: B batch (samples), T tokens of a sample, D hidden size.

Learning@home (Ryabinin & Gusev 2020, §3.4 of our research notes) trains experts asynchronously: each one updates
itself with its own optimizer from the gradients trainers send back, whoever they are. Each expert is a
``peer.trainable.Trainable``: ``forward(x)``, ``graph(x)`` for a training client's forward, ``backward((x,), grad_y,
graph)`` that accumulates the parameters' gradients and steps once ``update_every`` samples came.

``save`` writes one file per expert that changed since its last save (``{uid}.pt``: weights, optimizer,
counters, the gradients accumulated so far), atomically; ``HostedExperts(..., checkpoint_dir)`` restores them, so a peer restarted with the same
directory (and ``--identity``, so the same peer id in the DHT) serves its trained experts again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from swarm_peer.errors import MissingBlocksError, ValidationError
from swarm_peer.moe.experts import create_expert, expert_type
from swarm_peer.peer.trainable import Trainable
from swarm_peer.settings import ExpertSettings

__all__ = ["HostedExpert", "HostedExperts"]

logger = logging.getLogger(__name__)

_FORMAT = 1  # of the checkpoint files


class HostedExpert(Trainable):
    """One trainable expert (``peer.trainable``): its module, its AdamW optimizer, its counters."""

    def __init__(self, uid: str, settings: ExpertSettings, device: str = "cpu"):
        self.uid = uid
        module = create_expert(settings.expert_type, settings.hidden, uid, settings.seed).to(device)
        super().__init__(
            module, lr=settings.lr, weight_decay=settings.weight_decay, update_every=settings.update_every
        )

    def state_dict(self) -> dict:
        return {"format": _FORMAT, "uid": self.uid, **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != _FORMAT or state.get("uid") != self.uid:
            raise ValidationError(f"not a checkpoint of expert {self.uid}")
        super().load_state_dict(state)


class HostedExperts:
    """The experts of ``settings.uids``, restored from ``checkpoint_dir`` where it holds them.

    Raises ``ValidationError`` for an unknown expert type or a checkpoint that does not fit the experts (another
    type or width: the module refuses its tensors).
    """

    def __init__(self, settings: ExpertSettings, device: str = "cpu"):
        self.settings, self.device = settings, device
        self.type = expert_type(settings.expert_type)
        self.experts = {uid: HostedExpert(uid, settings, device) for uid in settings.uids}
        self.checkpoint_dir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else None
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            restored = [uid for uid, expert in self.experts.items() if self._restore(expert)]
            if restored:
                logger.info("Restored %d experts from %s", len(restored), self.checkpoint_dir)

    def __getitem__(self, uid: str) -> HostedExpert:
        expert = self.experts.get(uid)
        if expert is None:
            raise MissingBlocksError(f"expert {uid!r:.80} is not served here")
        return expert

    def __len__(self) -> int:
        return len(self.experts)

    def _path(self, uid: str) -> Path:
        return self.checkpoint_dir / f"{uid}.pt"

    def _restore(self, expert: HostedExpert) -> bool:
        path = self._path(expert.uid)
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        try:
            expert.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValidationError(f"{path} does not fit expert {expert.uid}: {e}") from None
        return True

    def save(self) -> int:
        """Writes the experts that changed since their last save; how many. Call it from the compute thread."""
        if self.checkpoint_dir is None:
            return 0
        saved = 0
        for uid, expert in self.experts.items():
            if expert.dirty:
                tmp = self._path(uid).with_suffix(".tmp")
                torch.save(expert.state_dict(), tmp)
                os.replace(tmp, self._path(uid))  # a reader (a restart) sees the old file or the new one
                expert.dirty, saved = False, saved + 1
        return saved
