"""A model is known by its content: copies under any folder name form one swarm, an exported client folder joins
it, a checkpoint that differs in one weight never mixes in, and a bad client folder gets a clear error.

The swarm here (real peers on 127.0.0.1) serves the tiny Llama from two differently named copies, blocks 0:2
from the original folder and 2:4 from a renamed one, next to a peer serving all of a copy with one changed weight
in block 1 under a folder of the same name and the same ``--model-name``.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.export import CLIENT_WEIGHTS, export_client
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.cli.status import run_status
from swarm_peer.dht import (
    ModelInfo,
    list_model_infos,
    model_from_dht_value,
    model_to_dht_value,
    online_servers,
    validate_model_id,
)
from swarm_peer.errors import ValidationError
from swarm_peer.manifest import MANIFEST_FILE, MODEL_ID_CHARS, Manifest
from swarm_peer.models import Checkpoint, cache_dir, read_json
from swarm_peer.peer.blocks import BlockSpan
from swarm_peer.settings import NetworkSettings

from .conftest import TINY_CONFIGS, client_settings, reference_model, run_cli

CHANGED = "model.layers.1.mlp.down_proj.weight"  # the one weight the changed copy differs in
NAME = "tiny-llama"  # every peer's --model-name, the changed copy's included


@pytest.fixture(scope="module")
def copies(tiny_checkpoints, tmp_path_factory) -> dict[str, str]:
    """The tiny Llama, and copies of it: renamed, re-sharded, one weight changed, exported for a client."""
    original = Path(tiny_checkpoints["llama"])
    root = tmp_path_factory.mktemp("copies")
    renamed = shutil.copytree(original, root / "a-renamed-copy")
    resharded = root / "resharded"
    reference_model(str(original)).save_pretrained(resharded, max_shard_size="40KB")
    changed = shutil.copytree(original, root / "elsewhere" / original.name)  # same folder name, other weights
    tensors = load_file(changed / "model.safetensors")
    tensors[CHANGED][0, 0] += 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    exported = root / "client-only"
    result = run_cli("export-client", str(original), str(exported), "--model-name", NAME)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = dict(original=original, renamed=renamed, resharded=resharded, changed=changed, exported=exported)
    return {key: str(path) for key, path in paths.items()}


def _manifest(path: str) -> Manifest:
    return Checkpoint(Path(path)).manifest


@pytest.mark.timeout(60)
def test_renamed_and_resharded_copies_have_the_same_id(copies):
    ids = {key: Checkpoint(Path(copies[key])).model_id for key in ("original", "renamed", "resharded")}
    assert len(set(ids.values())) == 1, ids
    (model_id,) = set(ids.values())
    assert validate_model_id(model_id) == model_id and len(model_id) == MODEL_ID_CHARS
    assert len(list(Path(copies["resharded"]).glob("*.safetensors"))) > 1  # really re-sharded
    manifests = [_manifest(copies[key]) for key in ("original", "renamed", "resharded")]
    assert manifests[1].name == "a-renamed-copy"  # the readable name follows the folder; the id does not
    assert {m.model_dump_json(exclude={"name"}) for m in manifests} == {
        manifests[0].model_dump_json(exclude={"name"})
    }
    assert len(manifests[0].blocks) == 4 and set(manifests[0].client) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    # the tensor hashes are remembered per weight file, so the next join does not hash again
    memo = read_json(cache_dir() / "tensor-hashes.json")
    assert str((Path(copies["original"]) / "model.safetensors").resolve()) in memo


@pytest.mark.timeout(60)
def test_one_changed_weight_changes_the_id_and_only_its_block_entry(copies):
    original, changed = _manifest(copies["original"]), _manifest(copies["changed"])
    assert original.name == changed.name  # same folder name ...
    assert original.model_id != changed.model_id  # ... other model
    assert original.config == changed.config and original.client == changed.client
    assert [i for i in range(4) if original.blocks[i] != changed.blocks[i]] == [1]


@pytest.mark.timeout(60)
def test_a_tied_head_is_the_embeddings(tmp_path):
    """With tied embeddings the manifest and the export hold no head, whether or not a checkpoint stores one."""
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    stored_head = shutil.copytree(tmp_path / "tied", tmp_path / "tied-with-head")
    tensors = load_file(stored_head / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, stored_head / "model.safetensors", metadata={"format": "pt"})

    manifest = _manifest(str(tmp_path / "tied"))
    assert set(manifest.client) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert _manifest(str(stored_head)).model_id == manifest.model_id
    export_client(stored_head, tmp_path / "client")
    assert "lm_head.weight" not in load_file(tmp_path / "client" / CLIENT_WEIGHTS)
    assert _manifest(str(tmp_path / "client")).model_id == manifest.model_id


@pytest.mark.timeout(60)
def test_a_folder_with_some_blocks_and_the_manifest_checks_the_blocks_it_holds(copies, tmp_path):
    """A peer may hold only its span (plus the manifest): the blocks it holds must be the manifest's."""
    tensors = load_file(Path(copies["original"]) / "model.safetensors")
    some = {name: t for name, t in tensors.items() if name.startswith(("model.layers.2.", "model.layers.3."))}
    for name, spoil in (("partial", False), ("partial-changed", True)):
        folder = tmp_path / name
        folder.mkdir()
        for file_name in ("config.json", MANIFEST_FILE):
            shutil.copyfile(Path(copies["exported"]) / file_name, folder / file_name)
        if spoil:
            some = {
                **some,
                "model.layers.3.mlp.up_proj.weight": some["model.layers.3.mlp.up_proj.weight"] + 1,
            }
        save_file(some, folder / "blocks.safetensors", metadata={"format": "pt"})
        if not spoil:
            assert Checkpoint(folder).model_id == Checkpoint(Path(copies["original"])).model_id
            assert len(BlockSpan(Checkpoint(folder), 2, 4).layers) == 2
        else:
            with pytest.raises(ValidationError, match="blocks 3:4 .* do not match"):
                _ = Checkpoint(folder).model_id


