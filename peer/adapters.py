"""LoRA adapters and deep prompts inside a peer's frozen blocks, without ever touching their weights.

Shape legend: B batch, T tokens of this call, P prompt tokens, D hidden size, r LoRA rank.

``applying(...)`` wraps one compute call: for its duration, each ``nn.Linear`` that a LoRA of the request targets
gets a forward hook adding ``scaling * B A x``, and each block with a deep prompt gets a pre-hook adding it to the
first P tokens of the sequence. The hooks are removed when the call ends, so two clients' adapters never mix, the
shared weights stay frozen, and plain requests pay nothing for adapters.

``check_lora`` holds a client's LoRA against the blocks it targets; ``load_served`` reads a PEFT LoRA folder (the
blocks of the span only); ``LoraCache`` keeps clients' weights by (client, digest) so they are sent once.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from swarm_peer.errors import ValidationError
from swarm_peer.protocols.extras import Lora, module_key, parse_module_key, peft_scaling

__all__ = [
    "applying",
    "check_lora",
    "check_prompts",
    "load_served",
    "adapter_name",
    "LoraCache",
]

_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


@contextlib.contextmanager
def applying(
    layers: Mapping[int, nn.Module],
    loras: Iterable[Lora | None] = (),
    prompts_NBPD: torch.Tensor | None = None,
    past: int = 0,
):
    """Within this block, the decoder layers ``layers`` (global block index -> layer, ascending) apply ``loras``
    and the deep prompts (``prompts_NBPD[i]`` for the i-th of ``layers``) to the tokens at sequence positions
    ``past, past + 1, ...``.

    The hooks that do it are added on entry and removed on exit, so outside the block the layers are the frozen
    originals and a request without adapters runs them without any hook. Only the peer's compute thread runs
    layers, one request at a time, so no other request sees these hooks.
    """
    terms: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for lora in loras:
        if lora is not None:
            for name, scaling, A, B in zip(*lora.fields, strict=True):
                terms.setdefault(name, []).append((scaling, A, B))
    handles = []
    try:
        for name, module_terms in terms.items():
            block, path = parse_module_key(name)
            if block in layers:  # a LoRA may cover more blocks than this call runs
                module = layers[block].get_submodule(path)
                handles.append(module.register_forward_hook(_lora_hook(module_terms)))
        if prompts_NBPD is not None:
            for prompts_BPD, layer in zip(prompts_NBPD, layers.values(), strict=True):
                hook = _prompt_hook(prompts_BPD, past)
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lora_hook(terms: list[tuple[float, torch.Tensor, torch.Tensor]]):
    def hook(module, args, output):
        (x,) = args[:1]
        for scaling, A, B in terms:
            delta = (x.to(A.dtype) @ A.transpose(0, 1)) @ B.transpose(0, 1)
            output = output + (scaling * delta).to(output.dtype)
        return output

    return hook


def _prompt_hook(prompts_BPD: torch.Tensor, past: int):
    def hook(module, args, kwargs):
        hidden_BTD = args[0] if args else kwargs["hidden_states"]
        start, end = past, min(past + hidden_BTD.shape[1], prompts_BPD.shape[1])
        if start >= end:
            return None
        added = prompts_BPD[:, start:end].to(hidden_BTD.dtype)
        hidden_BTD = torch.cat([hidden_BTD[:, : end - start] + added, hidden_BTD[:, end - start :]], dim=1)
        if args:
            return (hidden_BTD, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden_BTD}

    return hook


def check_lora(lora: Lora, layers: dict[int, nn.Module], max_rank: int) -> Lora:
    """Holds ``lora`` against the blocks it targets (``layers``: global index -> layer); returns it."""
    for name, A, B in zip(lora.modules, lora.lora_A, lora.lora_B, strict=True):
        block, path = parse_module_key(name)
        if block not in layers:
            raise ValidationError(
                f"LoRA module {name} is outside the requested blocks {min(layers)}:{max(layers) + 1}"
            )
        module = dict(layers[block].named_modules()).get(path)
        if not isinstance(module, nn.Linear):
            raise ValidationError(f"block {block} has no linear layer {path!r} for LoRA")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValidationError(
                f"LoRA {name}: lora_A must be (r, in) and lora_B (out, r), got {list(A.shape)}, {list(B.shape)}"
            )
        r = A.shape[0]
        if not 1 <= r <= max_rank:
            raise ValidationError(f"LoRA {name}: rank {r} is over this peer's limit of {max_rank}")
        expected = ([r, module.in_features], [module.out_features, r])
        if [list(A.shape), list(B.shape)] != list(expected):
            raise ValidationError(
                f"LoRA {name}: shapes {list(A.shape)}, {list(B.shape)} do not fit the layer "
                f"({module.in_features} -> {module.out_features}); expected {expected[0]}, {expected[1]}"
            )
    return lora


def check_prompts(
    prompts_NBPD: torch.Tensor, blocks: int, batch_size: int, hidden_size: int, max_tokens: int
) -> None:
    N, B, P, D = prompts_NBPD.shape
    if N != blocks or B not in (1, batch_size) or D != hidden_size or not 1 <= P <= max_tokens:
        raise ValidationError(
            f"deep prompts must be ({blocks} blocks, {batch_size} or 1, 1..{max_tokens} tokens, {hidden_size}), "
            f"got {list(prompts_NBPD.shape)}"
        )


def adapter_name(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
        raise ValidationError(f"adapter names are 1-32 letters, digits, '_', '.' or '-', not {name!r}")
    return name, Path(path)


def load_served(path: Path, layers: dict[int, nn.Module], dtype: torch.dtype) -> Lora | None:
    """The blocks-of-``layers`` part of the PEFT LoRA adapter in folder ``path`` (None if it has none there)."""
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValidationError(
            f"{path} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
        )
    try:
        config = json.loads(config_path.read_text())
        weights = load_file(str(weights_path))
    except Exception as e:
        raise ValidationError(f"cannot read the adapter in {path}: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ValidationError(f"{path}: only LoRA adapters can be served, not {config.get('peft_type')}")
    if config.get("use_dora") or config.get("fan_in_fan_out") or config.get("bias", "none") != "none":
        raise ValidationError(f"{path}: DoRA, fan_in_fan_out and LoRA biases are not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValidationError(
                f"{path}: unsupported adapter weight {key!r} (only LoRA on the blocks' linear layers)"
            )
        block, module_path, which = int(match.group(1)), match.group(2), match.group(3)
        if block in layers:
            pairs.setdefault(module_key(block, module_path), {})[which] = tensor.to(dtype)
    if not pairs:
        return None
    names = sorted(pairs)
    if any(len(pairs[n]) != 2 for n in names):
        raise ValidationError(f"{path}: some modules lack lora_A or lora_B")
    lora = Lora.of(
        names,
        [peft_scaling(config, parse_module_key(n)[1], pairs[n]["A"].shape[0]) for n in names],
        [pairs[n]["A"] for n in names],
        [pairs[n]["B"] for n in names],
    )
    return check_lora(lora, layers, max_rank=1 << 16)


class LoraCache:
    """Clients' LoRA weights by (client peer id, digest), least recently used first out past ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, bytes], Lora] = OrderedDict()
        self._bytes = 0

    def get(self, client: str, digest: bytes) -> Lora | None:
        lora = self._items.get((client, digest))
        if lora is not None:
            self._items.move_to_end((client, digest))
        return lora

    def put(self, client: str, lora: Lora) -> None:
        key = (client, lora.digest)
        if key in self._items or lora.nbytes > self.max_bytes:
            return
        self._items[key] = lora
        self._bytes += lora.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes
