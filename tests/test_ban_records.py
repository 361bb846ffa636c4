"""Shared bans of verified training runs: the ban record, what nodes refuse, the majority rule (``agreed_bans``) with
Byzantine declarers, ``declare_bans``/``list_bans`` and ``RunAnnouncer(bans=...)`` on real DHT nodes on 127.0.0.1,
the bans table of ``swarm-peer status``, and a trainer that joins late and applies the run's bans.

Records a dishonest volunteer could write are stored with raw hivemind stores (signed, but past ``declare_bans``'s
checks) with ``exclude_self=True``, so what comes back is the verdict of the *other* nodes.
"""

from __future__ import annotations

import io
import logging
import time

import pytest
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from swarm_peer.cli.status import run_status
from swarm_peer.client.diloco import DiLoCoTrainer
from swarm_peer.client.text_data import TokenStream
from swarm_peer.dht import (
    BANS,
    BANS_KEY,
    MAX_RECORD_TTL,
    RUNS,
    BanInfo,
    RunAnnouncer,
    RunInfo,
    agreed_bans,
    ban_from_dht_value,
    ban_to_dht_value,
    create_dht,
    declare_bans,
    declare_run,
    list_bans,
    list_runs_and_bans,
    local_peer_id,
    local_subkey,
    peer_id_from_public_key,
    peer_subkey,
    run_to_dht_value,
)
from swarm_peer.dht.ban_record import MAX_REASON_LENGTH, short_reason
from swarm_peer.dht.records import MAX_ANNOUNCE_PERIOD
from swarm_peer.errors import ValidationError
from swarm_peer.settings import NetworkSettings, TrainSettings

from .conftest import SMALL_CONFIG, WAIT, raw_store, signing_peer, table_row, wait_until

LIAR = peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes()).to_base58()


def _run(run_id: str, **fields) -> RunInfo:
    defaults = dict(model_name="tiny", step=4, peers=3, inner_steps=2, aggregator="centered_clip")
    return RunInfo(run_id=run_id, **{**defaults, **fields})


def _id(dht) -> str:
    return local_peer_id(dht).to_base58()


# ---------------------------------------------------------------- the record (no network)


@pytest.mark.timeout(10)
def test_ban_record_round_trip_is_compact_and_bounded():
    info = BanInfo(run_id="alpha", peer=LIAR, reason="owner: wrong result")
    value = ban_to_dht_value(info)
    assert value == {"t": "swarm.ban", "v": 1, "n": f"alpha/{LIAR}", "why": "owner: wrong result"}
    assert ban_from_dht_value(value) == info
    assert ban_from_dht_value({**value, "future_field": [1, 2]}) == info  # a newer volunteer's extra field
    for bad in [
        {"why": "x" * (MAX_REASON_LENGTH + 1)},
        {"why": ""},
        {"why": "\x1b[2J"},
        {"why": 7},
        {"n": "alpha"},  # no banned peer
        {"n": f"alpha/{LIAR}/x"},
        {"n": f"a.b/{LIAR}"},  # a malformed run id
        {"n": "alpha/0OIl"},  # not base58
        {"n": "alpha/" + "Q" * 65},
        {"n": 5},
    ]:
        with pytest.raises(ValidationError):
            ban_from_dht_value({**value, **bad})
    with pytest.raises(ValidationError, match="version"):
        ban_from_dht_value({**value, "v": 2})
    with pytest.raises(ValidationError, match="not a ban record"):
        ban_from_dht_value(run_to_dht_value(_run("alpha")))
    with pytest.raises(ValidationError):  # a model_copy(update=...) skips pydantic: the wire form checks it
        ban_to_dht_value(info.model_copy(update={"reason": "\n"}))
    # what a trainer's reasons become: printable, bounded, never empty
    assert short_reason("input:\tNaN") == "input:?NaN"
    assert short_reason("x" * 500) == "x" * (MAX_REASON_LENGTH - 1) + "…"
    assert short_reason(" \n") == "banned"


