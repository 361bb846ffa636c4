"""A module a peer trains from the gradients its callers send back: an expert (``peer.experts``) or a stage of a
SWARM pipeline (``peer.stage``).

- ``forward(*inputs)`` is the module's output, no graph kept; ``graph(*inputs)`` the same computed with grad, its
  graph kept (``peer.graphs.Graph``) for the caller's backward. The first input is the one differentiated (hidden
  states); the others (masks, positions) only go along.
- ``backward(inputs, grad_y, graph)`` differentiates ``graph`` if it is the forward of these inputs at the weights
  the module still has, else computes the forward again (the weights may have stepped since the forward the caller
  saw: asynchronous training); it returns the gradient w.r.t. the first input and adds the parameters' gradients to
  what the module has accumulated. Once accumulated backward calls brought ``update_every`` x ``share`` samples
  (rows of the first input), the module takes one AdamW step on that sum and starts accumulating again. ``share``
  is this peer's part of the samples that the module's replicas on other peers process together (1 alone): the
  replicas of a stage of a SWARM run then step at the pace of the stage as a whole, whatever each one's speed. A gradient summed over
  calls, not averaged: a caller that wants the mean over a batch weighs each micro-batch's loss by its share of the
  batch, and AdamW's step does not depend on the gradient's scale anyway (but for its epsilon).

Everything here runs on the peer's one compute thread (``handlers.Handlers._compute``), so steps never race with
forwards. ``state_dict``/``load_state_dict`` carry the weights, the optimizer and the counters: a checkpoint on
disk, or the state a joining peer downloads.
"""

from __future__ import annotations

import torch
from torch import nn

from swarm_peer.peer.graphs import Graph, SavedTensors

__all__ = ["Trainable"]


class Trainable:
    """One trainable module: its AdamW optimizer, the samples accumulated since its last step, its step count."""

    def __init__(self, module: nn.Module, *, lr: float, weight_decay: float, update_every: int):
        self.module = module.requires_grad_(True)
        self.update_every = update_every
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        self.samples = 0  # accumulated in the parameters' .grad since the last step
        self.unaveraged = 0  # samples of backward calls since it last averaged with its replicas
        self.steps = 0  # optimizer steps taken
        self.dirty = False  # changed (accumulated, stepped or averaged) since the last save
        self.share = 1.0  # this peer's part of the samples its module's replicas process (module docstring)
        self.steps_itself = (
            True  # False: its steps are taken with its replicas (``peer.replicas.StageSteps``)
        )

    def _run(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._run(*inputs)

    def graph(self, *inputs: torch.Tensor) -> Graph:
        """The forward of ``inputs`` with its graph, and the memory the graph holds (the weights not counted)."""
        with torch.enable_grad(), SavedTensors(self.module.parameters()) as saved:
            leaf = inputs[0].detach().requires_grad_(True)
            y = self._run(leaf, *inputs[1:])
        saved.count(y)
        return Graph(tuple(inputs), _Weights(self._versions()), y, [leaf], saved.nbytes)

    def _versions(self) -> tuple[int, ...]:
        """The weights' version counters: any in-place change (an optimizer step, averaging) moves them."""
        return tuple(p._version for p in self.module.parameters())

    def backward(
        self, inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor, graph: Graph | None = None
    ) -> torch.Tensor:
        """The gradient w.r.t. ``inputs[0]``; the parameters' gradients are accumulated, and stepped on (see the
        module). ``graph``: the forward's, used if it is of ``inputs`` at the current weights."""
        with torch.enable_grad():
            if graph is not None and graph.matches(tuple(inputs), _Weights(self._versions())):
                x, y = graph.leaves[0], graph.outputs
            else:
                x = inputs[0].detach().requires_grad_(True)
                y = self._run(x, *inputs[1:])
            torch.autograd.backward(y, grad_y.to(y.dtype))
        samples = x.shape[0]
        self.samples, self.unaveraged, self.dirty = self.samples + samples, self.unaveraged + samples, True
        if self.steps_itself and self.samples >= self.update_every * self.share:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.samples, self.steps = 0, self.steps + 1
        return torch.zeros_like(x) if x.grad is None else x.grad  # an output that ignores x: no gradient

    def step_on(self, grad: torch.Tensor) -> None:
        """One AdamW step on ``grad`` (the parameters' gradients, flat); what backward calls accumulated meanwhile
        stays accumulated for the next step."""
        params = list(self.module.parameters())
        kept = [p.grad for p in params]
        offset = 0
        for p in params:
            p.grad = grad[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
            offset += p.numel()
        self.optimizer.step()
        for p, g in zip(params, kept, strict=True):
            p.grad = g
        self.steps, self.dirty = self.steps + 1, True

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "samples": self.samples,
            "steps": self.steps,
            "grads": {name: p.grad for name, p in self.module.named_parameters() if p.grad is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Raises ``RuntimeError``, ``KeyError`` or ``ValueError`` for a state that does not fit the module."""
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
