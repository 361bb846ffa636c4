"""Prompt tuning and deep prompt tuning: trainable prompts the client holds while the blocks stay frozen.

Shape legend: N blocks, P prompt tokens, D hidden size.

- ``prompts_PD``: P trainable embeddings put before every sequence (PEFT's prompt tuning; the positions and the
  attention mask grow by P);
- ``deep_NPD`` (deep prompt tuning): for every block, P trainable vectors that the peer adds to the hidden states
  of those P prompt tokens just before the block. They start at zero, so a fresh deep prompt changes nothing.

``save_pretrained`` writes a PEFT ``PROMPT_TUNING`` adapter (plain PEFT loads the shallow prompts); deep prompts go
to ``deep_prompts.safetensors`` beside it, which only swarm-peer reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType
from safetensors.torch import load_file, save_file
from torch import nn

from swarm_peer.errors import ValidationError

__all__ = ["PromptTuning"]

_DEEP_FILE = "deep_prompts.safetensors"


class PromptTuning(nn.Module):
    def __init__(
        self, num_tokens: int, hidden_size: int, num_blocks: int, deep: bool = False, init_std: float = 0.02
    ):
        super().__init__()
        if not 1 <= num_tokens <= 4096:
            raise ValidationError(f"the number of prompt tokens must be in 1..4096, got {num_tokens}")
        self.num_tokens, self.hidden_size, self.num_blocks = num_tokens, hidden_size, num_blocks
        self.prompts_PD = nn.Parameter(torch.randn(num_tokens, hidden_size) * init_std)
        self.deep_NPD = nn.Parameter(torch.zeros(num_blocks, num_tokens, hidden_size)) if deep else None

    def save_pretrained(self, path: str | Path, base_model_name_or_path: str | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.num_tokens,
            token_dim=self.hidden_size,
            num_transformer_submodules=1,
            base_model_name_or_path=base_model_name_or_path,
            inference_mode=True,
        )
        config.save_pretrained(str(path))
        save_file(
            {"prompt_embeddings": self.prompts_PD.detach().contiguous()},
            str(path / "adapter_model.safetensors"),
        )
        if self.deep_NPD is not None:
            save_file({"deep_prompts": self.deep_NPD.detach().contiguous()}, str(path / _DEEP_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, hidden_size: int, num_blocks: int) -> PromptTuning:
        path = Path(path)
        try:
            config = json.loads((path / "adapter_config.json").read_text())
            shallow = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"]
            deep = load_file(str(path / _DEEP_FILE))["deep_prompts"] if (path / _DEEP_FILE).exists() else None
        except (OSError, ValueError, KeyError) as e:
            raise ValidationError(f"{path} is not a readable prompt-tuning adapter: {e}") from None
        if config.get("peft_type") != "PROMPT_TUNING" or shallow.ndim != 2 or shallow.shape[1] != hidden_size:
            raise ValidationError(f"{path}: not a prompt-tuning adapter for hidden size {hidden_size}")
        prompts = cls(shallow.shape[0], hidden_size, num_blocks, deep=deep is not None)
        if deep is not None and deep.shape != prompts.deep_NPD.shape:
            raise ValidationError(
                f"{path}: deep prompts have shape {list(deep.shape)}, expected {list(prompts.deep_NPD.shape)}"
            )
        with torch.no_grad():
            prompts.prompts_PD.copy_(shallow)
            if deep is not None:
                prompts.deep_NPD.copy_(deep)
        return prompts
