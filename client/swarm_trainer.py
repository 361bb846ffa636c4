"""A trainer of a SWARM run (``swarm-peer train --swarm``): it holds the model's embeddings, final norm and head,
and pushes micro-batches through the run's trainable stages (``client.stages``), several at once.

Its own layers train as a DiLoCo volunteer's model does (``client.diloco``: local AdamW steps, and every
``--inner-steps`` an averaging round with the run's other trainers, robust or plain as configured), while each
stage trains on its peers from the gradients the trainers send back (``peer.stage``) and averages with the stage's
other peers. ``save`` writes the whole current model as a Hugging Face folder that ``from_pretrained`` loads: this
trainer's layers, and each stage's current weights downloaded from a peer of the stage (``assemble``).

    model = DistributedModelForCausalLM.from_pretrained(path, runtime=runtime, run_id="my-run")
    trainer = SwarmTrainer(model, TokenStream.from_file("shard.txt", tokenizer), settings, runtime.dht)
    for record in trainer.train(100): ...
    trainer.save("result/", tokenizer)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from swarm_peer.client.diloco import DiLoCoTrainer
from swarm_peer.client.stages import RemoteStages
from swarm_peer.errors import ValidationError

__all__ = ["SwarmTrainer", "assemble"]


class SwarmTrainer(DiLoCoTrainer):
    """A DiLoCo volunteer whose model is a ``DistributedModelForCausalLM`` of a SWARM run (module docstring)."""

    def _write_model(self, directory: Path) -> None:
        assemble(self.model).save_pretrained(directory)


def assemble(model) -> PreTrainedModel:
    """The whole model of ``model``'s run as one local transformers model: ``model``'s own layers (embeddings, final
    norm, head) and each stage's current weights, downloaded from a peer of the stage."""
    stages: RemoteStages = model.remote.blocks
    full = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    layers = getattr(full, full.base_model_prefix).layers
    state = {name: p.detach() for name, p in model.named_parameters()}
    stages.refresh(force=True)
    for start, end in stages.stages:
        shapes = {name: tuple(p.shape) for name, p in layers[start:end].named_parameters()}
        downloaded = stages.download((start, end), shapes)
        for name, weight in zip(downloaded.names, downloaded.weights, strict=True):
            index, rest = name.split(".", 1)
            state[f"{full.base_model_prefix}.layers.{start + int(index)}.{rest}"] = weight
    missing, unexpected = full.load_state_dict(state, strict=False)
    tied = {name for name, _ in full.named_parameters(remove_duplicate=False)} - dict(
        full.named_parameters()
    ).keys()
    if set(missing) - tied or unexpected:
        raise ValidationError(
            f"the assembled model lacks {sorted(missing)[:4]} or has extra {sorted(unexpected)[:4]}"
        )
    return full
