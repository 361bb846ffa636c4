"""The manifest: what a model is, by content. Its fingerprint is the model's id in the swarm.

A manifest lists one sha256 per part of a checkpoint: its config, each transformer block, and each tensor
the client keeps (embeddings, final norm, LM head)::

    {
      "format": "swarm-peer.manifest", "version": 1,
      "config": "9c1e...",                          # sha256 of the canonical config (see ``config_digest``)
      "blocks": ["5d0a...", "e77f...", ...],        # block i: sha256 over its tensors (see ``block_digest``)
      "client": {"model.embed_tokens.weight": "31b2...", "model.norm.weight": "...", "lm_head.weight": "..."},
      "model_id": "1f0c5e...",                      # derived: the fingerprint's prefix (checked on load)
      "name": "SmolLM2-135M-Instruct"               # a readable name: never part of the fingerprint
    }

``fingerprint`` is the sha256 of the canonical JSON of ``format``, ``version``, ``config``, ``blocks`` and
``client``; the model id is its first ``MODEL_ID_CHARS`` hex characters. So copies of one checkpoint under any
folder names have one id, checkpoints that differ in any weight (or any config field) never share one, and a
client needs the manifest (a few KiB: 64 hex characters per block), not the blocks.

Canonical tensor hashing: a tensor's digest is the sha256 of its safetensors dtype, shape and raw bytes; a
block's digest covers the sorted (name inside the block, tensor digest) pairs. Which file a tensor lives in, and
in what order, does not matter, so re-sharding identical weights keeps the id. Tensor digests are cached on
disk per weight file, keyed by its (path, size, mtime), so only the first use of a file on a machine hashes it.

Tied embeddings: when the config ties them (``tie_word_embeddings``), the head *is* the embeddings matrix.
The family's tied copies (``lm_head.weight``) are then left out of the manifest and out of exported folders,
whether or not a checkpoint happens to store them (transformers ties them on load, so a stored copy is never
used); the config's hash says that the head is tied.

Model id length: 32 hex characters, 128 bits. An accidental collision needs about 2**64 distinct models, and
making a checkpoint whose id equals an existing model's id needs about 2**128 hashes (48 bits, the old
12 characters, is within reach of a GPU in hours). It also stays well under ``MAX_MODEL_ID_LENGTH``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic import ValidationError as PydanticValidationError

from swarm_peer.errors import ValidationError

__all__ = [
    "MANIFEST_FILE",
    "MODEL_ID_CHARS",
    "Manifest",
    "block_digest",
    "config_digest",
    "hash_safetensors",
    "split_block_name",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "swarm_manifest.json"
MANIFEST_FORMAT = "swarm-peer.manifest"
MANIFEST_VERSION = 1
MODEL_ID_CHARS = 32  # 128 bits of the fingerprint; see the module docstring
_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_HASH_CHUNK = 1 << 22
# config fields that say how or where a config was written, not what the model computes
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


class Manifest(BaseModel):
    """The content hashes of a model (see the module docstring); ``model_id`` is what the swarm keys it by.

    Build it with ``Checkpoint.manifest`` (computed from the weights, or read from ``MANIFEST_FILE`` and
    checked); ``from_json`` parses a file and raises ``ValidationError`` when it is malformed or its
    ``model_id`` does not match its contents.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal["swarm-peer.manifest"] = MANIFEST_FORMAT
    version: Literal[1] = MANIFEST_VERSION
    config: Sha256Hex = Field(description="sha256 of the canonical config")
    blocks: tuple[Sha256Hex, ...] = Field(min_length=1, description="block i -> sha256 of its tensors")
    client: dict[str, Sha256Hex] = Field(
        description="tensor name -> sha256, for each tensor outside the blocks"
    )
    name: str = Field("", max_length=64, description="readable name; not part of the fingerprint")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of everything but the name."""
        hashed = self.model_dump(include={"format", "version", "config", "blocks", "client"})
        return hashlib.sha256(_canonical(hashed)).hexdigest()

    @property
    def model_id(self) -> str:
        """The DHT-safe id of the model: the first ``MODEL_ID_CHARS`` hex characters of the fingerprint."""
        return self.fingerprint[:MODEL_ID_CHARS]

    def to_json(self) -> str:
        return json.dumps({**self.model_dump(), "model_id": self.model_id}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> Manifest:
        """Parse ``to_json`` output. Raises ``ValidationError`` if malformed or its ``model_id`` is not its own."""
        try:
            data = json.loads(text)
            manifest = cls.model_validate(data)
        except (json.JSONDecodeError, PydanticValidationError) as e:
            raise ValidationError(f"{source} is not a swarm-peer manifest: {e}") from None
        if data.get("model_id", manifest.model_id) != manifest.model_id:
            raise ValidationError(
                f"{source} says model id {data['model_id']!r}, but its hashes give {manifest.model_id!r}"
            )
        return manifest


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def config_digest(config) -> str:
    """sha256 of a transformers config as it is loaded (``to_diff_dict``, sorted), minus how it was written.

    Loading first makes the digest independent of the file's formatting and of which defaults its writer spelled
    out. Peers and clients on transformers versions whose configs load differently could disagree on it: then
    they form two swarms, never one that computes differently.
    """
    values = config.to_diff_dict()
    for key in list(values):
        if key in _VOLATILE_CONFIG_KEYS or key.startswith("_attn_implementation"):
            del values[key]
    return hashlib.sha256(_canonical(values)).hexdigest()


def split_block_name(name: str) -> tuple[int, str] | None:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``(3, "mlp.up_proj.weight")``; None for a tensor outside the blocks."""
    match = _BLOCK_NAME.fullmatch(name)
    return (int(match[1]), match[2]) if match else None


def block_digest(tensors: dict[str, str]) -> str:
    """sha256 over a block's {name inside the block: tensor digest}, in sorted order."""
    return hashlib.sha256(_canonical(tensors)).hexdigest()


def hash_safetensors(file: Path) -> dict[str, str]:
    """{tensor name: sha256 of its dtype, shape and raw bytes} for one safetensors file, read in 4 MiB chunks.

    The header is read directly (8-byte little-endian length, then JSON, as the format specifies), so that bytes
    are hashed as stored, whatever the framework. Raises ``ValidationError`` for a file that is not safetensors.
    """
    with open(file, "rb") as f:
        try:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > file.stat().st_size:
                raise ValueError(f"header length {header_size} exceeds the file")
            header = json.loads(f.read(header_size))
            header.pop("__metadata__", None)
            entries = sorted(
                (
                    int(meta["data_offsets"][0]),
                    int(meta["data_offsets"][1]),
                    name,
                    meta["dtype"],
                    meta["shape"],
                )
                for name, meta in header.items()
            )
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValidationError(f"{file} is not a safetensors file: {e}") from None
        base = 8 + header_size
        digests = {}
        for begin, end, name, dtype, shape in entries:
            digest = hashlib.sha256(_canonical([dtype, shape]))
            f.seek(base + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(left, _HASH_CHUNK))
                if not chunk:
                    raise ValidationError(f"{file} is truncated (tensor {name!r})")
                digest.update(chunk)
                left -= len(chunk)
            digests[name] = digest.hexdigest()
    return digests
