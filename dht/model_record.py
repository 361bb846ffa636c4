"""The model record (``ModelInfo``): which models the swarm serves, so that a status page can find them.

Block records live under keys that already name the model (``"{model_id}.{block}"``), so nobody can list
the models without knowing them. Each hosting peer therefore also stores one small record per model it
serves under the one well-known key ``MODELS_KEY``, in a subkey it owns: the model id, then the peer's own
subkey of its block records (``keys.peer_subkey``), so nobody else can overwrite or erase it, and one peer
may list several models::

    key    = "swarm.models"
    subkey = b"llama-7b@QmPeerIdBase58...[owner:ssh-rsa AAAA...]"          model_subkey("llama-7b", ...)
    value  = model_to_dht_value(ModelInfo(model_id="llama-7b", num_blocks=32, name="Llama 7B")) == {
        "t": "swarm.model", "v": 1,     # record tag and schema version
        "m": "llama-7b", "nb": 32,      # model id (the validator checks it matches the subkey), blocks
        "n": "Llama 7B",                # readable name the peer gives the model (left out when empty)
    }

The model id is a fingerprint of the model's content (``swarm_peer.manifest``), so the record also carries a
readable name for listings. Peers choose it (``join --model-name``, default their folder's name), so peers of one
model may give different names; the name never identifies the model. Records without ``"n"`` (older peers) read
as an empty name.

The compatibility rules of ``records`` hold here too: unknown wire fields are ignored, ``v`` is bumped only
for an incompatible change, records of a newer version are skipped by ``list_models`` but still relayed.
"""

from __future__ import annotations

from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from swarm_peer.dht.keys import parse_peer_subkey, validate_model_id
from swarm_peer.dht.records import MAX_BLOCKS
from swarm_peer.errors import ValidationError

__all__ = [
    "MODELS_KEY",
    "MODEL_RECORD_TAG",
    "MODEL_SCHEMA_VERSION",
    "ModelInfo",
    "is_model_record",
    "model_from_dht_value",
    "model_record_version",
    "model_to_dht_value",
    "model_subkey",
    "models_key_id",
    "parse_model_subkey",
]

MODELS_KEY = "swarm.models"  # never a block key: those end in ".{int}"
MODEL_RECORD_TAG = "swarm.model"
MODEL_SCHEMA_VERSION = 1
MAX_NAME_LENGTH = 64


class ModelInfo(BaseModel):
    """A model some peer serves: its id (as in block keys), how many blocks a full chain needs, a readable name.

    Raises pydantic's ``ValidationError`` on construction with bad fields (``model_from_dht_value`` turns
    that into ``swarm_peer.errors.ValidationError``). Unknown fields are ignored.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_id: str = Field(description="the model id of the block keys, see keys.validate_model_id")
    num_blocks: int = Field(ge=1, le=MAX_BLOCKS, strict=True, description="transformer blocks of the model")
    name: str = Field("", max_length=MAX_NAME_LENGTH, description="readable name for listings, never a key")

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("the model name must be printable text")
        return value

    @field_validator("model_id")
    @classmethod
    def _valid_model_id(cls, value: Any) -> str:
        try:
            return validate_model_id(value)
        except ValidationError as e:
            raise ValueError(str(e)) from e  # pydantic reports ValueError, not our error type


def models_key_id() -> bytes:
    """The hashed form of ``MODELS_KEY`` that DHT nodes (and record validators) see as ``DHTRecord.key``."""
    return DHTID.generate(source=MODELS_KEY).to_bytes()


def model_subkey(model_id: str, peer_subkey: bytes) -> bytes:
    """The subkey a peer lists ``model_id`` under: ``b"{model_id}@"`` + its ``keys.peer_subkey``."""
    subkey = validate_model_id(model_id).encode() + b"@" + peer_subkey
    parse_model_subkey(subkey)  # a malformed peer subkey would make an unprotected (overwritable) record
    return subkey


def parse_model_subkey(subkey: object) -> tuple[str, PeerID, bytes]:
    """Split a subkey made by ``model_subkey`` into (model id, peer id, serialized RSA public key of the owner).

    Raises ``ValidationError`` if ``subkey`` is not bytes of exactly that form.
    """
    if not isinstance(subkey, bytes) or b"@" not in subkey:
        raise ValidationError(f"subkey is not '<model id>@<peer id>[owner:<rsa key>]': {subkey!r:.80}")
    model_id, peer_subkey = subkey.split(b"@", 1)
    peer_id, public_key = parse_peer_subkey(peer_subkey)
    return validate_model_id(model_id.decode("ascii", errors="replace")), peer_id, public_key


def model_to_dht_value(info: ModelInfo) -> dict[str, Any]:
    """The compact wire form of ``info`` (see the module docstring)."""
    value = {"t": MODEL_RECORD_TAG, "v": MODEL_SCHEMA_VERSION, "m": info.model_id, "nb": info.num_blocks}
    if info.name:
        value["n"] = info.name
    return value


def is_model_record(value: Any) -> bool:
    """Whether a DHT value claims to be a model record (has its tag)."""
    return isinstance(value, dict) and value.get("t") == MODEL_RECORD_TAG


def model_record_version(value: Any) -> int:
    """The schema version of a tagged model record of any version, after checking its envelope.

    Raises ``ValidationError`` if ``value`` is not a model record, or its version or model id is malformed.
    """
    if not is_model_record(value):
        raise ValidationError(f"not a model record (no {MODEL_RECORD_TAG!r} tag)")
    version = value.get("v")
    if type(version) is not int or version < 1:
        raise ValidationError(f"schema version must be a positive int, got {version!r}")
    validate_model_id(value.get("m"))
    return version


def model_from_dht_value(value: Any) -> ModelInfo:
    """Parse a wire record made by ``model_to_dht_value``; unknown fields are ignored.

    Raises ``ValidationError`` if the value is not a model record, has another schema version, or has
    malformed fields.
    """
    version = model_record_version(value)
    if version != MODEL_SCHEMA_VERSION:
        raise ValidationError(
            f"unsupported model record version {version} (this peer reads {MODEL_SCHEMA_VERSION})"
        )
    try:
        return ModelInfo(model_id=value["m"], num_blocks=value.get("nb"), name=value.get("n", ""))
    except PydanticValidationError as e:
        raise ValidationError(f"malformed model record for {value['m']}: {e}") from e
