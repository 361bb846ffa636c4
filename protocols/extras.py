"""What travels with a request besides the hidden states: a served adapter's name, deep prompts, client LoRA.

Shape legend: N blocks of the request's span, B batch, P prompt tokens, D hidden size, r LoRA rank.

``Extras`` is one request's (or one session's) additions to the frozen blocks:

- ``adapter``: the name of a LoRA adapter the peer serves (``swarm-peer join --adapters``);
- ``prompts_NBPD``: deep prompts, added to the hidden states of the first P tokens before each block;
- ``lora``: the client's own LoRA weights (PEFT's ``y = W x + scaling * B A x``) for some linear layers of the
  span's blocks, named ``"{global block}.{module path}"``. They are identified by a digest, so a peer that has
  them cached can be sent the digest alone.

On the wire (``swarm_pb2.Extras``) the tensors follow the request's own: prompts, then ``lora_A``, ``lora_B`` per
module. ``encode`` and ``decode`` check only what can be checked without the blocks (counts, names, dtypes,
finiteness); the peer checks the rest against its modules.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from swarm_peer.errors import ValidationError
from swarm_peer.protocols import swarm_pb2

__all__ = [
    "Lora",
    "Extras",
    "encode",
    "decode",
    "tensor_count",
    "module_key",
    "parse_module_key",
    "peft_scaling",
]

_MODULE_KEY = re.compile(r"(\d{1,6})\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+){0,7})")
_MAX_MODULES = 4096
_MAX_SCALING = 1e4


def peft_scaling(config: dict, module_path: str, rank: int) -> float:
    """PEFT's LoRA scaling of one module: lora_alpha / r (/ sqrt(r) with rsLoRA), honouring ``alpha_pattern``."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_path):
            alpha = value
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def module_key(block: int, path: str) -> str:
    return f"{block}.{path}"


def parse_module_key(key: str) -> tuple[int, str]:
    """``"3.self_attn.q_proj"`` -> ``(3, "self_attn.q_proj")``, or ``ValidationError``."""
    match = _MODULE_KEY.fullmatch(key)
    if match is None:
        raise ValidationError(f"LoRA module names look like '3.self_attn.q_proj', not {key[:80]!r}")
    return int(match.group(1)), match.group(2)


@dataclass(frozen=True)
class Lora:
    """LoRA weights for a set of linear layers: ``lora_A[i]`` (r, in), ``lora_B[i]`` (out, r), ``scalings[i]``."""

    modules: tuple[str, ...]
    scalings: tuple[float, ...]
    lora_A: tuple[torch.Tensor, ...]
    lora_B: tuple[torch.Tensor, ...]
    digest: bytes = field(default=b"", compare=False)

    @classmethod
    def of(cls, modules: Sequence[str], scalings: Sequence[float], lora_A, lora_B) -> Lora:
        lora = cls(tuple(modules), tuple(float(s) for s in scalings), tuple(lora_A), tuple(lora_B))
        return cls(*lora.fields, digest=lora.compute_digest())

    @property
    def fields(self):
        return self.modules, self.scalings, self.lora_A, self.lora_B

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.lora_A, self.lora_B, strict=True) for t in pair]

    def compute_digest(self) -> bytes:
        h = hashlib.sha256()
        for name, scaling, A, B in zip(*self.fields, strict=True):
            h.update(f"{name}:{scaling!r};".encode())
            for t in (A, B):
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{list(t.shape)};".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.digest()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass(frozen=True)
class Extras:
    adapter: str = ""
    prompts_NBPD: torch.Tensor | None = None
    lora: Lora | None = None

    def __bool__(self) -> bool:
        return bool(self.adapter) or self.prompts_NBPD is not None or self.lora is not None


def encode(
    extras: Extras | None, attach_lora: bool = True
) -> tuple[swarm_pb2.Extras | None, list[torch.Tensor]]:
    """The wire message and the tensors that follow the request's own."""
    if not extras:
        return None, []
    message = swarm_pb2.Extras(adapter=extras.adapter, deep_prompts=extras.prompts_NBPD is not None)
    tensors = [] if extras.prompts_NBPD is None else [extras.prompts_NBPD]
    if extras.lora is not None:
        lora = extras.lora
        message.lora.CopyFrom(
            swarm_pb2.LoraSpec(
                digest=lora.digest, modules=lora.modules, scalings=lora.scalings, attached=attach_lora
            )
        )
        if attach_lora:
            tensors += lora.tensors
    return message, tensors


def tensor_count(message: swarm_pb2.Extras | None) -> int:
    """How many tensors ``message`` says follow; refuses absurd counts before anything is read."""
    if message is None:
        return 0
    if len(message.lora.modules) > _MAX_MODULES:
        raise ValidationError(
            f"at most {_MAX_MODULES} LoRA modules per request, got {len(message.lora.modules)}"
        )
    lora_tensors = 2 * len(message.lora.modules) if message.lora.attached else 0
    return int(message.deep_prompts) + lora_tensors


def decode(message: swarm_pb2.Extras | None, tensors: list[torch.Tensor]) -> tuple[Extras, bytes | None]:
    """Extras from the wire, and the digest of LoRA weights the peer must take from its cache (None if attached
    or no LoRA). Checks names, counts, dtypes, finiteness and the digest of attached weights."""
    if message is None:
        return Extras(), None
    if len(tensors) != tensor_count(message):
        raise ValidationError(
            f"the request's extras need {tensor_count(message)} tensors, got {len(tensors)}"
        )
    if len(message.adapter) > 64:
        raise ValidationError("adapter names are at most 64 characters")
    prompts = None
    if message.deep_prompts:
        prompts = _float("deep prompts", tensors.pop(0))
        if prompts.ndim != 4:
            raise ValidationError(
                f"deep prompts must be (blocks, batch, prompt tokens, hidden), got {list(prompts.shape)}"
            )
    spec = message.lora
    if not spec.modules:
        return Extras(adapter=message.adapter, prompts_NBPD=prompts), None
    if len(spec.scalings) != len(spec.modules):
        raise ValidationError(f"{len(spec.modules)} LoRA modules but {len(spec.scalings)} scalings")
    if len(set(spec.modules)) != len(spec.modules):
        raise ValidationError("LoRA module names must be unique")
    for name in spec.modules:
        parse_module_key(name)
    for s in spec.scalings:
        if not math.isfinite(s) or abs(s) > _MAX_SCALING:
            raise ValidationError(f"LoRA scalings must be finite and at most {_MAX_SCALING:g}, got {s}")
    if len(spec.digest) != 32:
        raise ValidationError("a LoRA digest is 32 bytes (sha256)")
    if not spec.attached:
        return Extras(adapter=message.adapter, prompts_NBPD=prompts), spec.digest
    weights = [_float(f"LoRA weights of {spec.modules[i // 2]}", t) for i, t in enumerate(tensors)]
    lora = Lora.of(spec.modules, spec.scalings, weights[0::2], weights[1::2])
    if lora.digest != spec.digest:
        raise ValidationError("the LoRA weights do not match their digest")
    return Extras(adapter=message.adapter, prompts_NBPD=prompts, lora=lora), None


def _float(what: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ValidationError(f"{what} must be floating-point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValidationError(f"{what} contain NaN or infinity")
    return tensor