@pytest.mark.timeout(10)
def test_the_model_record_carries_a_readable_name_that_old_records_lack():
    info = ModelInfo(model_id="1f0c5e9ad2b74c3e", num_blocks=4, name="Llama 7B")
    wire = model_to_dht_value(info)
    assert wire["n"] == "Llama 7B" and model_from_dht_value(wire) == info
    old = {key: value for key, value in wire.items() if key != "n"}  # a peer of the previous release
    assert model_from_dht_value(old).name == ""
    with pytest.raises(ValidationError, match="printable"):
        model_from_dht_value({**wire, "n": "evil\x1b[2J"})


def _rewrite_manifest(folder: Path, **changes) -> None:
    manifest = Manifest.model_validate({**_manifest(str(folder)).model_dump(), **changes})
    (folder / MANIFEST_FILE).write_text(manifest.to_json())


def _edit_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))


def _edit_embeddings(folder: Path) -> None:
    tensors = load_file(folder / CLIENT_WEIGHTS)
    tensors["model.embed_tokens.weight"][3, 3] += 1.0
    save_file(tensors, folder / CLIENT_WEIGHTS, metadata={"format": "pt"})


def _edit_model_id(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["model_id"] = "0" * MODEL_ID_CHARS
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: _rewrite_manifest(f, blocks=_manifest(str(f)).blocks[:3]), "lists 3 blocks"),
        (_edit_config, "does not match"),
        (_edit_embeddings, "model.embed_tokens.weight"),
        (_edit_model_id, "but its hashes give"),
        (lambda f: (f / CLIENT_WEIGHTS).unlink(), "has no *.safetensors"),
        (lambda f: (f / MANIFEST_FILE).unlink(), "lacks the weights of blocks 0:4"),
        (lambda f: (f / MANIFEST_FILE).write_text("{"), "not a swarm-peer manifest"),
        (lambda f: (f / CLIENT_WEIGHTS).write_bytes(b"\xff" * 64), "not a safetensors file"),
    ],
    ids=[
        "blocks",
        "config",
        "embeddings",
        "model-id",
        "no-weights",
        "no-manifest",
        "bad-json",
        "bad-weights",
    ],
)
def test_a_spoiled_client_folder_gets_a_clear_error(copies, tmp_path, spoil, message):
    folder = shutil.copytree(copies["exported"], tmp_path / "client")
    spoil(folder)
    with pytest.raises(ValidationError, match=message.replace("*", r"\*")):
        _ = Checkpoint(folder).model_id


