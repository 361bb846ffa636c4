"""Training runs in the DHT: the run record, what nodes refuse, ``list_runs``, ``RunAnnouncer``, and the runs
table of ``swarm-peer status`` (a real subprocess), on real DHT nodes on 127.0.0.1.

Records a dishonest volunteer could write are stored with raw hivemind stores (signed, but past
``declare_run``'s checks) with ``exclude_self=True``, so what comes back is the verdict of the *other* nodes.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time

import hivemind
import pydantic
import pytest
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from rich.console import Console

from swarm_peer.cli.status import MAX_RUN_PEERS, render_runs
from swarm_peer.dht import (
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    MODELS,
    RUNS,
    RUNS_KEY,
    ModelInfo,
    RunAnnouncer,
    RunInfo,
    create_dht,
    declare_run,
    list_runs,
    local_subkey,
    model_to_dht_value,
    peer_id_from_public_key,
    peer_subkey,
    run_from_dht_value,
    run_in_dht,
    run_to_dht_value,
)
from swarm_peer.dht.records import MAX_ANNOUNCE_PERIOD
from swarm_peer.errors import ValidationError

from .conftest import WAIT, raw_store, signing_peer, table_row, wait_until


def _info(run_id: str = "alpha", **fields) -> RunInfo:
    defaults = dict(model_name="tiny-llama", step=7, loss=2.5, peers=2, inner_steps=50, aggregator="mean")
    return RunInfo(run_id=run_id, **{**defaults, **fields})


# ---------------------------------------------------------------- the record (no network)


@pytest.mark.timeout(10)
def test_run_record_round_trip_is_compact_and_tolerant():
    info = _info(version="0.1.0")
    value = run_to_dht_value(info)
    assert value == {
        "t": "swarm.run",
        "v": 1,
        "r": "alpha",
        "mn": "tiny-llama",
        "s": 7,
        "l": 2.5,
        "p": 2,
        "h": 50,
        "ag": "mean",
        "ver": "0.1.0",
    }
    assert run_from_dht_value(MSGPackSerializer.loads(MSGPackSerializer.dumps(value))) == info
    assert run_from_dht_value({**value, "future_field": [1, 2]}) == info  # a newer volunteer's extra field
    no_loss = _info(loss=None)
    assert (
        run_from_dht_value(MSGPackSerializer.loads(MSGPackSerializer.dumps(run_to_dht_value(no_loss))))
        == no_loss
    )

    for bad in [
        {"s": -1},
        {"s": 7.0},
        {"s": 2**41},
        {"l": float("nan")},
        {"l": float("inf")},
        {"l": -0.5},
        {"p": 0},
        {"p": 5000},
        {"h": 0},
        {"mn": "x" * 65},
        {"mn": "\x1b[31mred"},
        {"ag": ""},
        {"ver": 1},
        {"r": "a.b"},
        {"r": "x" * 65},
        {"r": "run\n"},
    ]:
        with pytest.raises(ValidationError):
            run_from_dht_value({**value, **bad})
    with pytest.raises(ValidationError, match="version"):
        run_from_dht_value({**value, "v": 2})
    with pytest.raises(ValidationError, match="not a run record"):
        run_from_dht_value(model_to_dht_value(ModelInfo(model_id="m", num_blocks=1)))
    with pytest.raises(pydantic.ValidationError):
        _info(run_id="has space")
    with pytest.raises(ValidationError):  # a model_copy(update=...) skips pydantic: the wire form checks it
        run_to_dht_value(info.model_copy(update={"step": -1}))


@pytest.mark.timeout(10)
def test_validator_accepts_only_owned_well_formed_run_records_under_the_runs_key():
    alice = signing_peer()
    alice_id, signer = alice.peer_id, alice.signer
    good, own, runs_key = run_to_dht_value(_info("alpha")), RUNS.subkey("alpha", alice.subkey), RUNS.key_id()

    def accepted(value, subkey: bytes = own, key: bytes = runs_key, ttl: float = 30.0) -> bool:
        """Whether a node takes ``value`` from alice (signed by her key) in ``subkey`` of ``key``."""
        return alice.accepted(value, key, subkey, ttl)

    assert RUNS.parse_subkey(own)[:2] == ("alpha", alice_id)
    assert accepted(good)
    assert accepted({**good, "v": 2, "s": "x"})  # a newer version: relayed
    assert not accepted({**good, "l": -1.0})  # malformed
    assert not accepted(good, ttl=MAX_RECORD_TTL + 5)  # lives too long
    assert not accepted({**good, "pad": "x" * MAX_VALUE_BYTES})  # unknown fields are ignored, not unlimited
    assert not accepted(good, subkey=b"alpha@nobody")  # unowned subkey
    mallory_id = peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes())
    assert not accepted(good, subkey=RUNS.subkey("alpha", peer_subkey(mallory_id, signer.local_public_key)))
    # a record in the subkey of another run, or under another key; the runs key holds nothing but run records
    assert not accepted(run_to_dht_value(_info("beta")))
    assert not accepted(good, key=MODELS.key_id())
    assert not accepted({"anything": 1})
    assert not accepted(model_to_dht_value(ModelInfo(model_id="alpha", num_blocks=4)))


@pytest.mark.timeout(10)
def test_runs_table_says_what_most_volunteers_say_literally():
    volunteers = {
        f"Qm{i:04d}": _info("alpha", model_name=name, step=i, aggregator="[b]")
        for i, name in enumerate(["[red]x[/]"] * (MAX_RUN_PEERS + 1) + ["other"] * 2)
    }
    out = io.StringIO()
    render_runs({"alpha": volunteers}, Console(file=out, width=200))
    text = out.getvalue()
    # the name most volunteers give, the highest step, the count of all; rich markup is not interpreted
    table_row(text, "alpha", "[red]x[/]", str(MAX_RUN_PEERS + 3), str(MAX_RUN_PEERS + 2), "[b]", "50")
    table_row(text, f"Qm{MAX_RUN_PEERS + 2:04d}", "2.5000")  # the furthest volunteer first
    assert "… 3 more" in text and "Qm0000" not in text, text


# ---------------------------------------------------------------- real DHTs


@pytest.mark.timeout(30)
def test_nodes_refuse_malformed_long_lived_and_foreign_run_records(dht_swarm):
    writer, victim = dht_swarm.two, dht_swarm.one
    subkey = RUNS.subkey("refusals", local_subkey(writer))
    good = run_to_dht_value(_info("refusals"))
    assert raw_store(writer, RUNS_KEY, good, subkey)  # the control: a well-formed record is stored

    assert not raw_store(writer, RUNS_KEY, {**good, "s": 2**50}, subkey)
    assert not raw_store(writer, RUNS_KEY, {**good, "mn": "\x1b[2J"}, subkey)
    assert not raw_store(writer, RUNS_KEY, {**good, "r": "another-run"}, subkey)
    assert not raw_store(writer, RUNS_KEY, {"t": "swarm.run", "v": 1}, subkey)
    assert not raw_store(writer, RUNS_KEY, {"not": "a run record"}, subkey)
    # the expiration: the longest an honest volunteer gives is stored, longer is not
    long_lived, long_subkey = (
        run_to_dht_value(_info("long-lived")),
        RUNS.subkey("long-lived", local_subkey(writer)),
    )
    assert raw_store(writer, RUNS_KEY, long_lived, long_subkey, ttl=2 * MAX_ANNOUNCE_PERIOD)
    assert not raw_store(writer, RUNS_KEY, long_lived, long_subkey, ttl=MAX_RECORD_TTL + 30)
    assert not raw_store(writer, RUNS_KEY, long_lived, long_subkey, ttl=10 * 365 * 86400.0)
    with pytest.raises(ValidationError, match="expire"):
        declare_run(writer, _info("long-lived"), get_dht_time() + MAX_RECORD_TTL + 30)

    # the victim's own record; the writer cannot overwrite it (its key does not sign the victim's subkey), nor
    # write one in its name (a subkey with the victim's peer id and the writer's key)
    victim_info = _info("foreign", step=1)
    assert declare_run(victim, victim_info, get_dht_time() + 30)
    forged = run_to_dht_value(_info("foreign", step=99))
    assert not raw_store(writer, RUNS_KEY, forged, RUNS.subkey("foreign", local_subkey(victim)), ttl=60)
    _, writer_key = RUNS.parse_subkey(subkey)[1:]
    victim_id = RUNS.parse_subkey(RUNS.subkey("x", local_subkey(victim)))[1]
    impersonating = RUNS.subkey("foreign", peer_subkey(victim_id, b"[owner:" + writer_key + b"]"))
    assert not raw_store(writer, RUNS_KEY, forged, impersonating)
    assert list_runs(dht_swarm.boot, timeout=WAIT)["foreign"] == {victim_id.to_base58(): victim_info}


async def _plant(_dht: hivemind.DHT, node: hivemind.DHTNode, *, timeout: float, entries: list) -> None:
    """In the DHT process: put (subkey, value) entries under ``RUNS_KEY`` into the node's own storage, unchecked
    (as a node without our validator would hold them)."""
    key_id = DHTID.generate(source=RUNS_KEY)
    for subkey, value in entries:
        node.protocol.storage.store_subkey(
            key_id, subkey, MSGPackSerializer.dumps(value), get_dht_time() + 30
        )


@pytest.mark.timeout(30)
def test_list_runs_skips_entries_that_are_foreign_or_malformed(dht_swarm):
    reader = create_dht(initial_peers=dht_swarm.initial_peers)
    try:
        own = local_subkey(reader)
        other_id = peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes())
        _, _, own_key = RUNS.parse_subkey(RUNS.subkey("x", own))
        entries = [
            (RUNS.subkey("planted", own), run_to_dht_value(_info("planted"))),  # the control: listed
            # another peer's id with this node's key
            (
                RUNS.subkey("planted", peer_subkey(other_id, b"[owner:" + own_key + b"]")),
                run_to_dht_value(_info("planted")),
            ),
            (RUNS.subkey("malformed", own), {**run_to_dht_value(_info("malformed")), "p": 0}),
            (RUNS.subkey("elsewhere", own), run_to_dht_value(_info("planted-elsewhere"))),
            (b"unowned@nobody", run_to_dht_value(_info("unowned"))),
        ]
        run_in_dht(reader, _plant, timeout=WAIT, entries=entries)
        runs = list_runs(reader, timeout=WAIT)
        reader_id = RUNS.parse_subkey(RUNS.subkey("x", own))[1].to_base58()
        assert runs["planted"] == {reader_id: _info("planted")}
        assert not {"malformed", "elsewhere", "planted-elsewhere", "unowned"} & runs.keys(), runs
    finally:
        reader.shutdown()


def _status(initial_peers: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarm_peer.cli.main",
            "status",
            "--timeout",
            str(WAIT),
            "--initial-peers",
            *initial_peers,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _short(peer_id: str) -> str:
    return f"{peer_id[:6]}…{peer_id[-6:]}"


@pytest.mark.timeout(60)
def test_list_runs_and_status_show_every_volunteer_of_every_run(dht_swarm):
    one_id, two_id = (
        RUNS.parse_subkey(RUNS.subkey("x", local_subkey(dht)))[1].to_base58()
        for dht in (dht_swarm.one, dht_swarm.two)
    )
    alpha_one = _info("alpha", step=12, loss=3.25, peers=2, aggregator="centered_clip")
    alpha_two = _info("alpha", step=11, loss=None, peers=1, aggregator="centered_clip")
    beta_one = _info("beta", model_name="other", step=3, inner_steps=10, aggregator="median")
    announcers = [
        RunAnnouncer(dht_swarm.one, lambda: alpha_one, period=5),
        RunAnnouncer(dht_swarm.two, lambda: alpha_two, period=5),
        RunAnnouncer(dht_swarm.one, lambda: beta_one, period=5),  # one node may take part in several runs
    ]
    for announcer in announcers:
        announcer.start()
    try:
        expected = {"alpha": {one_id: alpha_one, two_id: alpha_two}, "beta": {one_id: beta_one}}

        def listed() -> dict:
            runs = list_runs(dht_swarm.boot, timeout=WAIT)
            return {run_id: runs[run_id] for run_id in expected if run_id in runs}

        assert wait_until(lambda: listed() == expected), listed()

        process = _status(dht_swarm.initial_peers)
        stdout, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr[-3000:]
        assert process.returncode == 0, stdout + stderr[-3000:]  # a swarm that only trains: no model, no gap
        table_row(stdout, "alpha", "tiny-llama", " 2 ", "12", "centered_clip", "50")
        table_row(stdout, _short(one_id), "12", "3.2500", " 2 ")
        table_row(stdout, _short(two_id), "11", "—", " 1 ")
        table_row(stdout, "beta", "other", " 1 ", "3", "median", "10")
        assert stdout.index("alpha") < stdout.index(_short(one_id)) < stdout.index("beta"), stdout
    finally:
        for announcer in announcers:
            assert announcer.stop(final=False, timeout=WAIT)


@pytest.mark.timeout(40)
def test_a_stopped_announcer_leaves_the_listing_within_its_expiration(dht_swarm):
    period = 0.5  # records live 1 s
    current = {"info": _info("gamma", step=1)}
    announcer = RunAnnouncer(dht_swarm.two, lambda: current["info"], period=period)

    def listed() -> list[RunInfo]:
        return list(list_runs(dht_swarm.boot, timeout=WAIT).get("gamma", {}).values())

    announcer.start()
    try:
        assert wait_until(lambda: listed() == [current["info"]]), listed()
        time.sleep(4 * period)  # two lifetimes of one record: only refreshes keep it
        assert listed() == [current["info"]]
        current["info"] = _info("gamma", step=2)
    finally:
        assert announcer.stop(timeout=WAIT)  # declares the final step, which expires with the last record
    stopped = time.monotonic()
    assert listed() == [_info("gamma", step=2)]
    assert wait_until(lambda: listed() == [], timeout=2 * period + 2.0), listed()
    assert time.monotonic() - stopped <= 2 * period + 2.0
