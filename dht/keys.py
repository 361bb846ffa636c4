"""DHT keys and subkeys of swarm records.

A peer that serves block ``i`` of model ``m`` announces itself under the key ``"m.i"``
(``block_key``), in the subkey it owns (``peer_subkey``)::

    key    = "bloom-560m.7"                                  hashed by hivemind: sha1(msgpack(key))
    subkey = b"QmPeerIdBase58...[owner:ssh-rsa AAAA...]"     peer id + RSASignatureValidator owner marker

The owner marker makes the subkey *protected*: hivemind's ``RSASignatureValidator`` only accepts a value
under it when it is signed by that RSA key, so no other peer can overwrite or erase the record. The peer
id in front is bound to that key (``SwarmRecordValidator`` checks that the peer id is the libp2p id of the
same RSA key), so no peer can announce itself under another peer's id either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID

from swarm_peer.errors import ValidationError

__all__ = [
    "MAX_MODEL_ID_LENGTH",
    "block_key",
    "run_model_id",
    "block_key_id",
    "block_ranges",
    "parse_peer_subkey",
    "peer_subkey",
    "validate_model_id",
]

MAX_MODEL_ID_LENGTH = 128
_MODEL_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_BASE58_RE = rb"[1-9A-HJ-NP-Za-km-z]+"
# one base58 peer id, then exactly one owner marker in hivemind's format b"[owner:_key_]"
_OWNER_RE = re.escape(RSASignatureValidator.PUBLIC_KEY_FORMAT).replace(b"_key_", rb"([^\]]+)")
_SUBKEY_RE = re.compile(b"(" + _BASE58_RE + b")" + _OWNER_RE)


def validate_model_id(model_id: str) -> str:
    """Return ``model_id`` if it is 1..128 letters, digits, ``-`` or ``_``; raise ``ValidationError`` otherwise.

    Dots are excluded because they separate the model id from the block index in ``block_key``.
    """
    if not isinstance(model_id, str) or not _MODEL_ID_RE.fullmatch(model_id):
        raise ValidationError(f"model id must be letters, digits, '-' or '_', got {model_id!r}")
    if len(model_id) > MAX_MODEL_ID_LENGTH:
        raise ValidationError(
            f"model id is {len(model_id)} characters, over the limit of {MAX_MODEL_ID_LENGTH}"
        )
    return model_id


def run_model_id(run_id: str) -> str:
    """What the block records of a SWARM training run are keyed by instead of a weights fingerprint (its weights
    change): ``block_key(run_model_id("my-run"), 3) == "run-my-run.3"``."""
    return validate_model_id(f"run-{run_id}")


def block_key(model_id: str, block: int) -> str:
    """The DHT key of block ``block`` of model ``model_id``: ``block_key("llama-7b", 3) == "llama-7b.3"``."""
    validate_model_id(model_id)
    if type(block) is not int or block < 0:
        raise ValidationError(f"block index must be a non-negative int, got {block!r}")
    return f"{model_id}.{block}"


def block_ranges(blocks: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Distinct block indices as sorted [start, end) ranges: ``[5, 0, 1, 2, 1]`` -> ``((0, 3), (5, 6))``.

    The compact form in which blocks travel to the DHT process (a long span costs no more than one block).
    """
    ranges: list[list[int]] = []
    for block in sorted(set(blocks)):
        if ranges and block == ranges[-1][1]:
            ranges[-1][1] = block + 1
        else:
            ranges.append([block, block + 1])
    return tuple((start, end) for start, end in ranges)


def block_key_id(model_id: str, block: int) -> bytes:
    """The hashed form of ``block_key`` that DHT nodes (and record validators) see as ``DHTRecord.key``."""
    return DHTID.generate(source=block_key(model_id, block)).to_bytes()


def peer_subkey(peer_id: PeerID, owner_marker: bytes) -> bytes:
    """The subkey a peer announces under: its base58 peer id followed by its RSA owner marker.

    ``owner_marker`` is ``RSASignatureValidator.local_public_key`` (``b"[owner:ssh-rsa ...]"``).
    """
    subkey = peer_id.to_base58().encode() + owner_marker
    parse_peer_subkey(subkey)  # a malformed marker would make an unprotected (overwritable) record
    return subkey


def parse_peer_subkey(subkey: object) -> tuple[PeerID, bytes]:
    """Split a subkey made by ``peer_subkey`` into (peer id, serialized RSA public key of the owner).

    Raises ``ValidationError`` if ``subkey`` is not bytes of exactly that form (e.g. an unsigned subkey).
    """
    if not isinstance(subkey, bytes):
        raise ValidationError(f"subkey must be bytes, got {type(subkey).__name__}")
    match = _SUBKEY_RE.fullmatch(subkey)
    if match is None:
        raise ValidationError(f"subkey is not '<peer id>[owner:<rsa key>]': {subkey[:64]!r}...")
    peer_id_b58, public_key = match.groups()
    return PeerID.from_base58(peer_id_b58.decode()), public_key
