"""Listings: well-known DHT keys under which every peer lists records by name, each in a subkey it owns.

Block records live under keys that already name their model, so nothing could be found without knowing it.
A listing is one fixed key that every peer writes into, one subkey per name it lists: the models it serves
(``model_record.MODELS``), the training runs it takes part in (``run_record.RUNS``)::

    key    = "swarm.models"                                             MODELS.key, hashed: MODELS.key_id()
    subkey = b"llama-7b@QmPeerIdBase58...[owner:ssh-rsa AAAA...]"        MODELS.subkey("llama-7b", peer_subkey)
    value  = {"t": "swarm.model", "v": 1, "m": "llama-7b", ...}         tag, schema version, the name again

The subkey ends in the peer's own subkey (``keys.peer_subkey``), so hivemind's ``RSASignatureValidator`` lets
nobody else overwrite or erase the record, and one peer may list several names. ``SwarmRecordValidator``
checks that the name in the record is the one in its subkey, and that the listing's key holds nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID

from swarm_peer.dht.keys import parse_peer_subkey
from swarm_peer.dht.records import record_version
from swarm_peer.errors import ValidationError

__all__ = ["Listing"]


@dataclass(frozen=True)
class Listing:
    """One kind of listed record: its key, the envelope of its records, and the form of its subkeys.

    ``validate_name`` returns a name unchanged or raises ``ValidationError``; names never contain ``@``.
    """

    kind: str  # "model", "run": for messages
    key: str
    tag: str  # the record tag, wire field "t"
    version: int  # the schema version this peer reads and writes, wire field "v"
    name_field: str  # the wire field that repeats the name of the subkey
    validate_name: Callable[[str], str]

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
