"""``swarm-peer export-client MODEL OUT/``: a folder with what a client of MODEL needs, and no block.

    swarm-peer export-client ./Llama-3-70B ./llama-client/          # once, where the checkpoint is
    model = DistributedModelForCausalLM.from_pretrained("./llama-client/", initial_peers=[maddr])

``OUT/`` gets ``swarm_manifest.json`` (the model id and the hash of every part: ``swarm_peer.manifest``),
``config.json`` (and ``generation_config.json``), the tokenizer's files, and ``model.safetensors`` with every
tensor outside the blocks: the embeddings, the final norm and the LM head (none when the config ties it to the
embeddings). A client loading it checks those files against the manifest and routes by the manifest's model id,
so it joins the swarm of every peer serving a copy of MODEL, under any folder name.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pydantic import ValidationError as PydanticValidationError

from swarm_peer.errors import ValidationError
from swarm_peer.manifest import MANIFEST_FILE, Manifest
from swarm_peer.models import Checkpoint, resolve_checkpoint

__all__ = ["CLIENT_WEIGHTS", "export_client"]

logger = logging.getLogger(__name__)

CLIENT_WEIGHTS = "model.safetensors"
# copied when MODEL has them: the config and what transformers' tokenizers and generation read
_CLIENT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def export_client(
    model: str | os.PathLike, output: str | os.PathLike, *, name: str | None = None
) -> Manifest:
    """Writes the client's files of ``model`` (a checkpoint dir or ``smollm2``) into the new folder ``output``.

    ``name`` replaces the readable name kept in the manifest (default: the checkpoint's). Returns the manifest
    written. The folder appears complete or not at all (it is written beside, then renamed), and is read back
    and checked against the manifest before this returns. Raises ``ValidationError`` if ``output`` exists and is
    not empty, ``name`` is too long, or ``model`` is not a checkpoint whose parts match its manifest.
    """
    checkpoint = resolve_checkpoint(model)
    manifest = checkpoint.manifest
    if name:
        try:
            manifest = Manifest.model_validate({**manifest.model_dump(), "name": name})
        except PydanticValidationError as e:
            raise ValidationError(f"model name {name!r}: {e.errors()[0]['msg']}") from None
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValidationError(f"{output} exists and is not an empty folder: export into a new one")
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write(checkpoint, manifest, partial)
        if output.exists():
            output.rmdir()
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    exported = Checkpoint(output).manifest  # reads every file back and checks it against the manifest
    assert exported.model_id == manifest.model_id, f"{output} exported as {exported.model_id}"
    logger.info("Exported the client of %s (%s) to %s", manifest.name, manifest.model_id, output)
    return manifest


def _write(checkpoint: Checkpoint, manifest: Manifest, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = checkpoint.load_tensors(sorted(manifest.client))
    save_file(tensors, folder / CLIENT_WEIGHTS, metadata={"format": "pt"})
    for file_name in _CLIENT_FILES:
        source = checkpoint.path / file_name
        if source.is_file():
            shutil.copyfile(source, folder / file_name)
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
