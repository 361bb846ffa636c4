"""The experts a peer hosts and trains: forward, backward that accumulates gradients, an optimizer step per expert
after ``update_every`` samples, and their state on disk.

Shape legend: B batch (samples), T tokens of a sample, D hidden size.

Learning@home (Ryabinin & Gusev 2020, §3.4 of our research notes) trains experts asynchronously: each one updates
itself with its own optimizer from the gradients trainers send back, whoever they are. Here:

- ``forward(x)`` is the expert's output, no graph kept; ``graph(x)`` the same computed with grad, its graph kept
  (``peer.graphs.Graph``) for a training client's backward;
- ``backward(x, grad_y, graph)`` differentiates ``graph`` if it is the forward of these inputs at the weights the
  expert still has, else computes the forward again (the weights may have stepped since the forward the trainer
  saw: asynchronous training); it returns the gradient w.r.t. ``x`` and adds the parameters' gradients to what
  the expert has accumulated; once accumulated backward calls brought ``update_every`` samples (rows of ``x``), the
  expert takes one AdamW step on that sum and starts accumulating again. A gradient summed over calls, not
  averaged: AdamW's step does not depend on the gradient's scale (but for its epsilon).

Everything here runs on the peer's one compute thread (``handlers.Handlers._compute``), so steps never race with
forwards. ``save`` writes one file per expert that changed since its last save (``{uid}.pt``: weights, optimizer,
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
from swarm_peer.peer.graphs import Graph, SavedTensors
from swarm_peer.settings import ExpertSettings

__all__ = ["HostedExpert", "HostedExperts"]

logger = logging.getLogger(__name__)

_FORMAT = 1  # of the checkpoint files


class HostedExpert:
    """One trainable expert: its module, its AdamW optimizer, the samples accumulated since its last step."""

    def __init__(self, uid: str, settings: ExpertSettings, device: str = "cpu"):
        self.uid, self.update_every = uid, settings.update_every
        self.module = create_expert(settings.expert_type, settings.hidden, uid, settings.seed).to(device)
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.samples = 0  # accumulated in the parameters' .grad since the last step
        self.unaveraged = (
            0  # samples of backward calls since it last averaged with its replicas (``expert_replicas``)
        )
        self.steps = 0  # optimizer steps taken
        self.dirty = False  # changed (accumulated or stepped) since the last save

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x)

    def graph(self, x: torch.Tensor) -> Graph:
        """The forward of ``x`` with its graph, and the memory the graph holds (the weights not counted)."""
        with torch.enable_grad(), SavedTensors(self.module.parameters()) as saved:
            leaf = x.detach().requires_grad_(True)
            y = self.module(leaf)
        saved.count(y)
        return Graph((x,), _Weights(self._versions()), y, [leaf], saved.nbytes)

    def _versions(self) -> tuple[int, ...]:
        """The weights' version counters: any in-place change (an optimizer step, averaging) moves them."""
        return tuple(p._version for p in self.module.parameters())

    def backward(self, x: torch.Tensor, grad_y: torch.Tensor, graph: Graph | None = None) -> torch.Tensor:
        """The gradient w.r.t. ``x``; the parameters' gradients are accumulated, and stepped on (see the module).
        ``graph``: the forward's, used if it is of ``x`` at the current weights."""
        with torch.enable_grad():
            if graph is not None and graph.matches((x,), _Weights(self._versions())):
                x, y = graph.leaves[0], graph.outputs
            else:
                x = x.detach().requires_grad_(True)
                y = self.module(x)
            torch.autograd.backward(y, grad_y)
        self.samples, self.unaveraged, self.dirty = (
            self.samples + x.shape[0],
            self.unaveraged + x.shape[0],
            True,
        )
        if self.samples >= self.update_every:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.samples, self.steps = 0, self.steps + 1
        return torch.zeros_like(x) if x.grad is None else x.grad  # an output that ignores x: no gradient

    def state_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "uid": self.uid,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "samples": self.samples,
            "steps": self.steps,
            "grads": {name: p.grad for name, p in self.module.named_parameters() if p.grad is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != _FORMAT or state.get("uid") != self.uid:
            raise ValidationError(f"not a checkpoint of expert {self.uid}")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, p in self.module.named_parameters():
            p.grad = state["grads"].get(name)
        self.samples, self.steps = state["samples"], state["steps"]


class _Weights:
    """A graph's ``extras`` (``Graph.matches``): the weights it was computed at, as their version counters."""

    def __init__(self, versions: tuple[int, ...]):
        self.versions = versions

    def same_as(self, other: _Weights) -> bool:
        return self.versions == other.versions


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
