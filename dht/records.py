"""Typed swarm records (``ServerInfo``) and their compact, versioned wire form in the DHT.

A peer announces, for every block ``b`` of its span, one record under ``block_key(model_id, b)``::

    to_dht_value(info, model_id="llama-7b", block=3) == {
        "t": "swarm.server", "v": 1,            # record tag and schema version
        "m": "llama-7b", "b": 3,                # the key it belongs to (a validator checks it)
        "s": 2, "sb": 0, "eb": 8,               # state, span [start_block, end_block)
        "tp": 812.5, "rps": 3.1, "ct": 65536,   # throughput, inference rps, cache tokens left (whole span)
        "cm": 320.0, "gm": 1024.0,              # MiB free in the attention cache and the kept-graph cache
        "ad": [], "ver": "0.1.0", "dt": "float16", "pn": None, "np": {"QmNext...": 0.004},
        "ts": None, "sps": 0.0,                 # a trainable stage's optimizer steps, and samples/s it trains
    }

Compatibility rules (mixed-version swarms keep working):
- unknown wire fields are ignored, so a newer peer may add fields without bumping ``v``;
- ``v`` is bumped only for an incompatible change; records of a newer version are skipped by lookups
  (``from_dht_value`` raises) but still stored and relayed by this version's validator;
- a short wire name is never reused for another meaning.

Values stay small: hivemind's DHT process dies on requests over ~16 KiB, and a request over the pipe to the
DHT process is only safe from interleaving (several threads using one DHT) below the atomic pipe write size,
4 KiB. ``to_dht_value`` refuses records over ``MAX_VALUE_BYTES`` serialized; the largest record makes a
~3.5 KiB ``declare_span`` request (~23 next_pings with every other field at its maximum length).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from hivemind.utils import MSGPackSerializer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from swarm_peer.dht.keys import validate_model_id
from swarm_peer.errors import ValidationError

__all__ = [
    "MAX_ANNOUNCE_PERIOD",
    "MAX_BLOCKS",
    "MAX_CACHE_MB",
    "MAX_CACHE_TOKENS",
    "MAX_CLOCK_SKEW",
    "MAX_PING_SECONDS",
    "MAX_RATE",
    "MAX_RECORD_TTL",
    "MAX_VALUE_BYTES",
    "PRINTABLE",
    "RECORD_TAG",
    "SCHEMA_VERSION",
    "ServerInfo",
    "ServerState",
    "from_dht_value",
    "is_swarm_record",
    "record_key",
    "record_version",
    "to_dht_value",
]

RECORD_TAG = "swarm.server"
SCHEMA_VERSION = 1
MAX_VALUE_BYTES = 2048  # msgpack-serialized record, before hivemind appends the ~350-byte signature

# Bounds on what a record may say. Every reader (routing, balancing, ``swarm-peer status``) takes records at
# their word, so a record outside them is refused by every node (``SwarmRecordValidator``), not just ignored.
# blocks per model and block indices, [0, MAX_BLOCKS): the deepest open models have ~130 (Llama 3.1 405B: 126);
# a status page looks up every block of a model in one request, which takes ~1 s for 256 blocks on loopback
MAX_BLOCKS = 256
MAX_RATE = 1e7  # tokens/s or steps/s of any rate field; a tiny model's block on a fast GPU does ~1e6
MAX_CACHE_TOKENS = 1 << 30  # free attention-cache tokens; a 1 TiB cache of a 576-wide float16 model is ~5e8
MAX_CACHE_MB = float(1 << 30)  # free MiB of a cache (1 PiB)
MAX_PING_SECONDS = 600.0  # a next-peer round trip; anything slower is as good as unreachable
# Peers announce every ``announce_period`` seconds (30 by default, at most MAX_ANNOUNCE_PERIOD) and their
# records live twice that, so the record of a dead peer lapses within two periods. A node refuses a record
# that expires more than MAX_RECORD_TTL after its own clock's now: the longest lifetime an honest peer gives,
# plus MAX_CLOCK_SKEW for nodes whose clocks run behind the writer's.
MAX_ANNOUNCE_PERIOD = 300.0
MAX_CLOCK_SKEW = 60.0
MAX_RECORD_TTL = 2 * MAX_ANNOUNCE_PERIOD + MAX_CLOCK_SKEW

# field name -> wire name. Never reuse a wire name for another meaning.
_WIRE_NAMES = {
    "state": "s",
    "start_block": "sb",
    "end_block": "eb",
    "throughput": "tp",
    "inference_rps": "rps",
    "cache_tokens_left": "ct",
    "adapters": "ad",
    "version": "ver",
    "dtype": "dt",
    "public_name": "pn",
    "next_pings": "np",
    "network_tps": "nt",
    "cache_mb_left": "cm",
    "graph_cache_mb_left": "gm",
    "training_step": "ts",
    "samples_per_second": "sps",
}
_ENVELOPE = ("t", "v", "m", "b")  # tag, schema version, model id, block index
assert not set(_ENVELOPE) & set(_WIRE_NAMES.values()), "wire names must not collide with the envelope"

_Rate = Annotated[float, Field(ge=0.0, le=MAX_RATE, allow_inf_nan=False, strict=True)]
_MiB = Annotated[float, Field(ge=0.0, le=MAX_CACHE_MB, allow_inf_nan=False, strict=True)]
_Seconds = Annotated[float, Field(ge=0.0, le=MAX_PING_SECONDS, allow_inf_nan=False, strict=True)]
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"  # shown on status pages: no control characters (terminal escapes)
_ShortStr = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=64, pattern=PRINTABLE)]


class ServerState(enum.IntEnum):
    """Lifecycle of a peer's span: announced while loading (JOINING), serving (ONLINE), leaving (OFFLINE)."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class ServerInfo(BaseModel):
    """What a peer announces about the span of blocks it hosts. Immutable; use ``model_copy(update=...)``.

    Raises pydantic's ``ValidationError`` on construction with bad fields (``from_dht_value`` turns that into
    ``swarm_peer.errors.ValidationError``). Unknown fields are ignored.

    Example: ``ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=4, throughput=812.5)``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    state: ServerState = Field(
        description="lifecycle state of the span; lookups keep ONLINE peers for routing"
    )
    start_block: int = Field(ge=0, lt=MAX_BLOCKS, strict=True, description="first hosted block (inclusive)")
    end_block: int = Field(gt=0, le=MAX_BLOCKS, strict=True, description="end of the hosted span (exclusive)")
    throughput: _Rate = Field(0.0, description="tokens/s the span can process; 0 = unknown")
    inference_rps: _Rate = Field(0.0, description="inference steps/s the span can serve; 0 = unknown")
    network_tps: _Rate = Field(
        0.0, description="tokens/s the peer's link carries (hidden states in and out); 0 = unknown"
    )
    cache_tokens_left: int = Field(
        0, ge=0, le=MAX_CACHE_TOKENS, strict=True, description="free attention-cache capacity, in tokens"
    )
    cache_mb_left: _MiB = Field(0.0, description="free attention (KV) cache, in MiB")
    graph_cache_mb_left: _MiB = Field(0.0, description="free memory for kept training graphs, in MiB")
    adapters: tuple[_ShortStr, ...] = Field(
        (), max_length=16, description="names of the loaded LoRA adapters"
    )
    version: str = Field(
        "0",
        strict=True,
        min_length=1,
        max_length=32,
        pattern=PRINTABLE,
        description="swarm-peer package version of the peer",
    )
    dtype: str = Field(
        "float32",
        strict=True,
        min_length=1,
        max_length=16,
        pattern=PRINTABLE,
        description="torch dtype of the hosted weights",
    )
    public_name: str | None = Field(
        None, strict=True, max_length=64, pattern=PRINTABLE, description="name shown on status pages"
    )
    training_step: int | None = Field(
        None,
        ge=0,
        lt=2**53,
        strict=True,
        description="optimizer steps the span's weights have taken, for a trainable stage of a SWARM run; None: "
        "served weights that never change",
    )
    samples_per_second: _Rate = Field(
        0.0, description="samples/s of training backward calls the stage processed lately; 0 = none"
    )
    next_pings: dict[_ShortStr, _Seconds] = Field(
        default_factory=dict, max_length=64, description="peer id (base58) -> round-trip time in seconds"
    )

    @field_validator("state", mode="before")
    @classmethod
    def _exact_state(cls, value: Any) -> ServerState:
        # accept the enum or a plain int from the wire, but not bool/str/float look-alikes
        if isinstance(value, ServerState):
            return value
        if type(value) is not int:
            raise ValueError(f"state must be an int, got {type(value).__name__}")
        return ServerState(value)  # ValueError for unknown states

    @model_validator(mode="after")
    def _span_not_empty(self) -> ServerInfo:
        if self.start_block >= self.end_block:
            raise ValueError(
                f"span must have start_block < end_block, got [{self.start_block}, {self.end_block})"
            )
        return self


def to_dht_value(info: ServerInfo, *, model_id: str, block: int) -> dict[str, Any]:
    """The compact wire form of ``info`` for the key ``block_key(model_id, block)`` (see the module docstring).

    Raises ``ValidationError`` if ``block`` is outside the span of ``info``, the record serializes to more
    than ``MAX_VALUE_BYTES`` (trim ``next_pings`` or ``adapters``), or ``info`` is invalid (a
    ``model_copy(update=...)`` is not validated by pydantic, so this checks it again).
    """
    validate_model_id(model_id)
    if type(block) is not int or not info.start_block <= block < info.end_block:
        raise ValidationError(f"block {block!r} is outside the span [{info.start_block}, {info.end_block})")
    fields = info.model_dump()
    fields["state"] = int(info.state)  # hivemind's msgpack uses strict types: no IntEnum
    fields["adapters"] = list(info.adapters)
    value = {"t": RECORD_TAG, "v": SCHEMA_VERSION, "m": model_id, "b": block}
    value.update((_WIRE_NAMES[name], field) for name, field in fields.items())
    size = len(MSGPackSerializer.dumps(value))
    if size > MAX_VALUE_BYTES:
        raise ValidationError(f"record is {size} bytes serialized, over the cap of {MAX_VALUE_BYTES} bytes")
    from_dht_value(value)  # refuse what readers would refuse (model_copy(update=...) skips validation)
    return value


def is_swarm_record(value: Any) -> bool:
    """Whether a DHT value claims to be a swarm record (has our tag); other hivemind values share the DHT."""
    return isinstance(value, dict) and value.get("t") == RECORD_TAG


def record_version(value: Any, tag: str, kind: str) -> int:
    """The schema version of a DHT value that carries the record tag ``tag``, of any version.

    Every kind of swarm record (``kind``: "swarm", "model", "run", for messages) starts with this envelope.
    Raises ``ValidationError`` if ``value`` lacks the tag or its version is not a positive int.
    """
    if not (isinstance(value, dict) and value.get("t") == tag):
        raise ValidationError(f"not a {kind} record (no {tag!r} tag)")
    version = value.get("v")
    if type(version) is not int or version < 1:
        raise ValidationError(f"schema version must be a positive int, got {version!r}")
    return version


def record_key(value: Any) -> tuple[str, int]:
    """The (model id, block index) a tagged record of any schema version says it belongs to.

    Raises ``ValidationError`` if ``value`` is not a swarm record or its envelope is malformed.
    """
    record_version(value, RECORD_TAG, "swarm")
    model_id, block = value.get("m"), value.get("b")
    validate_model_id(model_id)
    if type(block) is not int or not 0 <= block < MAX_BLOCKS:
        raise ValidationError(f"block index must be an int in [0, {MAX_BLOCKS}), got {block!r}")
    return model_id, block


def from_dht_value(value: Any, *, model_id: str | None = None, block: int | None = None) -> ServerInfo:
    """Parse a wire record made by ``to_dht_value``; unknown fields are ignored.

    If ``model_id``/``block`` are given, the record must say it belongs to that key. Raises
    ``ValidationError`` if the value is not a swarm record, has another schema version, is for another
    key, has malformed fields, or its span does not contain its own block.
    """
    record_model_id, record_block = record_key(value)
    if value["v"] != SCHEMA_VERSION:
        raise ValidationError(f"unsupported schema version {value['v']} (this peer reads {SCHEMA_VERSION})")
    if (model_id is not None and record_model_id != model_id) or (
        block is not None and record_block != block
    ):
        raise ValidationError(
            f"record for {record_model_id}.{record_block} found under the key of {model_id}.{block}"
        )
    fields = {name: value[wire] for name, wire in _WIRE_NAMES.items() if wire in value}
    try:
        info = ServerInfo.model_validate(fields)
    except PydanticValidationError as e:
        raise ValidationError(f"malformed record for {record_model_id}.{record_block}: {e}") from e
    if not info.start_block <= record_block < info.end_block:
        raise ValidationError(
            f"record for block {record_block} announces the span [{info.start_block}, {info.end_block})"
        )
    return info
