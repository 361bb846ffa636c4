"""A volunteer's shard of training text: one token stream, and batches of random windows of it.

Shape legend: B sequences, T tokens.

    stream = TokenStream.from_file("shard.txt", tokenizer)
    batch_BT = stream.batch(batch_size=8, seq_len=256, generator=g)  # inputs are labels: the model shifts them

The file is tokenized once, in lines, joined by the tokenizer's end-of-sequence token (when it has one). Windows
start at random offsets drawn from ``generator``, so two volunteers with the same seed and shard draw the same
batches, and the same run restarted draws them again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from swarm_peer.errors import ValidationError

__all__ = ["TokenStream"]


class TokenStream:
    def __init__(self, tokens: torch.Tensor):
        if tokens.ndim != 1 or tokens.dtype != torch.long:
            raise ValidationError(
                f"a token stream is a 1-D long tensor, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        self.tokens = tokens

    @classmethod
    def from_file(cls, path: str | Path, tokenizer) -> TokenStream:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationError(f"cannot read the training text {path}: {e}") from e
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValidationError(f"the training text {path} is empty")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for encoded in tokenizer(lines, add_special_tokens=False)["input_ids"]:
            ids += encoded + eos
        return cls(torch.tensor(ids, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` windows of ``seq_len`` tokens at random offsets: a [B, T] long tensor."""
        if len(self.tokens) < seq_len:
            raise ValidationError(
                f"the training text has {len(self.tokens)} tokens, fewer than one sequence of {seq_len}"
            )
        starts_B = torch.randint(0, len(self.tokens) - seq_len + 1, (batch_size,), generator=generator)
        return torch.stack([self.tokens[start : start + seq_len] for start in starts_B.tolist()])