@pytest.mark.timeout(10)
def test_validator_accepts_only_owned_well_formed_ban_records_under_the_bans_key():
    alice = signing_peer()
    alice_id, signer = alice.peer_id, alice.signer
    name = f"alpha/{LIAR}"
    good, own = (
        ban_to_dht_value(BanInfo(run_id="alpha", peer=LIAR, reason="owner")),
        BANS.subkey(name, alice.subkey),
    )

    def accepted(value, subkey: bytes = own, key: bytes = BANS.key_id(), ttl: float = 30.0) -> bool:
        return alice.accepted(value, key, subkey, ttl)

    assert BANS.parse_subkey(own)[:2] == (name, alice_id)
    assert accepted(good)
    assert accepted({**good, "v": 2, "why": 1})  # a newer version: relayed
    assert not accepted({**good, "why": "y" * (MAX_REASON_LENGTH + 1)})  # malformed
    assert not accepted(good, ttl=MAX_RECORD_TTL + 5)  # lives too long
    assert not accepted(good, subkey=name.encode() + b"@nobody")  # unowned subkey
    mallory_id = peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes())
    assert not accepted(good, subkey=BANS.subkey(name, peer_subkey(mallory_id, signer.local_public_key)))
    # the ban of another peer or run in this subkey; a ban under another key; the bans key holds only bans
    assert not accepted(ban_to_dht_value(BanInfo(run_id="alpha", peer=alice_id.to_base58(), reason="x")))
    assert not accepted(ban_to_dht_value(BanInfo(run_id="beta", peer=LIAR, reason="owner")))
    assert not accepted(good, key=RUNS.key_id())
    assert not accepted(run_to_dht_value(_run("alpha")), subkey=RUNS.subkey("alpha", alice.subkey))
    assert not accepted({"anything": 1})


# ---------------------------------------------------------------- the majority rule


def test_a_strict_majority_of_the_volunteers_bans_and_a_banned_voter_stops_voting():
    volunteers = "ABCDE"
    # the module docstring's example: E is banned by 3 of 5; E's vote against A then counts for nothing
    bans = {"E": {"A": "owner", "B": "owner", "C": "input"}, "A": {"E": "lie", "D": "lie"}}
    assert agreed_bans(bans, volunteers) == {"E": "owner"}  # the reason most declarers give
    assert agreed_bans({"E": {"A": "x", "B": "x"}}, "ABCD") == {}  # half is no majority
    assert agreed_bans({"E": {"A": "x", "B": "x", "C": "x"}}, "ABCD") == {"E": "x"}
    # declarations by peers that do not list the run count for nothing
    assert agreed_bans({"E": {"X": "x", "Y": "x", "Z": "x", "A": "x"}}, "ABCDE") == {}
    # a ban shrinks the voters: G, declared by 3 of 7, is banned once E and F (4 of 7) are out (3 of 5)
    bans = {"E": dict.fromkeys("ABCD", "x"), "F": dict.fromkeys("ABCD", "x"), "G": dict.fromkeys("ABC", "y")}
    assert agreed_bans(bans, "ABCDEFG") == {"E": "x", "F": "x", "G": "y"}


def test_a_minority_of_liars_cannot_get_an_honest_peer_banned():
    honest, liars = ["H1", "H2", "H3", "H4", "H5"], ["L1", "L2"]
    volunteers = honest + liars
    # the honest majority bans both liars; the liars and one mistaken honest volunteer declare H1: were the banned
    # liars' votes still counted, H1 would have 3 of the 5 voters left
    bans = {
        "L1": dict.fromkeys(honest[1:], "owner"),
        "L2": dict.fromkeys(honest[1:], "owner"),
        "H1": {"L1": "lie", "L2": "lie", "H5": "mistaken"},
    }
    assert agreed_bans(bans, volunteers) == {"L1": "owner", "L2": "owner"}
    # liars alone, however many bans they declare, ban nobody
    lies = {peer: dict.fromkeys(liars, "lie") for peer in honest}
    assert agreed_bans(lies, volunteers) == {}
    # the control: the same declarations from a majority (the liars outnumber the rest) do ban
    assert agreed_bans(lies, liars + ["H1"]) == dict.fromkeys(honest, "lie")


