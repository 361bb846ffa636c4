"""A trainable stage of a SWARM pipeline (Ryabinin et al., "SWARM Parallelism", ICML 2023): a peer's span of blocks
whose weights change, trained from the gradients trainers send back.

Shape legend: B batch (samples), T tokens, S tokens seen (== T here), D hidden size.

The span is a ``peer.blocks.BlockSpan`` in float32 like any other; ``TrainableStage`` makes its layers a
``peer.trainable.Trainable``: a training forward keeps its graph (``graph``), a backward accumulates the blocks'
gradients and returns the gradient w.r.t. the stage's input hidden states, and once backward calls have brought
``--target-batch-size`` samples the stage takes one AdamW step. Trainers weigh each micro-batch's loss by its share of
their batch, so the accumulated sum is a mean gradient per trainer batch (see ``peer.trainable``).

``state``/``load_state`` carry the weights, AdamW's moments and the step counts as a ``protocols.stage_state``
``StageState``: what a peer that joins the stage downloads, and what a trainer assembles the model from.
``samples_per_second`` is the rate of samples its backward calls brought over the last minute (announced, for
trainers' and rebalancing's view of the stage).
"""

from __future__ import annotations

import collections
import time

import torch

from swarm_peer.errors import ValidationError
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.peer.trainable import Trainable
from swarm_peer.protocols.stage_state import StageState
from swarm_peer.settings import StageSettings

__all__ = ["TrainableStage"]

_RATE_WINDOW = 60.0  # seconds of backward calls that samples_per_second counts


class TrainableStage(Trainable):
    """Blocks ``[span.start, span.end)`` trained as one stage of run ``settings.run_id``, whose block records are
    keyed by ``model_id`` (``dht.run_model_id``); ``uid`` names the stage for averaging (``peer.replicas``)."""

    def __init__(self, span: BlockSpan, settings: StageSettings, model_id: str):
        if span.dtype != torch.float32:
            raise ValidationError(f"a training stage holds float32 weights, not {span.dtype_name}")
        self.span, self.settings = span, settings
        self.uid = f"{model_id}.{span.start}-{span.end}"
        super().__init__(
            span.layers,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            update_every=settings.target_batch_size,
        )
        self._backwards: collections.deque[tuple[float, int]] = collections.deque()  # (time, samples)

    def _run(
        self, hidden_BTD: torch.Tensor, attention_mask_BS: torch.Tensor, position_ids_BT: torch.Tensor
    ) -> torch.Tensor:
        return self.span.forward(
            hidden_BTD, attention_mask_BS, position_ids_BT, self.span.start, self.span.end
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._emulate(inputs[0].shape[0], 1 / 3)
        return super().forward(*inputs)

    def graph(self, *inputs: torch.Tensor):
        self._emulate(inputs[0].shape[0], 1 / 3)
        return super().graph(*inputs)

    def backward(self, inputs, grad_y, graph=None) -> torch.Tensor:
        self._emulate(inputs[0].shape[0], 2 / 3)
        grad = super().backward(inputs, grad_y, graph)
        self._backwards.append((time.monotonic(), inputs[0].shape[0]))
        return grad

    def _emulate(self, samples: int, part: float) -> None:
        """(testing, ``--emulated-speed``) The time a device of that speed would take, on the compute thread."""
        if self.settings.emulated_speed:
            time.sleep(samples * part / self.settings.emulated_speed)

    @property
    def samples_per_second(self) -> float:
        now = time.monotonic()
        while self._backwards and self._backwards[0][0] < now - _RATE_WINDOW:
            self._backwards.popleft()
        return sum(samples for _, samples in self._backwards) / _RATE_WINDOW

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.module.named_parameters())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The stage's parameters' names and shapes, in order (what a downloaded ``StageState`` must have)."""
        return {name: tuple(p.shape) for name, p in self._named()}

    def state(self) -> StageState:
        """Copies of the weights, AdamW's moments (None before the first step) and the step counts."""
        named = self._named()
        moments = [self.optimizer.state.get(p) for _, p in named]
        stepped = all(m and "exp_avg" in m for m in moments)
        return StageState(
            names=[name for name, _ in named],
            weights=[p.detach().clone() for _, p in named],
            exp_avg=[m["exp_avg"].clone() for m in moments] if stepped else None,
            exp_avg_sq=[m["exp_avg_sq"].clone() for m in moments] if stepped else None,
            steps=self.steps,
            adam_step=float(moments[0]["step"]) if stepped else 0.0,
        )

    def load_state(self, state: StageState) -> None:
        """Takes ``state``'s weights, moments and step count (``fetch_state`` checked its names and shapes); what
        this stage accumulated is dropped: a joining peer starts from the stage's state."""
        named = self._named()
        with torch.no_grad():
            for (_, p), w in zip(named, state.weights, strict=True):
                p.copy_(w)
        self.optimizer.state.clear()
        if state.exp_avg is not None:
            for (_, p), m, v in zip(named, state.exp_avg, state.exp_avg_sq, strict=True):
                self.optimizer.state[p] = {
                    "step": torch.tensor(state.adam_step),
                    "exp_avg": m.clone(),
                    "exp_avg_sq": v.clone(),
                }
        self.optimizer.zero_grad(set_to_none=True)
        self.samples, self.steps, self.dirty = 0, state.steps, True
