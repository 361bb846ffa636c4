"""swarm_peer.dht against real hivemind DHT nodes on 127.0.0.1 (no mocks).

Every DHT started here is shut down by its fixture or ``finally``; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import time
from collections.abc import Callable, Iterator
from functools import partial
from types import SimpleNamespace

import hivemind
import pydantic
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MPFuture, MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm_peer.dht import (
    MAX_VALUE_BYTES,
    Announcer,
    ServerInfo,
    ServerState,
    SwarmRecordValidator,
    block_key,
    block_key_id,
    block_ranges,
    create_dht,
    declare_span,
    from_dht_value,
    get_block_servers,
    load_identity,
    local_peer_id,
    local_subkey,
    online_servers,
    parse_peer_subkey,
    peer_id_from_public_key,
    peer_subkey,
    to_dht_value,
    validate_model_id,
    visible_maddrs,
)
from swarm_peer.dht.announce import _store_span
from swarm_peer.dht.lookup import _get_entries
from swarm_peer.dht.records import MAX_BLOCKS
from swarm_peer.errors import ValidationError

WAIT = 10.0  # seconds: the bound of every wait on the DHT in these tests


def _info(start: int, end: int, state: ServerState = ServerState.ONLINE, **fields) -> ServerInfo:
    return ServerInfo(state=state, start_block=start, end_block=end, **fields)


def _store(dht: hivemind.DHT, model_id: str, block: int, value, subkey: bytes, ttl: float = 30.0) -> bool:
    """A raw hivemind store of ``value`` under ``block_key(model_id, block)``, bypassing ``declare_span``."""
    future = dht.store(
        block_key(model_id, block), value, get_dht_time() + ttl, subkey=subkey, return_future=True
    )
    return future.result(timeout=WAIT)


def _wait_until(condition: Callable[[], bool], timeout: float = WAIT, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _shutdown(dhts: list[hivemind.DHT]) -> None:
    for dht in dhts:
        dht.shutdown()
    for dht in dhts:
        assert not dht.is_alive(), "a DHT process outlived shutdown()"


@pytest.fixture(scope="module")
def swarm() -> Iterator[SimpleNamespace]:
    """Two server peers (a, b) and a client-mode node, all with the swarm validators."""
    dhts: list[hivemind.DHT] = []
    try:
        a = create_dht()
        dhts.append(a)
        maddrs = visible_maddrs(a)
        b = create_dht(initial_peers=maddrs)
        dhts.append(b)
        client = create_dht(initial_peers=maddrs, client_mode=True)
        dhts.append(client)
        yield SimpleNamespace(a=a, b=b, client=client)
    finally:
        _shutdown(dhts)


@pytest.fixture(scope="module")
def keys() -> SimpleNamespace:
    """Two RSA keys with their owner markers and bound subkeys, for validator unit tests."""
    out = SimpleNamespace()
    for name in ("alice", "mallory"):
        key = RSAPrivateKey()
        validator = RSASignatureValidator(key)
        public_key = key.get_public_key().to_bytes()
        subkey = peer_subkey(peer_id_from_public_key(public_key), validator.local_public_key)
        setattr(
            out, name, SimpleNamespace(key=key, validator=validator, subkey=subkey, public_key=public_key)
        )
    return out


# ---------------------------------------------------------------- keys, records, identity (no network)


@pytest.mark.timeout(10)
def test_block_key_is_hashed_by_hivemind_as_sha1_of_msgpack():
    assert block_key("llama-7b", 3) == "llama-7b.3"
    # what a DHT node (and so a record validator) sees as DHTRecord.key
    assert block_key_id("llama-7b", 3) == hashlib.sha1(MSGPackSerializer.dumps("llama-7b.3")).digest()
    assert block_ranges([5, 0, 1, 2, 1]) == ((0, 3), (5, 6))
    assert validate_model_id("A_b-9") == "A_b-9"
    for bad in ["", "a.b", "a/b", "x" * 129, "ünï", 3, None]:
        with pytest.raises(ValidationError):
            validate_model_id(bad)
    for bad_block in [-1, 1.0, True, "3"]:
        with pytest.raises(ValidationError):
            block_key("m", bad_block)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fields",
    [
        dict(start_block=3, end_block=3),
        dict(start_block=4, end_block=3),
        dict(start_block=-1),
        dict(state=7),
        dict(state="2"),
        dict(throughput=-1.0),
        dict(throughput=float("nan")),
        dict(cache_tokens_left=-5),
        dict(public_name="x" * 65),
        dict(public_name="\x1b[2Jgotcha"),
        dict(adapters=("lora\n",)),
        dict(throughput=1e9),
        dict(inference_rps=float("inf")),
        dict(cache_tokens_left=1 << 40),
        dict(end_block=MAX_BLOCKS + 1),
        dict(next_pings={"peer": 1e6}),
        dict(version=b"0.1"),
        dict(adapters=("a",) * 17),
        dict(next_pings={f"peer{i}": 0.1 for i in range(65)}),
        dict(next_pings={"peer": -0.1}),
    ],
)
def test_server_info_rejects_malformed_fields(fields):
    with pytest.raises(pydantic.ValidationError):
        ServerInfo(**{"state": ServerState.ONLINE, "start_block": 0, "end_block": 4, **fields})


@pytest.mark.timeout(10)
def test_wire_form_is_compact_tagged_and_tolerant():
    info = _info(0, 8, throughput=812.5, next_pings={"QmNext": 0.004}, adapters=("lora-a",), public_name="n")
    value = to_dht_value(info, model_id="llama-7b", block=3)
    assert (value["t"], value["v"], value["m"], value["b"]) == ("swarm.server", 1, "llama-7b", 3)
    assert len(MSGPackSerializer.dumps(value)) < 256
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(value))
    assert from_dht_value(wire, model_id="llama-7b", block=3) == info

    # a newer peer's extra fields are ignored; a missing optional field takes its default
    newer = {**wire, "zz": [1, 2], "future_field": {"x": 1}}
    del newer["np"]
    assert from_dht_value(newer) == info.model_copy(update={"next_pings": {}})

    with pytest.raises(ValidationError, match="schema version"):
        from_dht_value({**wire, "v": 2})
    with pytest.raises(ValidationError, match="under the key"):
        from_dht_value(wire, model_id="llama-7b", block=4)
    with pytest.raises(ValidationError, match="announces the span"):
        from_dht_value({**wire, "b": 9})
    with pytest.raises(ValidationError, match="malformed"):
        from_dht_value({**wire, "s": 7})
    with pytest.raises(ValidationError, match="not a swarm record"):
        from_dht_value({"foo": 1})
    with pytest.raises(ValidationError, match="outside the span"):
        to_dht_value(info, model_id="llama-7b", block=8)
    # model_copy(update=...) skips pydantic validation; to_dht_value checks again
    with pytest.raises(ValidationError, match="malformed"):
        to_dht_value(info.model_copy(update={"throughput": -1.0}), model_id="llama-7b", block=3)
    many_pings = info.model_copy(update={"next_pings": {f"QmPeer{i:040d}": 0.1 for i in range(60)}})
    with pytest.raises(ValidationError, match=f"cap of {MAX_VALUE_BYTES}"):
        to_dht_value(many_pings, model_id="llama-7b", block=3)


@pytest.mark.timeout(10)
def test_largest_record_keeps_the_dht_request_under_the_atomic_pipe_write(keys):
    """Why MAX_VALUE_BYTES is what it is: DHT.run_coroutine pickles this over a pipe shared by threads.

    declare_span sends its blocks as ranges, so the longest span (MAX_BLOCKS) costs no more than one block.
    """
    last = MAX_BLOCKS - 1
    info = _info(
        0, MAX_BLOCKS, version="v" * 32, dtype="d" * 16, public_name="p" * 64, adapters=("a" * 64,) * 4
    )
    pings: dict[str, float] = {}
    while True:  # grow next_pings until the record hits the cap
        bigger = info.model_copy(update={"next_pings": {**pings, f"12D3KooW{len(pings):044d}": 0.123456789}})
        try:
            to_dht_value(bigger, model_id="m" * 128, block=last)
        except ValidationError:
            break
        info, pings = bigger, dict(bigger.next_pings)
    assert len(MSGPackSerializer.dumps(to_dht_value(info, model_id="m" * 128, block=last))) <= MAX_VALUE_BYTES
    call = partial(
        _store_span,
        timeout=10.0,
        model_id="m" * 128,
        info=info,
        ranges=((0, MAX_BLOCKS),),
        subkey=keys.alice.subkey,
        expiration_time=get_dht_time(),
    )
    message = ("_run_coroutine", [], dict(coro=call, future=MPFuture()))  # as DHT.run_coroutine sends it
    assert len(pickle.dumps(message)) < 4096
    lookup = partial(
        _get_entries, timeout=10.0, model_id="m" * 128, ranges=block_ranges(range(0, MAX_BLOCKS, 2)[:64])
    )
    assert len(pickle.dumps(("_run_coroutine", [], dict(coro=lookup, future=MPFuture())))) < 4096


@pytest.mark.timeout(10)
def test_identity_must_be_rsa(tmp_path):
    path = tmp_path / "ed25519.id"
    path.write_bytes(
        crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=os.urandom(64)).SerializeToString()
    )
    with pytest.raises(ValidationError, match="needs RSA"):
        load_identity(str(path))
    (tmp_path / "garbage.id").write_bytes(b"\xff" * 10)
    with pytest.raises(ValidationError, match="not a libp2p identity"):
        load_identity(str(tmp_path / "garbage.id"))


# ---------------------------------------------------------------- the validator, on DHTRecords (no network)


def _signed(validator: CompositeValidator, key: bytes, subkey: bytes, value) -> DHTRecord:
    """A record as DHTNode.store_many builds it: serialized subkey and value, then signed."""
    record = DHTRecord(
        key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + 30
    )
    return DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)


@pytest.mark.timeout(10)
def test_validator_checks_key_fields_and_owner(keys):
    alice = CompositeValidator([SwarmRecordValidator(), keys.alice.validator])  # order given does not matter
    good = to_dht_value(_info(0, 8), model_id="m", block=3)
    key3, key4 = block_key_id("m", 3), block_key_id("m", 4)

    assert alice.validate(_signed(alice, key3, keys.alice.subkey, good))
    # replayed under the key of another block (a valid signature for that key, but the record says block 3)
    assert not alice.validate(_signed(alice, key4, keys.alice.subkey, good))
    # malformed fields
    assert not alice.validate(_signed(alice, key3, keys.alice.subkey, {**good, "s": 7}))
    assert not alice.validate(_signed(alice, key3, keys.alice.subkey, {**good, "sb": 5, "eb": 5}))
    # unsigned: a tagged record must live in an owned subkey
    assert not alice.validate(_signed(alice, key3, b"nobody", good))
    # impersonation: alice's key and signature, but mallory's peer id in front of it
    mallory_peer_id = peer_id_from_public_key(keys.mallory.public_key)
    impersonating = peer_subkey(mallory_peer_id, keys.alice.validator.local_public_key)
    assert not alice.validate(_signed(alice, key3, impersonating, good))
    # a newer schema version is relayed once its envelope checks out (mixed-version swarms)
    assert alice.validate(_signed(alice, key3, keys.alice.subkey, {**good, "v": 2, "s": 99}))
    # values of other hivemind components pass; bytes that are no value at all do not
    assert alice.validate(_signed(alice, key3, b"averager", {"anything": [1, 2]}))
    garbage = DHTRecord(key3, MSGPackSerializer.dumps(b"x"), b"\xc1\xc1", get_dht_time() + 30)
    assert not alice.validate(garbage)


@pytest.mark.timeout(10)
def test_validator_runs_after_signature_is_stripped(keys):
    composite = CompositeValidator([SwarmRecordValidator(), keys.alice.validator])
    # sorted by increasing priority; validate() walks them in reverse: the signature validator goes first
    assert [type(v) for v in composite._validators] == [SwarmRecordValidator, RSASignatureValidator]
    record = _signed(
        composite, block_key_id("m", 0), keys.alice.subkey, to_dht_value(_info(0, 1), model_id="m", block=0)
    )
    assert b"[signature:" in record.value
    assert composite.validate(record)
    # seen before stripping, a signed value does not even deserialize: the ordering is what makes it work
    assert not SwarmRecordValidator().validate(record)


# ---------------------------------------------------------------- real DHTs


@pytest.mark.timeout(30)
def test_announce_then_lookup_from_client(swarm):
    a_info, b_info = _info(0, 3, throughput=10.0), _info(2, 4, ServerState.JOINING)
    assert declare_span(swarm.a, "announce", a_info, expiration_time=get_dht_time() + 30)
    assert declare_span(swarm.b, "announce", b_info, expiration_time=get_dht_time() + 30)

    servers = get_block_servers(swarm.client, "announce", [0, 1, 2, 3, 4], timeout=WAIT)
    # swarm.a.peer_id asks the DHT process (the p2p daemon's identity): it is the key that signed the records
    a_id, b_id = swarm.a.peer_id, swarm.b.peer_id
    assert (a_id, b_id) == (local_peer_id(swarm.a), local_peer_id(swarm.b))
    assert servers == [{a_id: a_info}, {a_id: a_info}, {a_id: a_info, b_id: b_info}, {b_id: b_info}, {}]
    online = online_servers(swarm.client, "announce", [2, 3], timeout=WAIT)
    assert online == [{a_id: a_info}, {}]


@pytest.mark.timeout(30)
def test_signed_record_cannot_be_overwritten_by_another_peer(swarm):
    original = _info(0, 1, throughput=10.0)
    assert declare_span(swarm.a, "overwrite", original, expiration_time=get_dht_time() + 30)
    forged = to_dht_value(_info(0, 1, ServerState.OFFLINE), model_id="overwrite", block=0)

    # b writes into a's subkey with a later expiration: b cannot sign for a's key, so every node rejects it
    assert not _store(swarm.b, "overwrite", 0, forged, local_subkey(swarm.a), ttl=60)
    # b signs with its own key but claims a's peer id
    _, b_public_key = parse_peer_subkey(local_subkey(swarm.b))
    impersonating = peer_subkey(
        swarm.a.peer_id, RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", b_public_key)
    )
    assert not _store(swarm.b, "overwrite", 0, forged, impersonating, ttl=60)
    # b may of course write its own subkey
    assert _store(swarm.b, "overwrite", 0, forged, local_subkey(swarm.b), ttl=60)

    servers = get_block_servers(swarm.client, "overwrite", [0], timeout=WAIT)
    assert servers == [{swarm.a.peer_id: original, swarm.b.peer_id: from_dht_value(forged)}]


@pytest.mark.timeout(30)
def test_control_without_signature_validator_the_overwrite_succeeds(keys):
    """The same attack as above on nodes without RSASignatureValidator: it works, so the test above can fail."""
    maddr = "/ip4/127.0.0.1/tcp/0"
    dhts: list[hivemind.DHT] = []
    try:
        x = hivemind.DHT(start=True, host_maddrs=[maddr], record_validators=[SwarmRecordValidator()])
        dhts.append(x)
        y = hivemind.DHT(
            initial_peers=visible_maddrs(x),
            start=True,
            host_maddrs=[maddr],
            record_validators=[SwarmRecordValidator()],
        )
        dhts.append(y)
        with pytest.raises(ValidationError, match="create_dht"):  # such a node cannot sign
            declare_span(x, "control", _info(0, 1), expiration_time=get_dht_time() + 30)

        original = to_dht_value(_info(0, 1, throughput=10.0), model_id="control", block=0)
        forged = to_dht_value(_info(0, 1, ServerState.OFFLINE), model_id="control", block=0)
        assert _store(x, "control", 0, original, keys.alice.subkey, ttl=30)
        assert _store(y, "control", 0, forged, keys.alice.subkey, ttl=60)
        alice = peer_id_from_public_key(keys.alice.public_key)
        assert get_block_servers(y, "control", [0], timeout=WAIT) == [{alice: from_dht_value(forged)}]
    finally:
        _shutdown(dhts)


@pytest.mark.timeout(30)
def test_malformed_misplaced_and_junk_records(swarm):
    subkey = local_subkey(swarm.a)
    good = to_dht_value(_info(0, 8), model_id="junk", block=3)
    # signed by a, correct key, malformed fields: rejected by the store, never returned by lookup
    assert not _store(swarm.a, "junk", 3, {**good, "s": 7}, subkey)
    assert not _store(swarm.a, "junk", 3, {**good, "sb": 5, "eb": 5}, subkey)
    # a record for block 3 under the key of block 4 (validly signed for that key)
    assert not _store(swarm.a, "junk", 4, good, subkey)
    # a tagged record outside an owned subkey
    assert not _store(swarm.a, "junk", 5, to_dht_value(_info(0, 8), model_id="junk", block=5), b"nobody")
    assert get_block_servers(swarm.client, "junk", [3, 4, 5], timeout=WAIT) == [{}, {}, {}]

    # control: the well-formed record for block 3 under block 3 is accepted
    assert _store(swarm.a, "junk", 3, good, subkey)
    # an untagged value in an unowned subkey is another component's business: stored, and ignored by lookup
    assert _store(swarm.b, "junk", 3, {"averager": 1}, b"junk")
    assert swarm.client.get(block_key("junk", 3), latest=True).value.keys() == {subkey, b"junk"}
    assert get_block_servers(swarm.client, "junk", [3], timeout=WAIT) == [
        {swarm.a.peer_id: from_dht_value(good)}
    ]


@pytest.mark.timeout(30)
def test_record_expires(swarm):
    assert declare_span(swarm.a, "expiry", _info(0, 1), expiration_time=get_dht_time() + 1.5)
    assert get_block_servers(swarm.client, "expiry", [0], timeout=WAIT) == [{swarm.a.peer_id: _info(0, 1)}]
    assert _wait_until(
        lambda: get_block_servers(swarm.client, "expiry", [0], timeout=WAIT) == [{}], timeout=5
    )


@pytest.mark.timeout(40)
def test_announcer_refreshes_moves_and_stops_offline(swarm):
    current = {"info": _info(0, 2, throughput=1.0)}

    def lookup() -> list[dict[PeerID, ServerInfo]]:
        return get_block_servers(swarm.client, "announcer", [0, 1, 2], timeout=WAIT)

    a_id = swarm.a.peer_id
    announcer = Announcer(swarm.a, "announcer", lambda: current["info"], period=0.5)  # records live 1 s
    announcer.start()
    try:
        assert _wait_until(lambda: lookup()[:2] == [{a_id: current["info"]}] * 2)
        time.sleep(2.5)  # more than two lifetimes of one record: only refreshes keep it
        assert lookup()[:2] == [{a_id: current["info"]}] * 2

        # the span moves to [1, 3): block 0 gets an OFFLINE record at once
        current["info"] = _info(1, 3, throughput=2.0)
        announcer.update()
        left = _info(0, 2, ServerState.OFFLINE, throughput=1.0)
        assert _wait_until(
            lambda: lookup() == [{a_id: left}, {a_id: current["info"]}, {a_id: current["info"]}]
        )
    finally:
        assert announcer.stop(timeout=WAIT)
    offline = current["info"].model_copy(update={"state": ServerState.OFFLINE})
    assert lookup()[1:] == [{a_id: offline}, {a_id: offline}]
    assert online_servers(swarm.client, "announcer", [1, 2], timeout=WAIT) == [{}, {}]


@pytest.mark.timeout(30)
def test_an_identity_serves_one_live_node_at_a_time(tmp_path):
    path = str(tmp_path / "peer.id")
    first = create_dht(identity_path=path)
    try:
        with pytest.raises(ValidationError, match="in use by another running peer"):
            create_dht(identity_path=path)
    finally:
        _shutdown([first])
    _shutdown([create_dht(identity_path=path)])  # free again once the first node is gone


@pytest.mark.timeout(30)
def test_persistent_identity_keeps_peer_id_and_signing_key(tmp_path):
    path = str(tmp_path / "peer.id")
    peer_ids, subkeys = [], []
    for _ in range(2):
        dht = create_dht(identity_path=path)
        try:
            peer_ids.append(dht.peer_id)
            subkeys.append(local_subkey(dht))
        finally:
            _shutdown([dht])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    with open(path, "rb") as f:
        assert peer_ids[0] == peer_ids[1] == PeerID.from_identity(f.read())
    assert subkeys[0] == subkeys[1]