@pytest.mark.timeout(60)
def test_export_needs_a_new_folder(copies, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValidationError, match="not an empty folder"):
        export_client(copies["original"], tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- a real swarm of copies


@pytest.fixture(scope="module")
def swarm(copies):
    peer_args = ["--model-name", NAME, "--throughput", "100", "--rebalance-period", "0"]
    with LocalSwarm(copies["original"], [(0, 2)], peer_args=peer_args) as swarm:
        swarm.add_peer(2, 4, model=copies["renamed"], wait=False)
        swarm.add_peer(0, 4, model=copies["changed"], wait=False)
        for peer in swarm.peers[1:]:
            peer.wait_ready(swarm.start_timeout)
        yield swarm


def _prompt() -> torch.Tensor:
    return torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(2))


def _client(swarm: LocalSwarm, path: str) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        path, settings=client_settings(swarm, route_timeout=10)
    )


def _route_peers(model: DistributedModelForCausalLM) -> set[str]:
    return {hop.peer_id.to_base58() for hop in model.router.inference_route()}


@pytest.mark.timeout(300)
def test_renamed_copies_form_one_swarm(swarm, copies):
    original, renamed, changed = swarm.peers
    model = _client(swarm, copies["renamed"])
    try:
        assert _route_peers(model) == {original.peer_id, renamed.peer_id}
        want = reference_model(copies["original"]).generate(_prompt(), max_new_tokens=10, do_sample=False)
        got = model.generate(_prompt(), max_new_tokens=10, do_sample=False)
        assert torch.equal(got, want), f"swarm {got.tolist()} != local {want.tolist()}"

        # the swarm lists two models under one readable name, and status shows it
        infos = list_model_infos(model.swarm.dht, timeout=10)
        changed_id = Checkpoint(Path(copies["changed"])).model_id
        assert {m: (i.num_blocks, i.name) for m, i in infos.items()} == {
            model.model_id: (4, NAME),
            changed_id: (4, NAME),
        }
        out = io.StringIO()
        network = NetworkSettings(initial_peers=tuple(swarm.initial_peers), client_mode=True)
        assert run_status(None, network, timeout=10, console=Console(file=out, width=200)) == 0
        rows = [line for line in out.getvalue().splitlines() if model.model_id in line]
        assert len(rows) == 1 and NAME in rows[0] and "covered" in rows[0], out.getvalue()
    finally:
        model.shutdown()


@pytest.mark.timeout(300)
def test_a_client_with_only_the_exported_folder_generates_like_local(swarm, copies):
    assert not any(Path(copies["exported"]).glob("*.safetensors.index.json"))
    assert all(
        not name.startswith("model.layers.") for name in load_file(Path(copies["exported"]) / CLIENT_WEIGHTS)
    )
    ref = reference_model(copies["original"])
    model = _client(swarm, copies["exported"])
    try:
        assert model.model_id == Checkpoint(Path(copies["original"])).model_id
        with torch.no_grad():
            torch.testing.assert_close(model(_prompt()).logits, ref(_prompt()).logits, atol=1e-3, rtol=0)
        kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)
        torch.manual_seed(5)
        want = ref.generate(_prompt(), **kwargs)
        torch.manual_seed(5)
        got = model.generate(_prompt(), **kwargs)
        assert torch.equal(got, want), f"swarm {got.tolist()} != local {want.tolist()}"
    finally:
        model.shutdown()


@pytest.mark.timeout(300)
def test_a_copy_with_one_changed_weight_is_never_mixed_in(swarm, copies):
    original, renamed, changed = swarm.peers
    ref, ref_changed = reference_model(copies["original"]), reference_model(copies["changed"])
    with torch.no_grad():
        want, want_changed = ref(_prompt()).logits, ref_changed(_prompt()).logits
    assert (want - want_changed).abs().max() > 1e-2  # control: serving the changed block would show

    model = _client(swarm, copies["original"])
    try:
        servers = online_servers(model.swarm.dht, model.model_id, range(4))
        assert {p.to_base58() for block in servers for p in block} == {original.peer_id, renamed.peer_id}
        for _ in range(3):  # one peer covering every block would be the fastest route, if it were eligible
            assert changed.peer_id not in _route_peers(model)
        with torch.no_grad():
            torch.testing.assert_close(model(_prompt()).logits, want, atol=1e-3, rtol=0)
    finally:
        model.shutdown()

    # control: the changed copy's own client does reach that peer, and gets the changed model's outputs
    other = _client(swarm, copies["changed"])
    try:
        assert _route_peers(other) == {changed.peer_id}
        with torch.no_grad():
            torch.testing.assert_close(other(_prompt()).logits, want_changed, atol=1e-3, rtol=0)
    finally:
        other.shutdown()
