"""Expert types, by name, and the grids of uids a peer hosts them on (Learning@home, Ryabinin & Gusev 2020).

Shape legend: B batch (samples), T tokens of a sample, D hidden size (an expert's input and output width).

An expert is a ``torch.nn.Module`` that maps inputs of one shape to outputs of the same shape: ``ffn`` takes one
vector per sample, [B, D]; ``transformer`` a sequence per sample, [B, T, D]. A peer builds its experts by type name
(``swarm-peer join --expert-type ffn --hidden 512``); more types are registered with ``register_expert_type``, from a
module the peer imports (``--expert-modules my_experts``)::

    register_expert_type("gated", lambda hidden: GatedFFN(hidden), input_dims=2)

Every expert of a uid starts from the same weights, drawn from a seed of its uid (``create_expert``): a replica on
another peer, or a local copy made to check the remote one, is the same module.

``expand_grid("ffn.[0:8].[0:8]")`` lists the 64 uids of a pattern (a range or a single coordinate per dimension).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm_peer.dht import validate_expert_uid
from swarm_peer.errors import ValidationError

__all__ = [
    "ExpertType",
    "FeedForwardExpert",
    "TransformerExpert",
    "create_expert",
    "expand_grid",
    "expert_type",
    "register_expert_type",
]

MAX_EXPERTS_PER_PATTERN = 1 << 16


@dataclass(frozen=True)
class ExpertType:
    """How to build an expert of width ``hidden`` (``create(hidden)``), and the rank of its inputs: 2 for [B, D],
    3 for [B, T, D]."""

    name: str
    create: Callable[[int], nn.Module]
    input_dims: int


_TYPES: dict[str, ExpertType] = {}


def register_expert_type(name: str, create: Callable[[int], nn.Module], input_dims: int = 2) -> ExpertType:
    """Makes ``name`` an expert type: ``create(hidden)`` builds a module that maps [B, D] (``input_dims=2``) or
    [B, T, D] (``input_dims=3``) floats to the same shape. Raises ``ValidationError`` if the name is taken."""
    if name in _TYPES:
        raise ValidationError(f"expert type {name!r} is already registered")
    if input_dims not in (2, 3):
        raise ValidationError(f"an expert takes [B, D] or [B, T, D] inputs, not {input_dims} dims")
    _TYPES[name] = ExpertType(name, create, input_dims)
    return _TYPES[name]


def expert_type(name: str) -> ExpertType:
    """The registered type ``name``; ``ValidationError`` naming the known ones if there is none."""
    if name not in _TYPES:
        raise ValidationError(f"unknown expert type {name!r}; known: {', '.join(sorted(_TYPES))}")
    return _TYPES[name]


def _seed(uid: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{uid}".encode()).digest()[:8], "little") >> 1


def create_expert(type_name: str, hidden: int, uid: str, seed: int = 0) -> nn.Module:
    """The expert ``uid`` of type ``type_name`` and width ``hidden``, with the initial weights every peer gives it
    (drawn from a seed of ``seed`` and ``uid``; the global torch generator is left as it was)."""
    kind = expert_type(type_name)
    validate_expert_uid(uid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(uid, seed))
        return kind.create(hidden)


def expand_grid(pattern: str) -> list[str]:
    """The uids of a grid pattern, in order: ``"ffn.[0:2].[3:5]"`` -> ffn.0.3, ffn.0.4, ffn.1.3, ffn.1.4; a
    dimension is a range ``[a:b]`` or one coordinate (``"ffn.5.[0:8]"``). Raises ``ValidationError`` for a malformed
    pattern or one of more than ``MAX_EXPERTS_PER_PATTERN`` uids."""
    name, *dims = pattern.split(".")
    ranges = []
    for dim in dims:
        if match := re.fullmatch(r"\[(\d+):(\d+)\]", dim):
            start, end = int(match[1]), int(match[2])
            if not start < end:
                raise ValidationError(f"empty range {dim} in the expert pattern {pattern!r}")
            ranges.append(range(start, end))
        elif dim.isdigit():
            ranges.append(range(int(dim), int(dim) + 1))
        else:
            raise ValidationError(
                f"expert patterns look like 'ffn.[0:8].[0:8]' or 'ffn.3.[0:8]', not {pattern!r}"
            )
    count = 1
    for r in ranges:
        count *= len(r)
    if count > MAX_EXPERTS_PER_PATTERN:
        raise ValidationError(f"{pattern!r} names {count} experts; at most {MAX_EXPERTS_PER_PATTERN}")
    uids = [".".join((name, *map(str, coords))) for coords in itertools.product(*ranges)]
    for uid in uids[:1] + uids[-1:]:
        validate_expert_uid(uid)  # the first and last span every coordinate's width
    return uids


class FeedForwardExpert(nn.Module):
    """``ffn``: [B, D] -> [B, D], a two-layer perceptron 4x as wide inside: ``w2(gelu(w1(x)))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x_BD)))


class TransformerExpert(nn.Module):
    """``transformer``: [B, T, D] -> [B, T, D], a pre-norm encoder block (bidirectional attention over a sample's
    T tokens, heads of 64 or fewer): ``h = x + attn(norm1(x)); out = h + ffn(norm2(h))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = max(1, hidden // 64)
        if hidden % self.heads:
            raise ValidationError(f"a transformer expert's hidden size must be a multiple of {self.heads}")
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ffn = FeedForwardExpert(hidden)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(self.norm1(x_BTD)).split(D, dim=-1)
        q, k, v = (
            t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        attended_BTD = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        h_BTD = x_BTD + self.out(attended_BTD)
        return h_BTD + self.ffn(self.norm2(h_BTD))


register_expert_type("ffn", FeedForwardExpert, input_dims=2)
register_expert_type("transformer", TransformerExpert, input_dims=3)
