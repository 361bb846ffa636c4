"""Client-owned LoRA for the swarm's blocks: trainable here, applied by the peers, saved in PEFT's format.

The client holds ``lora_A`` (r, in) and ``lora_B`` (out, r) for the linear layers of the remote blocks that a
``peft.LoraConfig`` targets; every request carries the weights of the blocks it runs (``for_blocks``), and the
peer adds ``scaling * B A x`` to those layers and returns the weights' gradients in backward. The peers' shared
weights never change.

``save_pretrained(path)`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names, so
``PeftModel.from_pretrained(local_model, path)`` loads it; ``RemoteLora.from_pretrained`` reads the same folders.

>>> lora = model.add_lora(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
>>> optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-3)
>>> lora.save_pretrained("my-adapter")
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from swarm_peer.errors import ValidationError
from swarm_peer.protocols.extras import Lora, module_key, parse_module_key, peft_scaling

__all__ = ["RemoteLora", "block_linears"]

_PEFT_KEY = "base_model.model.model.layers.{}.{}.lora_{}.weight"
_UNSUPPORTED = {
    "lora_dropout": 0.0,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
}


def block_linears(layers: nn.ModuleList) -> dict[str, tuple[int, int]]:
    """``"{block}.{path}"`` -> (in_features, out_features) for every linear layer of the blocks (may be on meta)."""
    return {
        module_key(i, path): (m.in_features, m.out_features)
        for i, layer in enumerate(layers)
        for path, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    }


class RemoteLora(nn.Module):
    """Trainable LoRA weights for the remote blocks' linear layers that ``config`` targets."""

    def __init__(self, config: LoraConfig, linears: dict[str, tuple[int, int]]):
        super().__init__()
        for option, default in _UNSUPPORTED.items():
            if getattr(config, option, default) not in (default, None, [], set(), ()):
                raise ValidationError(
                    f"LoRA through the swarm does not support {option}={getattr(config, option)!r}"
                )
        if config.target_modules is None:
            raise ValidationError("the LoraConfig needs target_modules, e.g. ['q_proj', 'v_proj']")
        self.config = config
        peft_dict = config.to_dict()
        self.modules_names: list[str] = [
            name for name in sorted(linears, key=_order) if _targets(config, name)
        ]
        if not self.modules_names:
            raise ValidationError(
                f"target_modules {config.target_modules} match no linear layer of the blocks"
            )
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.scalings: dict[str, float] = {}
        for name in self.modules_names:
            in_features, out_features = linears[name]
            rank = _rank(config, parse_module_key(name)[1])
            A = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's default initialization
            self.lora_A[_param(name)] = nn.Parameter(A)
            self.lora_B[_param(name)] = nn.Parameter(torch.zeros(out_features, rank))
            self.scalings[name] = peft_scaling(peft_dict, parse_module_key(name)[1], rank)

    def pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        return [(n, self.lora_A[_param(n)], self.lora_B[_param(n)]) for n in self.modules_names]

    def ordered_parameters(self) -> list[nn.Parameter]:
        """A, B of every module in ``modules_names`` order: the order of ``Lora.tensors``."""
        return [t for _, A, B in self.pairs() for t in (A, B)]

    def for_blocks(self, a: int, b: int) -> Lora | None:
        """A detached snapshot of the weights of blocks [a, b), with its digest (None if it has no module there)."""
        chosen = [(n, A, B) for n, A, B in self.pairs() if a <= parse_module_key(n)[0] < b]
        if not chosen:
            return None
        return Lora.of(
            [n for n, _, _ in chosen],
            [self.scalings[n] for n, _, _ in chosen],
            [A.detach().clone() for _, A, _ in chosen],
            [B.detach().clone() for _, _, B in chosen],
        )

    def save_pretrained(self, path: str | Path, base_model_name_or_path: str | None = None) -> None:
        """Writes a PEFT LoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(**{**self.config.to_dict(), "base_model_name_or_path": base_model_name_or_path})
        config.inference_mode = True
        config.save_pretrained(str(path))
        state = {}
        for name, A, B in self.pairs():
            block, module_path = parse_module_key(name)
            state[_PEFT_KEY.format(block, module_path, "A")] = A.detach().cpu().contiguous()
            state[_PEFT_KEY.format(block, module_path, "B")] = B.detach().cpu().contiguous()
        save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, linears: dict[str, tuple[int, int]]) -> RemoteLora:
        """Reads a PEFT LoRA adapter folder (as written by ``save_pretrained`` or by PEFT itself)."""
        path = Path(path)
        try:
            config_dict = json.loads((path / "adapter_config.json").read_text())
            weights = load_file(str(path / "adapter_model.safetensors"))
        except (OSError, ValueError) as e:
            raise ValidationError(f"{path} is not a readable PEFT adapter folder: {e}") from None
        if config_dict.get("peft_type") != "LORA":
            raise ValidationError(f"{path}: not a LoRA adapter ({config_dict.get('peft_type')})")
        config = LoraConfig.from_pretrained(str(path))
        lora = cls(config, linears)
        expected = {}
        for name, A, B in lora.pairs():
            block, module_path = parse_module_key(name)
            expected[_PEFT_KEY.format(block, module_path, "A")] = A
            expected[_PEFT_KEY.format(block, module_path, "B")] = B
        found = {
            re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): t for k, t in weights.items()
        }
        if set(found) != set(expected):
            extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
            raise ValidationError(
                f"{path}: adapter weights do not match its config: extra {extra[:3]}, missing {missing[:3]}"
            )
        with torch.no_grad():
            for key, param in expected.items():
                if found[key].shape != param.shape:
                    raise ValidationError(
                        f"{path}: {key} has shape {list(found[key].shape)}, expected {list(param.shape)}"
                    )
                param.copy_(found[key])
        return lora


def _param(name: str) -> str:
    return name.replace(".", "__")


def _order(name: str):
    block, path = parse_module_key(name)
    return block, path


def _rank(config: LoraConfig, module_path: str) -> int:
    rank = config.r
    for pattern, value in (config.rank_pattern or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_path):
            rank = value
    return rank


def _targets(config: LoraConfig, name: str) -> bool:
    """PEFT's rule: a string is a regex over the full module name; a list matches the name's last components."""
    block, path = parse_module_key(name)
    if config.layers_to_transform is not None:
        layers = config.layers_to_transform
        if block not in ([layers] if isinstance(layers, int) else layers):
            return False
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, f"model.layers.{block}.{path}") is not None
    return any(path == t or path.endswith(f".{t}") for t in config.target_modules)
