"""Records that lie or outlive their peer, against a real local swarm (separate peer processes on 127.0.0.1).

A "liar" DHT node in this process writes records a modified peer could write — valid signatures in its own
subkeys, but a 10-year expiration, 65536 blocks, 1e9 tokens/s — with raw hivemind stores that skip every
local check. The swarm's nodes must refuse them, and ``swarm-peer status`` must stay bounded and honest
(it pings ONLINE peers and shows a killed one as UNREACHABLE). The tests run in file order: the last one
kills a peer.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from rich.console import Console

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.cli.status import run_status
from swarm_peer.dht import (
    MAX_BLOCKS,
    MAX_RECORD_TTL,
    MODELS_KEY,
    ModelInfo,
    ServerInfo,
    ServerState,
    SwarmRecordValidator,
    block_key,
    block_key_id,
    create_dht,
    get_block_servers,
    list_models,
    local_subkey,
    model_subkey,
    model_to_dht_value,
    peer_id_from_public_key,
    peer_subkey,
    to_dht_value,
)
from swarm_peer.dht.records import MAX_ANNOUNCE_PERIOD, MAX_CLOCK_SKEW
from swarm_peer.dht.snapshot import MAX_MODELS
from swarm_peer.models import resolve_checkpoint
from swarm_peer.settings import NetworkSettings

WAIT = 10.0  # seconds: the bound of every wait on the DHT in these tests
TEN_YEARS = 10 * 365 * 86400.0


@pytest.mark.timeout(10)
def test_validator_caps_the_expiration_with_room_for_clock_skew():
    key = RSAPrivateKey()
    signer = RSASignatureValidator(key)
    validator = CompositeValidator([signer, SwarmRecordValidator()])
    subkey = peer_subkey(peer_id_from_public_key(key.get_public_key().to_bytes()), signer.local_public_key)

    def accepted(ttl: float) -> bool:
        value = MSGPackSerializer.dumps(_record("skew", 0))
        record = DHTRecord(
            block_key_id("skew", 0), MSGPackSerializer.dumps(subkey), value, get_dht_time() + ttl
        )
        return validator.validate(dataclasses.replace(record, value=validator.sign_value(record)))

    assert accepted(2 * MAX_ANNOUNCE_PERIOD)  # the longest an honest peer's record lives
    assert accepted(2 * MAX_ANNOUNCE_PERIOD + MAX_CLOCK_SKEW - 5)  # from a writer whose clock runs ahead
    assert not accepted(MAX_RECORD_TTL + 5)
    assert not accepted(TEN_YEARS) and not accepted(float("inf")) and not accepted(float("nan"))


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints) -> Iterator[SimpleNamespace]:
    """Two real peers of the tiny llama (0:2, 2:4), a liar DHT node and a client-mode node in this process."""
    path = tiny_checkpoints["llama"]
    peer_args = ["--throughput", "100", "--rebalance-period", "0"]
    with LocalSwarm(path, [(0, 2), (2, 4)], peer_args=peer_args) as local:
        dhts: list[hivemind.DHT] = []
        try:
            dhts.append(create_dht(initial_peers=local.initial_peers))
            dhts.append(create_dht(initial_peers=local.initial_peers, client_mode=True))
            liar, client = dhts
            network = NetworkSettings(initial_peers=tuple(local.initial_peers), client_mode=True)
            model_id = resolve_checkpoint(path).model_id
            yield SimpleNamespace(local=local, liar=liar, client=client, network=network, model_id=model_id)
        finally:
            for dht in dhts:
                dht.shutdown()


def _raw_store(dht: hivemind.DHT, key: str, value, subkey: bytes, ttl: float) -> bool:
    """A hivemind store of ``value`` as the liar writes it: signed, but past ``declare_span``'s checks."""
    future = dht.store(key, value, get_dht_time() + ttl, subkey=subkey, return_future=True)
    return future.result(timeout=WAIT)


def _record(model_id: str, block: int, **fields) -> dict:
    info = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=4, throughput=10.0)
    return {**to_dht_value(info, model_id=model_id, block=block), **fields}


def _status(swarm: SimpleNamespace, model: str | None = None, timeout: float = WAIT) -> tuple[int, str]:
    out = io.StringIO()
    code = run_status(model, swarm.network, timeout=timeout, console=Console(file=out, width=200))
    return code, out.getvalue()


