"""``swarm-peer status`` and the model record it discovers models by: the record, the validator, the bars,
and the real command against a local swarm (separate processes on 127.0.0.1) with a gap, then without.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time

import click
import pydantic
import pytest
from click.testing import CliRunner
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from rich.console import Console

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.cli.main import cli
from swarm_peer.cli.status import coverage_bar, render_status, run_status, span_bar
from swarm_peer.dht import (
    Announcer,
    ModelInfo,
    ServerInfo,
    ServerState,
    SwarmRecordValidator,
    block_key_id,
    create_dht,
    declare_span,
    list_models,
    model_from_dht_value,
    model_subkey,
    model_to_dht_value,
    models_key_id,
    parse_model_subkey,
    peer_id_from_public_key,
    peer_subkey,
    to_dht_value,
    visible_maddrs,
)
from swarm_peer.dht.snapshot import ModelStatus
from swarm_peer.errors import ValidationError
from swarm_peer.models import resolve_checkpoint
from swarm_peer.protocols import rpc, swarm_pb2
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings, NetworkSettings

from .conftest import answer_info, signed_record, table_row

WAIT = 10.0  # seconds: the bound of every wait on the DHT in these tests
OTHER_MODEL = "other-model"  # announced by this test process, next to the tiny checkpoint's peers


def _status(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "swarm_peer.cli.main", "status", "--timeout", str(WAIT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=90)
    assert "Traceback" not in stderr, stderr[-3000:]
    return process.returncode, stdout, stderr


# ---------------------------------------------------------------- the model record (no network)


@pytest.mark.timeout(10)
def test_model_record_round_trip_is_compact_and_tolerant():
    info = ModelInfo(model_id="llama-7b", num_blocks=32)
    value = model_to_dht_value(info)
    assert value == {"t": "swarm.model", "v": 1, "m": "llama-7b", "nb": 32}
    assert model_from_dht_value(MSGPackSerializer.loads(MSGPackSerializer.dumps(value))) == info
    assert model_from_dht_value({**value, "future_field": [1, 2]}) == info  # a newer peer's extra field

    for bad in [{**value, "nb": 0}, {**value, "nb": "32"}, {**value, "nb": 32.0}, {**value, "m": "a.b"}]:
        with pytest.raises(ValidationError):
            model_from_dht_value(bad)
    with pytest.raises(ValidationError, match="version"):
        model_from_dht_value({**value, "v": 2})
    with pytest.raises(ValidationError, match="not a model record"):
        model_from_dht_value(
            to_dht_value(ServerInfo(state=2, start_block=0, end_block=1), model_id="m", block=0)
        )
    with pytest.raises(pydantic.ValidationError):
        ModelInfo(model_id="llama-7b", num_blocks=-1)


@pytest.mark.timeout(10)
def test_validator_accepts_only_owned_well_formed_model_records_under_the_models_key():
    alice_key, mallory_key = RSAPrivateKey(), RSAPrivateKey()
    alice_signer = RSASignatureValidator(alice_key)
    alice = CompositeValidator([SwarmRecordValidator(), alice_signer])
    alice_id = peer_id_from_public_key(alice_key.get_public_key().to_bytes())
    subkey = model_subkey("m", peer_subkey(alice_id, alice_signer.local_public_key))
    assert parse_model_subkey(subkey)[:2] == ("m", alice_id)
    good = model_to_dht_value(ModelInfo(model_id="m", num_blocks=4))
    key = models_key_id()

    assert alice.validate(signed_record(alice, key, subkey, good))
    assert alice.validate(
        signed_record(alice, key, subkey, {**good, "v": 2, "nb": "x"})
    )  # a newer version: relayed
    assert not alice.validate(signed_record(alice, key, subkey, {**good, "nb": 0}))  # malformed
    assert not alice.validate(signed_record(alice, key, b"m@nobody", good))  # unowned subkey
    mallory_id = peer_id_from_public_key(mallory_key.get_public_key().to_bytes())
    impersonating = model_subkey("m", peer_subkey(mallory_id, alice_signer.local_public_key))
    assert not alice.validate(signed_record(alice, key, impersonating, good))
    # a record in the subkey of another model, or under another key
    other_model = model_to_dht_value(ModelInfo(model_id="other", num_blocks=4))
    assert not alice.validate(signed_record(alice, key, subkey, other_model))
    assert not alice.validate(signed_record(alice, block_key_id("m", 0), subkey, good))
    # the models key holds nothing but model records
    assert not alice.validate(signed_record(alice, key, subkey, {"anything": 1}))
    server = to_dht_value(
        ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=1), model_id="m", block=0
    )
    assert not alice.validate(signed_record(alice, key, subkey, server))


@pytest.mark.timeout(10)
def test_bars_show_spans_and_gaps():
    assert span_bar(1, 3, 6) == "·██···"
    assert span_bar(0, 90, 90) == "█" * 45  # 90 blocks: two per column
    assert span_bar(88, 90, 90) == "·" * 44 + "█"
    assert coverage_bar((1, 2, 0, 12)).plain == "12✗+"
    assert coverage_bar((1, 0) * 45).plain == "✗" * 45  # a column shows its weakest block
    status = ModelStatus("m", 6, (), (1, 1, 0, 0, 2, 0))
    assert status.uncovered == ((2, 4), (5, 6)) and not status.covered


@pytest.mark.timeout(10)
def test_table_prints_what_peers_announce_literally():
    peer_id = peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes())
    info = ServerInfo(
        state=ServerState.JOINING, start_block=2, end_block=4, public_name="[red]x[/]", version="[b]"
    )
    out = io.StringIO()
    render_status([ModelStatus("m", 4, ((peer_id, info),), (1, 1, 0, 0))], Console(file=out, width=200))
    text = out.getvalue()
    assert "uncovered: 2:4" in table_row(text, "m ", "GAPS", "0:4", "11✗✗")
    assert "[red]x[/]" in table_row(text, "JOINING", "2:4", "··██", "[b]")  # rich markup is not interpreted


# ---------------------------------------------------------------- errors before or while joining


@pytest.mark.timeout(30)
def test_bad_or_unreachable_initial_peer_is_a_clear_error():
    result = CliRunner().invoke(cli, ["status", "--initial-peers", "/ip4/127.0.0.1/tcp/5"])
    assert result.exit_code == 2 and "is not a peer's multiaddr" in result.output, result.output
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 2 and "--initial-peers" in result.output, result.output

    nobody = "/ip4/127.0.0.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"
    network = NetworkSettings(initial_peers=(nobody,), client_mode=True)
    with pytest.raises(click.ClickException, match="cannot join the swarm"):
        run_status(None, network, timeout=WAIT)


# ---------------------------------------------------------------- real DHTs and a real swarm


@pytest.mark.timeout(60)
def test_list_models_finds_what_peers_declare():
    dhts = []
    try:
        a = create_dht()
        dhts.append(a)
        b = create_dht(initial_peers=visible_maddrs(a))
        dhts.append(b)
        span = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=2)
        expiration = get_dht_time() + 30
        assert declare_span(a, "x", span, expiration_time=expiration)  # without num_blocks: not listed
        assert list_models(b, timeout=WAIT) == {}
        assert declare_span(a, "x", span, expiration_time=expiration + 1, num_blocks=4)
        assert declare_span(b, "x", span, expiration_time=expiration, num_blocks=5)
        # a tie on the size of "x": the larger wins (a gap is shown rather than hidden)
        assert list_models(b, timeout=WAIT) == {"x": 5}
        with pytest.raises(ValidationError, match="num_blocks"):
            declare_span(a, "x", span, expiration_time=expiration + 2, num_blocks=0)

        # the announcer lists its model; a peer may list several models (one subkey per model)
        with Announcer(a, "y", lambda: span, period=5, num_blocks=2):
            deadline = time.monotonic() + WAIT
            while list_models(b, timeout=WAIT) != {"x": 5, "y": 2}:
                assert time.monotonic() < deadline, list_models(b, timeout=WAIT)
                time.sleep(0.1)
    finally:
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(240)
def test_status_shows_full_coverage_then_a_gap(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    model_id = resolve_checkpoint(path).model_id
    # a fixed throughput (no probe) and no rebalancing: the spans stay where the test puts them
    peer_args = ["--public-name", "alice", "--throughput", "100", "--rebalance-period", "0"]
    with LocalSwarm(path, [(0, 2), (2, 4)], peer_args=peer_args) as swarm:
        # a second, fully covered model, announced from this process as a peer would (answering info pings)
        other = create_dht(initial_peers=swarm.initial_peers)
        runtime = SwarmRuntime(ClientSettings(), dht=other)
        try:
            runtime.run(runtime.p2p.add_protobuf_handler(rpc.INFO, answer_info, swarm_pb2.InfoRequest))
            info = ServerInfo(
                state=ServerState.ONLINE, start_block=0, end_block=2, throughput=123.0, public_name="bob"
            )
            expiration = get_dht_time() + 120
            assert declare_span(other, OTHER_MODEL, info, expiration_time=expiration, num_blocks=2)

            # no MODEL: every model the peers list
            every = _status("--initial-peers", *swarm.initial_peers)
            # meanwhile, in this process: MODEL as a model id shows that model only
            out = io.StringIO()
            network = NetworkSettings(initial_peers=tuple(swarm.initial_peers), client_mode=True)
            assert run_status(OTHER_MODEL, network, timeout=WAIT, console=Console(file=out, width=200)) == 0
            assert OTHER_MODEL in out.getvalue() and model_id not in out.getvalue(), out.getvalue()

            code, stdout, stderr = _finish(every)
            assert code == 0, stdout + stderr[-3000:]
            table_row(stdout, model_id, "covered", "0:4", "1111")
            table_row(stdout, "ONLINE", "0:2", "██··", "100", "512 MiB", "1.0 GiB", "alice")
            table_row(stdout, "ONLINE", "2:4", "··██", "100", "512 MiB", "1.0 GiB", "alice")
            table_row(stdout, OTHER_MODEL, "covered", "0:2", "11")
            table_row(stdout, "ONLINE", "0:2", "██ ", "123", "bob")
            assert "uncovered" not in stdout

            # the peer of 2:4 leaves (SIGTERM: it announces OFFLINE, then exits); MODEL as a checkpoint dir
            leaving = swarm.peers[1].process
            leaving.terminate()
            assert leaving.wait(30) == 0
            code, stdout, stderr = _finish(_status("--initial-peers", *swarm.initial_peers, path))
            assert code == 1, stdout + stderr[-3000:]
            assert "uncovered: 2:4" in table_row(stdout, model_id, "GAPS", "11✗✗")
            table_row(stdout, "ONLINE", "0:2", "██··")
            table_row(stdout, "OFFLINE", "2:4", "··██")
            assert OTHER_MODEL not in stdout
            assert "no ONLINE peer serves blocks 2:4" in stderr
        finally:
            runtime.shutdown()
            other.shutdown()