# ---------------------------------------------------------------- real DHTs


@pytest.mark.timeout(60)
def test_declared_bans_are_listed_and_the_status_shows_them(dht_swarm):
    one, two = _id(dht_swarm.one), _id(dht_swarm.two)
    expiration = get_dht_time() + 30
    assert declare_bans(dht_swarm.one, "beta", {LIAR: "owner: wrong\tresult"}, expiration)
    assert declare_bans(dht_swarm.one, "beta", {}, expiration)  # nothing to declare
    with pytest.raises(ValidationError):
        declare_bans(dht_swarm.one, "beta", {"not/a peer": "x"}, expiration)
    with pytest.raises(ValidationError, match="expire"):
        declare_bans(dht_swarm.one, "beta", {LIAR: "x"}, get_dht_time() + MAX_RECORD_TTL + 30)
    # many bans take several requests; every one is listed
    many = {
        peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes()).to_base58(): "x"
        for _ in range(14)
    }
    assert declare_bans(dht_swarm.two, "many", many, expiration)

    # the announcer declares the volunteer's bans with its run record, as they change
    banned = {LIAR: "input: scaled"}
    announcers = [
        RunAnnouncer(dht_swarm.one, lambda: _run("beta"), period=5),
        RunAnnouncer(dht_swarm.two, lambda: _run("beta"), period=0.5, bans=lambda: dict(banned)),
    ]
    for announcer in announcers:
        announcer.start()
    try:
        # a third volunteer, alone in accusing volunteer one
        assert declare_run(dht_swarm.boot, _run("beta"), get_dht_time() + 30)
        assert declare_bans(dht_swarm.boot, "beta", {one: "[red]lie"}, get_dht_time() + 30)
        expected = {
            LIAR: {one: "owner: wrong?result", two: "input: scaled"},
            one: {_id(dht_swarm.boot): "[red]lie"},
        }
        assert wait_until(lambda: list_bans(dht_swarm.boot, "beta", timeout=WAIT) == {"beta": expected})
        assert list_bans(dht_swarm.boot, timeout=WAIT)["many"] == {peer: {two: "x"} for peer in many}
        runs, bans = list_runs_and_bans(dht_swarm.boot, "beta", timeout=WAIT)
        assert runs.keys() == {"beta"} and len(runs["beta"]) == 3 and bans == {"beta": expected}
        assert agreed_bans(bans["beta"], runs["beta"]) == {LIAR: "input: scaled"}  # 2 of 3; the first reason

        out = io.StringIO()
        network = NetworkSettings(initial_peers=tuple(dht_swarm.initial_peers), client_mode=True)
        assert run_status(None, network, timeout=WAIT, console=Console(file=out, width=200)) == 0
        text = out.getvalue()
        table_row(text, "beta", "of 3")
        agreed = table_row(text, LIAR[:6], " 2 ", "yes", "input: scaled")
        minority = table_row(
            text, one[:6], " 1 ", "no", "[red]lie"
        )  # an accusation by 1 of 3, shown literally
        assert text.index(agreed) < text.index(minority), text  # agreed bans first

        banned["QmNew"] = "owner: wrong result"  # a later ban goes out with the next record
        assert wait_until(lambda: "QmNew" in list_bans(dht_swarm.boot, "beta", timeout=WAIT).get("beta", {}))
    finally:
        for announcer in announcers:
            assert announcer.stop(final=False, timeout=WAIT)