@pytest.mark.timeout(60)
def test_record_with_a_ten_year_expiration_is_refused(swarm):
    subkey = local_subkey(swarm.liar)
    assert not _raw_store(swarm.liar, block_key("forever", 0), _record("forever", 0), subkey, TEN_YEARS)
    listing = model_to_dht_value(ModelInfo(model_id="forever", num_blocks=4))
    assert not _raw_store(swarm.liar, MODELS_KEY, listing, model_subkey("forever", subkey), TEN_YEARS)
    assert get_block_servers(swarm.client, "forever", [0], timeout=WAIT) == [{}]
    assert "forever" not in list_models(swarm.client, timeout=WAIT)

    # control: the same records, living as long as the longest honest announce period allows, are kept
    assert _raw_store(swarm.liar, block_key("forever", 1), _record("forever", 1), subkey, MAX_RECORD_TTL - 5)
    assert _raw_store(swarm.liar, MODELS_KEY, listing, model_subkey("forever", subkey), MAX_RECORD_TTL - 5)
    assert list(get_block_servers(swarm.client, "forever", [1], timeout=WAIT)[0]) == [swarm.liar.peer_id]
    assert list_models(swarm.client, timeout=WAIT)["forever"] == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field, value", [("tp", 1e9), ("rps", 1e9), ("nt", float("inf")), ("ct", 1 << 40)])
def test_absurd_rates_and_sizes_are_refused(swarm, field, value):
    subkey, key = local_subkey(swarm.liar), block_key("boast", 0)
    assert not _raw_store(swarm.liar, key, _record("boast", 0, **{field: value}), subkey, 30)
    assert get_block_servers(swarm.client, "boast", [0], timeout=WAIT) == [{}]


@pytest.mark.timeout(90)
def test_model_record_of_65536_blocks_is_refused_and_status_still_works(swarm):
    subkey = local_subkey(swarm.liar)
    for model_id in (
        "huge",
        swarm.model_id,
    ):  # its own model, and the real one (where a tie takes the larger)
        huge = {**model_to_dht_value(ModelInfo(model_id=model_id, num_blocks=4)), "nb": 65536}
        assert not _raw_store(swarm.liar, MODELS_KEY, huge, model_subkey(model_id, subkey), 30)
    models = list_models(swarm.client, timeout=WAIT)
    assert "huge" not in models and models[swarm.model_id] == 4

    code, table = _status(swarm, swarm.model_id)
    assert code == 0, table
    assert swarm.model_id in table and "covered" in table and table.count("ONLINE") == 2, table


@pytest.mark.timeout(120)
def test_status_stays_within_its_deadline(swarm):
    """Many listed models of the most blocks a record allows, each announced by a peer that never answers."""
    subkey = local_subkey(swarm.liar)
    expiration = get_dht_time() + 60
    for i in range(2 * MAX_MODELS):
        model_id = f"aaa-decoy-{i:02d}"
        info = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=1, throughput=10.0)
        assert swarm.liar.store(
            MODELS_KEY,
            model_to_dht_value(ModelInfo(model_id=model_id, num_blocks=MAX_BLOCKS)),
            expiration,
            subkey=model_subkey(model_id, subkey),
        )
        assert swarm.liar.store(
            block_key(model_id, 0), to_dht_value(info, model_id=model_id, block=0), expiration, subkey=subkey
        )

    timeout = 8.0
    t0 = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "swarm_peer.cli.main", "status", "--timeout", str(timeout)]
        + ["--initial-peers", *swarm.network.initial_peers],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - t0
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    assert process.returncode == 1, process.stdout + process.stderr[-3000:]
    # the deadline, plus the command's start and the DHT calls' own grace (a loaded 2-core machine)
    assert elapsed < timeout + 15, f"status took {elapsed:.1f} s with --timeout {timeout}"
    assert f"showing the first {MAX_MODELS}" in process.stderr, process.stderr[-3000:]
    assert "UNREACHABLE" in process.stdout and "aaa-decoy-00" in process.stdout, process.stdout


@pytest.mark.timeout(120)
def test_status_marks_a_killed_peer_unreachable(swarm):
    peer = swarm.local.peers[1]  # blocks 2:4
    os.killpg(
        peer.process.pid, signal.SIGKILL
    )  # the peer, its DHT process and its p2pd: nothing says goodbye
    peer.process.wait(10)
    servers = get_block_servers(swarm.client, swarm.model_id, [2], timeout=WAIT)[0]
    assert [info.state for info in servers.values()] == [ServerState.ONLINE]  # its record outlives it

    code, table = _status(swarm, swarm.model_id)
    assert code == 1, table
    rows = [line for line in table.splitlines() if "2:4" in line and "··██" in line]
    assert len(rows) == 1 and "UNREACHABLE" in rows[0], table
    assert "GAPS" in table and "11✗✗" in table, table
