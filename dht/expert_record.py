"""Expert records: a grid of experts in the DHT, with every prefix level declared, so beam search can prune.

An expert's uid is a name, then its coordinates on a grid (Learning@home, Ryabinin & Gusev 2020; hivemind's
``moe.expert_uid``): ``"ffn.3.7"`` is expert (3, 7) of the grid ``ffn``. A peer hosting it declares the uid itself
and every prefix that leads to it (``declare_experts``), each in a subkey it owns::

    key               subkey                                        value
    "ffn."            b"3@QmPeer...[owner:ssh-rsa AAAA...]"          {"t": "swarm.expert", "v": 1, "u": "ffn.3.7", "d": 0}
    "ffn.3."          b"7@QmPeer...[owner:ssh-rsa AAAA...]"          {"t": "swarm.expert", "v": 1, "u": "ffn.3.7", "d": 1}
    "ffn.3.7"         b"QmPeer...[owner:ssh-rsa AAAA...]"            {"t": "swarm.expert", "v": 1, "u": "ffn.3.7", "d": 2}

``d`` (depth) is the number of coordinates in the key;
``"off": True`` marks the entries of a peer that stopped hosting the uid (``declare_experts(..., online=False)``): it
replaces the peer's live entry, lookups skip it, and it expires like any record. a prefix key (``expert_key(uid, d)``, ending in ``.``) holds,
per peer, one entry per next coordinate it hosts an expert under, and the uid key (``d`` = the grid's dimensions)
names the peers that host that expert. Beam search reads a prefix key to learn which next coordinates are alive,
without listing the grid (``swarm_peer.moe.beam_search``). A peer hosting ``ffn.3.7`` and ``ffn.3.5`` writes the
subkeys ``3@...`` of ``"ffn."`` twice; hivemind keeps one value per subkey, so ``declare_experts`` writes it once,
naming one of the two uids (either is an example of an expert under ``ffn.3.``; ``expert_records``).

The subkey ends in the peer's own subkey (``keys.peer_subkey``), so hivemind's ``RSASignatureValidator`` lets
nobody else write or erase the entry, and ``SwarmRecordValidator`` refuses (``check_expert_entry``) an entry whose
uid is malformed or out of bounds (``MAX_GRID_DIMS`` dimensions, coordinates below ``MAX_GRID_SIZE``), whose key is
not the uid's prefix of depth ``d``, whose subkey's coordinate is not the uid's next one, or that expires more than
``MAX_RECORD_TTL`` from now (as every swarm record). hivemind's own grid records (an int coordinate as the subkey,
``(uid, peer id)`` as the value) are unsigned, so anyone could overwrite or erase a coordinate: they are not used.

A uid key of a one-dimensional grid has the form of a block key (``"ffn.3"``); the two kinds of records are told
apart by their tag, and each lookup reads only its own. The compatibility rules of ``records`` hold: unknown wire
fields are ignored, and a record of a newer ``v`` is relayed (its envelope checked) but skipped by lookups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID

from swarm_peer.dht.identity import peer_id_from_public_key
from swarm_peer.dht.keys import parse_peer_subkey
from swarm_peer.dht.records import record_version
from swarm_peer.errors import ValidationError

__all__ = [
    "EXPERT_RECORD_TAG",
    "EXPERT_SCHEMA_VERSION",
    "MAX_GRID_DIMS",
    "MAX_GRID_SIZE",
    "ExpertEntry",
    "check_expert_entry",
    "expert_entry",
    "expert_records",
    "expert_key",
    "expert_key_id",
    "expert_to_dht_value",
    "is_expert_record",
    "parse_expert_entry",
    "validate_expert_prefix",
    "validate_expert_uid",
]

EXPERT_RECORD_TAG = "swarm.expert"
EXPERT_SCHEMA_VERSION = 1
MAX_GRID_DIMS = 8  # coordinates of a uid; Learning@home's largest grid has 5
MAX_GRID_SIZE = 4096  # coordinates per dimension, [0, MAX_GRID_SIZE); hivemind's examples use up to 256
MAX_NAME_LENGTH = 64  # the grid's name, before the coordinates

_NAME = rf"[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}"
_COORD = r"(?:0|[1-9][0-9]{0,3})"  # no leading zeros: one uid, one spelling
_UID_RE = re.compile(rf"({_NAME})((?:\.{_COORD}){{1,{MAX_GRID_DIMS}}})")
_PREFIX_RE = re.compile(rf"({_NAME})\.((?:{_COORD}\.){{0,{MAX_GRID_DIMS - 1}}})")


class ExpertEntry(NamedTuple):
    """One peer's entry under an expert key: the uid it leads to, the key's depth, the peer, the next coordinate
    (None under the uid's own key)."""

    uid: str
    depth: int
    peer_id: PeerID
    coord: int | None
    online: bool = True


def _parse_uid(uid: Any) -> tuple[str, tuple[int, ...]]:
    if not isinstance(uid, str) or not (match := _UID_RE.fullmatch(uid)):
        raise ValidationError(
            f"an expert uid is a name, then 1 to {MAX_GRID_DIMS} coordinates: 'ffn.3.7', got {uid!r:.120}"
        )
    name, coords = match.groups()
    coords = tuple(int(coord) for coord in coords[1:].split("."))
    if max(coords) >= MAX_GRID_SIZE:
        raise ValidationError(f"expert coordinates must be below {MAX_GRID_SIZE}, got {uid!r}")
    return name, coords


def validate_expert_uid(uid: str) -> tuple[int, ...]:
    """The coordinates of ``uid`` (``"ffn.3.7"`` -> ``(3, 7)``); ``ValidationError`` if it is no expert uid: a name of
    1..64 letters, digits, ``-`` or ``_``, then 1..``MAX_GRID_DIMS`` coordinates in [0, ``MAX_GRID_SIZE``)."""
    return _parse_uid(uid)[1]


def validate_expert_prefix(prefix: str) -> tuple[int, ...]:
    """The coordinates of a prefix key (``"ffn."`` -> ``()``, ``"ffn.3."`` -> ``(3,)``); ``ValidationError`` if it
    is no expert prefix (a uid's name and some of its coordinates, each followed by ``.``)."""
    if not isinstance(prefix, str) or not (match := _PREFIX_RE.fullmatch(prefix)):
        raise ValidationError(f"an expert prefix is 'ffn.' or 'ffn.3.', got {prefix!r:.120}")
    coords = tuple(int(coord) for coord in match.group(2).split(".")[:-1])
    if coords and max(coords) >= MAX_GRID_SIZE:
        raise ValidationError(f"expert coordinates must be below {MAX_GRID_SIZE}, got {prefix!r}")
    return coords


def expert_key(uid: str, depth: int) -> str:
    """The key of ``uid`` at ``depth``: its prefix of ``depth`` coordinates (``expert_key("ffn.3.7", 1) ==
    "ffn.3."``), or the uid itself at ``depth`` = its number of coordinates."""
    name, coords = _parse_uid(uid)
    if type(depth) is not int or not 0 <= depth <= len(coords):
        raise ValidationError(f"depth of {uid} must be an int in [0, {len(coords)}], got {depth!r}")
    if depth == len(coords):
        return uid
    return name + "." + "".join(f"{coord}." for coord in coords[:depth])


def expert_key_id(key: str) -> bytes:
    """The hashed form of an expert key that DHT nodes (and record validators) see as ``DHTRecord.key``."""
    return DHTID.generate(source=key).to_bytes()


def expert_to_dht_value(uid: str, depth: int, online: bool = True) -> dict[str, Any]:
    """The wire record of ``uid`` under ``expert_key(uid, depth)`` (see the module docstring); ``online=False``: the
    record that withdraws it."""
    expert_key(uid, depth)  # validates both
    value = {"t": EXPERT_RECORD_TAG, "v": EXPERT_SCHEMA_VERSION, "u": uid, "d": depth}
    return value if online else {**value, "off": True}


def expert_entry(
    uid: str, depth: int, peer_subkey: bytes, online: bool = True
) -> tuple[str, bytes, dict[str, Any]]:
    """(key, subkey, value) of the record a peer with ``peer_subkey`` stores under ``uid``'s key at ``depth``."""
    key, value = expert_key(uid, depth), expert_to_dht_value(uid, depth, online)
    coords = validate_expert_uid(uid)
    subkey = peer_subkey if depth == len(coords) else f"{coords[depth]}@".encode() + peer_subkey
    return key, subkey, value


def expert_records(uids: Iterable[str]) -> list[tuple[str, int]]:
    """(uid, depth) of every record that declares ``uids``, one per (key, next coordinate): uids that share a prefix
    and a next coordinate share that record (it names the first of them)."""
    records: dict[tuple[str, int | None], tuple[str, int]] = {}
    for uid in uids:
        coords = validate_expert_uid(uid)
        for depth in range(len(coords) + 1):
            coord = coords[depth] if depth < len(coords) else None
            records.setdefault((expert_key(uid, depth), coord), (uid, depth))
    return list(records.values())


def is_expert_record(value: Any) -> bool:
    """Whether a DHT value claims to be an expert record (has its tag)."""
    return isinstance(value, dict) and value.get("t") == EXPERT_RECORD_TAG


def check_expert_entry(subkey: object, value: Any) -> tuple[str, ExpertEntry | None]:
    """The key a tagged expert record belongs to, and its entry (None for a record of a newer schema version, whose
    envelope is checked: tag, version, uid, depth).

    Raises ``ValidationError`` if the record is malformed, its subkey is not ``<coord>@<peer id>[owner:<rsa key>]``
    with the uid's next coordinate (``<peer id>[owner:...]`` under the uid's own key), or the peer id is not the
    libp2p id of that RSA key.
    """
    version = record_version(value, EXPERT_RECORD_TAG, "expert")
    uid, depth = value.get("u"), value.get("d")
    key = expert_key(uid, depth)  # validates both
    coords = validate_expert_uid(uid)
    if not isinstance(subkey, bytes):
        raise ValidationError(f"subkey must be bytes, got {type(subkey).__name__}")
    coord = None
    if depth < len(coords):
        coord_bytes, _, subkey = subkey.partition(b"@")
        if coord_bytes != str(coords[depth]).encode():
            raise ValidationError(
                f"entry for {uid} under {key} is in the subkey of coordinate {coord_bytes!r:.20}"
            )
        coord = coords[depth]
    peer_id, public_key = parse_peer_subkey(subkey)
    if peer_id_from_public_key(public_key) != peer_id:
        raise ValidationError(f"subkey claims peer {peer_id} but is owned by another key")
    if version != EXPERT_SCHEMA_VERSION:
        return key, None
    offline = value.get("off", False)
    if type(offline) is not bool:
        raise ValidationError(f"'off' of an expert record must be a bool, got {offline!r:.20}")
    return key, ExpertEntry(uid, depth, peer_id, coord, not offline)


def parse_expert_entry(key: str, subkey: object, value: Any) -> ExpertEntry:
    """The entry of a record found under ``key``, checked as ``check_expert_entry`` does and made for that very key.

    Raises ``ValidationError`` if it is no well-formed expert record of this schema version for ``key``.
    """
    record_key, entry = check_expert_entry(subkey, value)
    if record_key != key:
        raise ValidationError(f"record for {record_key} found under {key}")
    if entry is None:
        raise ValidationError(
            f"unsupported expert record version {value['v']} (this peer reads {EXPERT_SCHEMA_VERSION})"
        )
    return entry