@pytest.mark.timeout(30)
def test_nodes_refuse_malformed_long_lived_and_foreign_ban_records(dht_swarm):
    writer, victim = dht_swarm.two, dht_swarm.one
    name = f"refusals/{LIAR}"
    subkey = BANS.subkey(name, local_subkey(writer))
    good = ban_to_dht_value(BanInfo(run_id="refusals", peer=LIAR, reason="owner"))
    assert raw_store(writer, BANS_KEY, good, subkey)  # the control: a well-formed record is stored
    assert raw_store(writer, BANS_KEY, good, subkey, ttl=2 * MAX_ANNOUNCE_PERIOD)
    assert not raw_store(writer, BANS_KEY, good, subkey, ttl=MAX_RECORD_TTL + 30)
    assert not raw_store(writer, BANS_KEY, {**good, "why": "z" * 500}, subkey)
    assert not raw_store(writer, BANS_KEY, {**good, "why": "\x1b[31mred"}, subkey)
    assert not raw_store(writer, BANS_KEY, {**good, "n": f"other/{LIAR}"}, subkey)
    assert not raw_store(writer, BANS_KEY, {"not": "a ban"}, subkey)
    # a ban in the victim's name: the victim's subkey (not signed by the writer), or its peer id with the
    # writer's key
    assert not raw_store(writer, BANS_KEY, good, BANS.subkey(name, local_subkey(victim)))
    writer_key = BANS.parse_subkey(subkey)[2]
    impersonating = BANS.subkey(name, peer_subkey(local_peer_id(victim), b"[owner:" + writer_key + b"]"))
    assert not raw_store(writer, BANS_KEY, good, impersonating)
    assert list_bans(dht_swarm.boot, "refusals", timeout=WAIT) == {"refusals": {LIAR: {_id(writer): "owner"}}}


# ---------------------------------------------------------------- a trainer that joins late


def _trainer(dht, run_id: str) -> DiLoCoTrainer:
    config = LlamaConfig(num_hidden_layers=1, **{**SMALL_CONFIG, "vocab_size": 32})
    torch.manual_seed(0)
    settings = TrainSettings(
        model="tiny",
        data="-",
        run_id=run_id,
        verify=True,
        inner_steps=2,
        min_peers=2,
        seq_len=8,
        batch_size=2,
    )
    return DiLoCoTrainer(LlamaForCausalLM(config), TokenStream(torch.arange(256) % 32), settings, dht)


@pytest.mark.timeout(90)
def test_a_late_joiner_applies_the_runs_agreed_bans_on_join(dht_swarm, caplog):
    expiration = get_dht_time() + 60
    for volunteer in (dht_swarm.one, dht_swarm.two):  # the run's volunteers, both of which banned the liar
        for run_id in ("late", "quiet"):
            assert declare_run(volunteer, _run(run_id), expiration)
        assert declare_bans(volunteer, "late", {LIAR: "owner: wrong result"}, expiration)
    # in the quiet run, a third volunteer accuses volunteer one: a minority (1 of 3), whom nobody follows
    assert declare_run(dht_swarm.boot, _run("quiet"), expiration)
    assert declare_bans(dht_swarm.boot, "quiet", {_id(dht_swarm.one): "lie"}, expiration)

    for run_id, expected in (
        ("late", {LIAR: "owner: wrong result"}),
        ("quiet", {}),
    ):  # the second: the control
        dht = create_dht(initial_peers=dht_swarm.initial_peers)
        trainer = None
        try:
            trainer = _trainer(dht, run_id)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="swarm_peer.client.diloco"):
                assert not trainer.join(timeout=2)  # no member shares a state
            assert trainer.banned == expected
            applied = [r.getMessage() for r in caplog.records if "Applied the run's ban" in r.getMessage()]
            assert applied == [f"Applied the run's ban of {peer}: {why}" for peer, why in expected.items()]
            assert trainer.apply_run_bans() == {}  # nothing new: a round's start applies nothing
            if run_id == "late":  # a later round's start applies what the run agreed on since, a lookup later
                later = {
                    peer_id_from_public_key(RSAPrivateKey().get_public_key().to_bytes()).to_base58(): "input"
                }
                for volunteer in (dht_swarm.one, dht_swarm.two):
                    assert declare_bans(volunteer, "late", later, expiration)
                found, deadline = {}, time.monotonic() + WAIT + trainer.view.interval
                while not found and time.monotonic() < deadline:  # never waits on the DHT: polled
                    found = trainer.apply_run_bans()
                    time.sleep(0.05)
                assert found == later and trainer.banned == {**expected, **later}
        finally:
            if trainer is not None:
                trainer.shutdown()
            dht.shutdown()
