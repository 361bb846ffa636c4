"""``SwarmRecordValidator``: the DHT-side check of swarm records, run by every node on store and on get.

Why not hivemind's ``SchemaValidator``: it accepts only ``pydantic.v1`` models, and it recognizes fields by
the hash of a fixed key name, while our keys are dynamic (``"{model_id}.{block}"``; a node only ever sees
``DHTRecord.key = sha1(msgpack(key))``). So the record carries its own key and this validator checks it.

What it accepts and rejects (``validate`` returns False to reject):

- a value that is not a swarm record (no ``"swarm.server"``, ``"swarm.model"``, ``"swarm.run"``, ``"swarm.ban"``
  or ``"swarm.expert"`` tag) outside ``MODELS_KEY``, ``RUNS_KEY`` and ``BANS_KEY``: accepted, other hivemind components (averagers, progress trackers) share
  the DHT;
- a value that does not deserialize: rejected (hivemind would fail on it when returning it from a get);
- a tagged record that expires more than ``MAX_RECORD_TTL`` seconds from now (by this node's clock): rejected,
  so a record cannot outlive its peer by more than that (honest peers give theirs two announce periods);
- a tagged record whose embedded (model id, block) does not hash to ``record.key``: rejected, so a record
  cannot be replayed under another key;
- a tagged record whose subkey is not ``<peer id>[owner:<rsa key>]`` (unsigned), or whose peer id is not the
  libp2p id of that RSA key: rejected, so a peer cannot announce itself as another peer;
- a tagged record of this schema version with malformed fields (``from_dht_value`` raises): rejected;
  records of a newer schema version are accepted once their envelope checks out (mixed-version swarms);
- a tagged expert record (``expert_record``, tag ``"swarm.expert"``) is checked the same way: bounded uid, key
  of its uid and depth, subkey of its next coordinate owned by the peer it names, expiration;
- under ``MODELS_KEY``, only model records (``model_record``) in an owned subkey
  ``<model id>@<peer id>[owner:<rsa key>]`` of the same model id, checked the same way; a model record under
  any other key is rejected;
- under ``RUNS_KEY``, likewise, only training-run records (``run_record``) in an owned subkey
  ``<run id>@<peer id>[owner:<rsa key>]`` of the same run id; a run record under any other key is rejected;
- under ``BANS_KEY``, likewise, only ban records (``ban_record``) in an owned subkey
  ``<run id>/<banned peer id>@<peer id>[owner:<rsa key>]`` of the same run and banned peer, with a bounded,
  printable reason; a ban record under any other key is rejected.

Ordering with ``RSASignatureValidator``: hivemind's ``CompositeValidator`` sorts validators by ``priority``,
signs in increasing and validates in decreasing priority, stripping each validator's signature before the
next one sees the value. The signature validator has priority 10; this one has 0, so it validates after the
signature was checked and sees the value with the signature stripped (a signed value does not deserialize
before stripping: msgpack refuses the trailing signature). It must therefore be used together with an
``RSASignatureValidator``, as ``create_dht`` does. Note that the RSA signature itself covers the hashed key,
the subkey, the value and the expiration time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm_peer.dht.ban_record import BANS, ban_from_dht_value
from swarm_peer.dht.expert_record import check_expert_entry, expert_key_id, is_expert_record
from swarm_peer.dht.identity import peer_id_from_public_key
from swarm_peer.dht.keys import block_key_id, parse_peer_subkey
from swarm_peer.dht.listing import Listing
from swarm_peer.dht.model_record import MODELS, model_from_dht_value
from swarm_peer.dht.records import (
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    SCHEMA_VERSION,
    from_dht_value,
    is_swarm_record,
    record_key,
)
from swarm_peer.dht.run_record import RUNS, run_from_dht_value
from swarm_peer.errors import ValidationError

__all__ = ["SwarmRecordValidator"]

logger = logging.getLogger(__name__)


# per listing: its key and records, its hashed key, the parser of the fields of the version this peer reads
_LISTINGS = tuple(
    (listing, listing.key_id(), parse)
    for listing, parse in (
        (MODELS, model_from_dht_value),
        (RUNS, run_from_dht_value),
        (BANS, ban_from_dht_value),
    )
)


class SwarmRecordValidator(RecordValidatorBase):
    """Rejects malformed, misplaced or impersonating swarm records; lets every other value through.

    Stateless; several instances merge into one. Use with ``RSASignatureValidator`` (see the module docstring)::

        hivemind.DHT(..., record_validators=[RSASignatureValidator(key), SwarmRecordValidator()])
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            logger.debug("Rejected a value that does not deserialize (%s: %s)", type(e).__name__, e)
            return False
        # a listing's key holds nothing but its records, and its records go nowhere else
        listing = next(
            (entry for entry in _LISTINGS if record.key == entry[1] or entry[0].is_record(value)), None
        )
        if listing is None and not is_swarm_record(value) and not is_expert_record(value):
            return True
        try:
            _check_expiration(record)
            if listing is not None:
                self._check_listed(record, value, *listing)
            elif is_expert_record(value):
                self._check_expert(record, value)
            else:
                self._check(record, value)
        except ValidationError as e:
            logger.debug("Rejected a swarm record: %s", e)
            return False
        return True

    @staticmethod
    def _check(record: DHTRecord, value: dict) -> None:
        """Raise ``ValidationError`` unless ``value`` is a well-formed swarm record owned by its subkey's peer."""
        if len(record.value) > MAX_VALUE_BYTES:
            raise ValidationError(f"record is {len(record.value)} bytes, over the cap of {MAX_VALUE_BYTES}")
        model_id, block = record_key(value)
        if record.key != block_key_id(model_id, block):
            raise ValidationError(f"record for {model_id}.{block} is stored under another key")
        _check_owner(*parse_peer_subkey(_subkey(record)))
        if value["v"] == SCHEMA_VERSION:
            from_dht_value(value)

    @staticmethod
    def _check_expert(record: DHTRecord, value: dict) -> None:
        """Raise ``ValidationError`` unless ``value`` is a well-formed expert record (``expert_record``) under the
        key of its uid and depth, in the subkey of its next coordinate, owned by its subkey's peer."""
        if len(record.value) > MAX_VALUE_BYTES:
            raise ValidationError(f"record is {len(record.value)} bytes, over the cap of {MAX_VALUE_BYTES}")
        key, _ = check_expert_entry(_subkey(record), value)
        if record.key != expert_key_id(key):
            raise ValidationError(f"expert record for {key} is stored under another key")

    @staticmethod
    def _check_listed(
        record: DHTRecord, value: Any, listing: Listing, key_id: bytes, parse: Callable[[Any], object]
    ) -> None:
        """Raise ``ValidationError`` unless ``value`` is a record of ``listing`` under its key, owned as above;
        ``parse`` checks the fields of a record of the version this peer reads."""
        if len(record.value) > MAX_VALUE_BYTES:
            raise ValidationError(f"record is {len(record.value)} bytes, over the cap of {MAX_VALUE_BYTES}")
        if record.key != key_id:
            raise ValidationError(f"{listing.kind} record stored under another key")
        version = listing.record_version(value)  # also: the listing's key holds nothing but its records
        name, peer_id, public_key = listing.parse_subkey(_subkey(record))
        _check_owner(peer_id, public_key)
        if name != value[listing.name_field]:
            raise ValidationError(
                f"record for {listing.kind} {value[listing.name_field]} is stored in the subkey of {name}"
            )
        if version == listing.version:
            parse(value)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # stateless: a second instance adds nothing
        return isinstance(other, SwarmRecordValidator)

    @property
    def priority(self) -> int:
        return 0  # below RSASignatureValidator (10): validate after its signature is checked and stripped


def _check_expiration(record: DHTRecord) -> None:
    """Raise ``ValidationError`` if the record expires later than ``MAX_RECORD_TTL`` from now (or never)."""
    ttl = record.expiration_time - get_dht_time()
    if not ttl <= MAX_RECORD_TTL:  # also NaN
        raise ValidationError(f"record expires in {ttl:.0f} s, over the cap of {MAX_RECORD_TTL:.0f} s")


def _subkey(record: DHTRecord) -> object:
    try:
        return MSGPackSerializer.loads(record.subkey)
    except Exception as e:
        raise ValidationError(f"subkey does not deserialize: {e}") from e


def _check_owner(peer_id: PeerID, public_key: bytes) -> None:
    """Raise ``ValidationError`` unless ``peer_id`` is the libp2p id of the subkey's owner key."""
    if peer_id_from_public_key(public_key) != peer_id:
        raise ValidationError(f"subkey claims peer {peer_id} but is owned by another key")
