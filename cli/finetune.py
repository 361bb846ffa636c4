"""Fine-tuning through the swarm from the command line: LoRA or (deep) prompt tuning on a plain-text file.

    swarm-peer finetune MODEL --initial-peers MADDR --data FILE.txt --output DIR [--mode lora|ptune|deep_ptune]

The text is tokenized once and cut into blocks of ``seq_len`` tokens (the tail that does not fill a block is
dropped); every step trains on ``batch_size`` blocks with the causal-LM loss. Only the client's own weights train
(the LoRA matrices or the prompts); the peers' blocks stay frozen. The result is a PEFT adapter folder.

Shape legend: N blocks of text, B blocks per batch, T tokens per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import torch
from torch import nn
from transformers import AutoTokenizer

__all__ = ["load_blocks", "train", "run_finetune"]


def load_blocks(data: Path, tokenizer_path: str | Path, seq_len: int) -> torch.Tensor:
    """The blocks (N, T) of the text file ``data``; a ``click`` error for an unreadable file or tokenizer, or N=0."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    except (OSError, ValueError) as e:
        raise click.UsageError(
            f"cannot load a tokenizer from {tokenizer_path} ({str(e).splitlines()[0]}); pass --tokenizer PATH"
        ) from None
    try:
        text = data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {data} as UTF-8 text: {e}", param_hint="--data") from None
    tokenizer.model_max_length = math.inf  # one long text, never fed to a model at once: no length warning
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    N = ids.numel() // seq_len  # the tail that does not fill a block is dropped
    if N == 0:
        raise click.BadParameter(
            f"{data} has {ids.numel()} tokens, fewer than one block of --seq-len {seq_len}",
            param_hint="--data",
        )
    return ids[: N * seq_len].view(N, seq_len)


def _batches(N: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Indices of B blocks at a time: epoch after epoch, each a fresh permutation (torch's global RNG)."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(N)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def train(
    model: nn.Module,
    blocks_of_ids,
    steps: int,
    lr: float,
    batch_size: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Trains ``model``'s parameters that require grad with AdamW for ``steps`` steps; returns every step's loss.

    ``blocks_of_ids``: (N, T) token ids (a tensor or nested lists). Each step takes B=``batch_size`` blocks in a
    random order (epoch by epoch; seed torch's RNG for a repeatable run) and minimizes the causal-LM loss of
    ``model(input_ids=ids_BT, attention_mask=1, labels=ids_BT)``: a ``DistributedModelForCausalLM`` with LoRA
    or prompts, or any local transformers / PEFT model. ``on_step(step, loss)`` runs after each optimizer step.
    """
    blocks_NT = torch.as_tensor(blocks_of_ids, dtype=torch.long)
    if blocks_NT.ndim != 2 or blocks_NT.shape[0] == 0:
        raise ValueError(f"blocks_of_ids must be (N, T) with N >= 1, got shape {list(blocks_NT.shape)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add a LoRA or prompts first")
    optimizer = torch.optim.AdamW(params, lr=lr)
    batches = _batches(blocks_NT.shape[0], batch_size)
    losses = []
    for step in range(steps):
        ids_BT = blocks_NT[next(batches)]
        out = model(input_ids=ids_BT, attention_mask=torch.ones_like(ids_BT), labels=ids_BT)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def run_finetune(
    model: str,
    settings,
    *,
    data: Path,
    output: Path,
    mode: str,
    blocks_NT: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    lora_r: int = 8,
    lora_alpha: float = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    num_prompts: int = 16,
    adapter: str = "",
    seed: int = 0,
) -> list[float]:
    """Connects to the swarm, adds the trainable weights for ``mode``, trains, saves the adapter into ``output``."""
    from peft import LoraConfig
    from tqdm.auto import tqdm

    from swarm_peer.cli.main import progress_bars
    from swarm_peer.client.model import DistributedModelForCausalLM

    distributed = DistributedModelForCausalLM.from_pretrained(model, settings=settings, adapter=adapter)
    try:
        distributed.requires_grad_(False)
        torch.manual_seed(seed)
        if mode == "lora":
            config = LoraConfig(
                r=lora_r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0
            )
            trained = distributed.add_lora(config)
        else:
            trained = distributed.add_prompts(num_tokens=num_prompts, deep=mode == "deep_ptune")
        with tqdm(
            total=steps, desc=f"{mode} on {data.name}", unit="step", disable=not progress_bars()
        ) as bar:

            def on_step(step: int, loss: float) -> None:
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update()

            losses = train(distributed, blocks_NT, steps, lr, batch_size, on_step=on_step)
        trained.save_pretrained(output, base_model_name_or_path=str(distributed.checkpoint.path))
        return losses
    finally:
        distributed.shutdown()
