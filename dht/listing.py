"""Listings: well-known DHT keys under which every peer lists records by name, each in a subkey it owns.

Block records live under keys that already name their model, so nothing could be found without knowing it.
A listing is one fixed key that every peer writes into, one subkey per name it lists: the models it serves
(``model_record.MODELS``), the training runs it takes part in (``run_record.RUNS``), the peers it bans from a run
(``ban_record.BANS``)::

    key    = "swarm.models"                                             MODELS.key, hashed: MODELS.key_id()
    subkey = b"llama-7b@QmPeerIdBase58...[owner:ssh-rsa AAAA...]"        MODELS.subkey("llama-7b", peer_subkey)
    value  = {"t": "swarm.model", "v": 1, "m": "llama-7b", ...}         tag, schema version, the name again

The subkey ends in the peer's own subkey (``keys.peer_subkey``), so hivemind's ``RSASignatureValidator`` lets
nobody else overwrite or erase the record, and one peer may list several names. ``SwarmRecordValidator``
checks that the name in the record is the one in its subkey, and that the listing's key holds nothing else.

A listing given a ``schema`` (a pydantic model) and its ``wire_names`` also encodes and decodes its records
(``to_dht_value``, ``from_dht_value``): the envelope, then one short wire name per field. The name is made of the
schema's ``name_fields`` joined by ``/`` (a run: its id; a ban: the run id and the banned peer's id).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from swarm_peer.dht.keys import parse_peer_subkey
from swarm_peer.dht.records import MAX_VALUE_BYTES, record_version
from swarm_peer.errors import ValidationError

__all__ = ["Listing"]

Record = TypeVar("Record", bound=BaseModel)
_ENVELOPE = ("t", "v")  # tag, schema version; then the name field


@dataclass(frozen=True)
class Listing(Generic[Record]):
    """One kind of listed record: its key, the envelope of its records, and the form of its subkeys.

    ``validate_name`` returns a name unchanged or raises ``ValidationError``; names never contain ``@``.
    ``schema``, ``name_fields`` and ``wire_names`` (field name -> wire name; never reuse a wire name for another
    meaning) make ``to_dht_value`` and ``from_dht_value``; without them, the listing's module has its own codec.
    """

    kind: str  # "model", "run", "ban": for messages
    key: str
    tag: str  # the record tag, wire field "t"
    version: int  # the schema version this peer reads and writes, wire field "v"
    name_field: str  # the wire field that repeats the name of the subkey
    validate_name: Callable[[str], str]
    schema: type[Record] | None = None
    name_fields: tuple[str, ...] = ()  # the schema's fields that make the name, joined by "/"
    wire_names: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        envelope = {*_ENVELOPE, self.name_field}
        assert not envelope & set(self.wire_names.values()), "wire names must not collide with the envelope"
        assert not set(self.name_fields) & self.wire_names.keys(), "the name's fields travel in the name"

    def key_id(self) -> bytes:
        """The hashed form of ``key`` that DHT nodes (and record validators) see as ``DHTRecord.key``."""
        return DHTID.generate(source=self.key).to_bytes()

    def subkey(self, name: str, peer_subkey: bytes) -> bytes:
        """The subkey a peer lists ``name`` under: ``b"{name}@"`` + its ``keys.peer_subkey``."""
        subkey = self.validate_name(name).encode() + b"@" + peer_subkey
        self.parse_subkey(subkey)  # a malformed peer subkey would make an unprotected (overwritable) record
        return subkey

    def parse_subkey(self, subkey: object) -> tuple[str, PeerID, bytes]:
        """Split a subkey made by ``subkey`` into (name, peer id, serialized RSA public key of the owner).

        Raises ``ValidationError`` if ``subkey`` is not bytes of exactly that form, with a valid name.
        """
        if not isinstance(subkey, bytes) or b"@" not in subkey:
            raise ValidationError(f"subkey is not '<{self.kind}>@<peer id>[owner:<rsa key>]': {subkey!r:.80}")
        name, peer_subkey = subkey.split(b"@", 1)
        peer_id, public_key = parse_peer_subkey(peer_subkey)
        return self.validate_name(name.decode("ascii", errors="replace")), peer_id, public_key

    def is_record(self, value: Any) -> bool:
        """Whether a DHT value claims to be a record of this listing (has its tag)."""
        return isinstance(value, dict) and value.get("t") == self.tag

    def record_version(self, value: Any) -> int:
        """The schema version of a tagged record of any version, after checking its envelope.

        Raises ``ValidationError`` if ``value`` is not a record of this listing, or its version or name is
        malformed.
        """
        version = record_version(value, self.tag, self.kind)
        self.validate_name(value.get(self.name_field))
        return version

    def check_version(self, value: Any) -> None:
        """Raise ``ValidationError`` unless ``value`` is a record of this listing, of the version this peer reads."""
        version = self.record_version(value)
        if version != self.version:
            raise ValidationError(
                f"unsupported {self.kind} record version {version} (this peer reads {self.version})"
            )

    def to_dht_value(self, info: Record) -> dict[str, Any]:
        """The compact wire form of ``info``: the envelope (tag, version, name), then its fields by wire name.

        Raises ``ValidationError`` if ``info`` is invalid (a ``model_copy(update=...)`` is not validated by
        pydantic, so this checks it again) or serializes to more than ``MAX_VALUE_BYTES``.
        """
        assert self.schema is not None, f"{self.kind} records have a codec of their own"
        name = "/".join(str(getattr(info, attr)) for attr in self.name_fields)
        value = {"t": self.tag, "v": self.version, self.name_field: name}
        value.update((wire, getattr(info, attr)) for attr, wire in self.wire_names.items())
        size = len(MSGPackSerializer.dumps(value))
        if size > MAX_VALUE_BYTES:
            raise ValidationError(
                f"{self.kind} record is {size} bytes serialized, over the cap of {MAX_VALUE_BYTES} bytes"
            )
        self.from_dht_value(value)  # refuse what readers would refuse
        return value

    def from_dht_value(self, value: Any) -> Record:
        """Parse a wire record made by ``to_dht_value``; unknown fields are ignored.

        Raises ``ValidationError`` if the value is not a record of this listing, has another schema version, or
        has malformed fields.
        """
        assert self.schema is not None, f"{self.kind} records have a codec of their own"
        self.check_version(value)
        name = value[self.name_field]
        parts = name.split("/", len(self.name_fields) - 1)  # validate_name checked the form of the name
        fields = {attr: value[wire] for attr, wire in self.wire_names.items() if wire in value}
        try:
            return self.schema.model_validate({**dict(zip(self.name_fields, parts, strict=True)), **fields})
        except PydanticValidationError as e:
            raise ValidationError(f"malformed {self.kind} record for {name}: {e}") from e
