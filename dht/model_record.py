"""The model record (``ModelInfo``): which models the swarm serves, so that a status page can find them.

Block records live under keys that already name the model (``"{model_id}.{block}"``), so nobody can list
the models without knowing them. Each hosting peer therefore also stores one small record per model it
serves under the one well-known key ``MODELS_KEY``, in a subkey it owns (a ``listing``): the model id, then
the peer's own subkey of its block records (``keys.peer_subkey``), so nobody else can overwrite or erase it,
and one peer may list several models::

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

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from swarm_peer.dht.keys import validate_model_id
from swarm_peer.dht.listing import Listing
from swarm_peer.dht.records import MAX_BLOCKS
from swarm_peer.errors import ValidationError

__all__ = [
    "MODELS",
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


# the models key, its subkeys and the envelope of its records: kind, key, tag, version, name field, name check
MODELS = Listing("model", MODELS_KEY, MODEL_RECORD_TAG, MODEL_SCHEMA_VERSION, "m", validate_model_id)
models_key_id = MODELS.key_id
model_subkey = MODELS.subkey  # model_subkey(model_id, peer_subkey) -> b"{model_id}@{peer_subkey}"
parse_model_subkey = MODELS.parse_subkey  # -> (model id, peer id, RSA public key of the owner)
is_model_record = MODELS.is_record
model_record_version = MODELS.record_version  # the version of a record of any version; checks the envelope


def model_to_dht_value(info: ModelInfo) -> dict[str, Any]:
    """The compact wire form of ``info`` (see the module docstring)."""
    value = {"t": MODEL_RECORD_TAG, "v": MODEL_SCHEMA_VERSION, "m": info.model_id, "nb": info.num_blocks}
    if info.name:
        value["n"] = info.name
    return value


def model_from_dht_value(value: Any) -> ModelInfo:
    """Parse a wire record made by ``model_to_dht_value``; unknown fields are ignored.

    Raises ``ValidationError`` if the value is not a model record, has another schema version, or has
    malformed fields.
    """
    MODELS.check_version(value)
    try:
        return ModelInfo(model_id=value["m"], num_blocks=value.get("nb"), name=value.get("n", ""))
    except PydanticValidationError as e:
        raise ValidationError(f"malformed model record for {value['m']}: {e}") from e
