"""The expert grid in the DHT (``dht.expert_record``, ``declare_experts``, lookups) and beam search over it
(``moe.beam_search``), on real DHT nodes on 127.0.0.1."""

from __future__ import annotations

import random
import time

import pytest
import torch
from hivemind.utils import get_dht_time

from swarm_peer.dht import (
    MAX_GRID_DIMS,
    MAX_GRID_SIZE,
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    declare_experts,
    expert_key,
    get_expert_successors,
    get_experts,
    local_peer_id,
    local_subkey,
    peer_subkey,
    validate_expert_prefix,
    validate_expert_uid,
)
from swarm_peer.dht.expert_record import expert_entry, expert_key_id, expert_records, expert_to_dht_value
from swarm_peer.errors import ValidationError
from swarm_peer.moe import Expert, MoEBeamSearcher
from tests.conftest import raw_store, signing_peer

TTL = 60.0


def brute_force(
    scores_BG: list[torch.Tensor], live: set[tuple[int, ...]], k: int
) -> list[list[tuple[int, ...]]]:
    """Per sample, the coordinates of the ``k`` live experts with the highest summed scores, best first."""
    ranked = []
    for b in range(scores_BG[0].shape[0]):
        score = {
            coords: sum(float(s[b, c]) for s, c in zip(scores_BG, coords, strict=True)) for coords in live
        }
        ranked.append(sorted(live, key=score.__getitem__, reverse=True)[:k])
    return ranked


def split_declare(dhts, uids: list[str], ttl: float = TTL) -> dict[str, object]:
    """Declare ``uids`` round-robin across ``dhts``; {uid: peer id of its host}."""
    hosts = {}
    for i, dht in enumerate(dhts):
        mine = uids[i :: len(dhts)]
        assert declare_experts(dht, mine, get_dht_time() + ttl)
        hosts.update((uid, local_peer_id(dht)) for uid in mine)
    return hosts


# ---------------------------------------------------------------- uids and records


@pytest.mark.parametrize("uid", ["ffn.0", "ffn.3.7", "a_b-C.0.4095", "x." + ".".join(["1"] * MAX_GRID_DIMS)])
def test_uid_grammar_accepts(uid):
    assert validate_expert_uid(uid) == tuple(int(c) for c in uid.split(".")[1:])
    assert expert_key(uid, 0) == uid.split(".")[0] + "."


@pytest.mark.parametrize(
    "uid",
    [
        "ffn",  # no coordinate
        "ffn.",  # a prefix, not a uid
        "ffn.03",  # leading zero: one uid, one spelling
        f"ffn.{MAX_GRID_SIZE}",  # out of bounds
        "ffn.-1",
        "x." + ".".join(["1"] * (MAX_GRID_DIMS + 1)),  # too many dimensions
        "a.b.1",  # a dot in the name
        "f" * 65 + ".1",  # name too long
        ".1",
        "ffn.1 ",
        b"ffn.1",
        3,
    ],
)
def test_uid_grammar_refuses(uid):
    with pytest.raises(ValidationError):
        validate_expert_uid(uid)


def test_prefix_keys_and_shared_records():
    assert [expert_key("ffn.3.7", d) for d in range(3)] == ["ffn.", "ffn.3.", "ffn.3.7"]
    assert validate_expert_prefix("ffn.") == () and validate_expert_prefix("ffn.3.") == (3,)
    for bad in ("ffn", "ffn.3", "ffn..", f"ffn.{MAX_GRID_SIZE}.", "x." + "1." * MAX_GRID_DIMS):
        with pytest.raises(ValidationError):
            validate_expert_prefix(bad)
    with pytest.raises(ValidationError):
        expert_key("ffn.3.7", 3)
    # two uids under ffn.3.: "ffn." -> 3 is written once, naming the first
    assert expert_records(["ffn.3.7", "ffn.3.5", "ffn.4.7"]) == [
        ("ffn.3.7", 0),
        ("ffn.3.7", 1),
        ("ffn.3.7", 2),
        ("ffn.3.5", 1),
        ("ffn.3.5", 2),
        ("ffn.4.7", 0),
        ("ffn.4.7", 1),
        ("ffn.4.7", 2),
    ]


def test_validator_accepts_declarations_and_refuses_malformed_records():
    peer, other = signing_peer(), signing_peer()
    uid = "ffn.3.7"
    for depth in range(3):
        key, subkey, value = expert_entry(uid, depth, peer.subkey)
        assert peer.accepted(value, expert_key_id(key), subkey), depth
    key, subkey, value = expert_entry(uid, 1, peer.subkey)  # under "ffn.3.", subkey b"7@..."
    key_id = expert_key_id(key)
    refused = {
        "under another prefix": (value, expert_key_id("ffn.4."), subkey),
        "under the uid's key": (value, expert_key_id(uid), subkey),
        "another coordinate's subkey": (value, key_id, b"5@" + peer.subkey),
        "no coordinate in the subkey": (value, key_id, peer.subkey),
        "depth out of range": ({**value, "d": 3}, key_id, subkey),
        "depth as a bool": ({**expert_to_dht_value(uid, 1), "d": True}, key_id, subkey),
        "uid out of bounds": ({**value, "u": f"ffn.3.{MAX_GRID_SIZE}"}, key_id, b"3@" + peer.subkey),
        "uid of bad grammar": ({**value, "u": "ffn.3.07"}, key_id, subkey),
        "bad version": ({**value, "v": 0}, key_id, subkey),
        "withdrawal flag not a bool": ({**value, "off": 1}, key_id, subkey),
        "over the size cap": ({**value, "junk": "x" * MAX_VALUE_BYTES}, key_id, subkey),
        # the subkey names another peer than the key that signs it
        "impersonation": (value, key_id, b"7@" + peer_subkey(other.peer_id, peer.signer.local_public_key)),
    }
    for why, (bad_value, bad_key, bad_subkey) in refused.items():
        assert not peer.accepted(bad_value, bad_key, bad_subkey), why
    assert not peer.accepted(value, key_id, subkey, ttl=MAX_RECORD_TTL + 30), "expires too late"
    assert peer.accepted(expert_entry(uid, 1, peer.subkey, online=False)[2], key_id, subkey), "withdrawal"
    # a newer schema version with a well-formed envelope is relayed (mixed-version swarms)
    assert peer.accepted({**value, "v": 2, "new": 1}, key_id, subkey)


# ---------------------------------------------------------------- declaring and looking up


def test_declare_then_look_up_from_another_node(dht_swarm):
    one, two, boot = dht_swarm.one, dht_swarm.two, dht_swarm.boot
    assert declare_experts(one, ["look.1.2", "look.1.3"], get_dht_time() + TTL)
    assert declare_experts(two, ["look.1.2", "look.4.0"], get_dht_time() + TTL)
    both = tuple(sorted([local_peer_id(one), local_peer_id(two)], key=lambda p: p.to_base58()))
    assert get_experts(boot, ["look.1.2", "look.4.0", "look.5.5"]) == {
        "look.1.2": both,
        "look.4.0": (local_peer_id(two),),
        "look.5.5": (),
    }
    assert get_expert_successors(boot, ["look.", "look.1.", "look.4.", "look.9."]) == {
        "look.": {1: both, 4: (local_peer_id(two),)},
        "look.1.": {2: both, 3: (local_peer_id(one),)},
        "look.4.": {0: (local_peer_id(two),)},
        "look.9.": {},
    }
    with pytest.raises(ValidationError):
        declare_experts(one, ["look.1.02"], get_dht_time() + TTL)
    with pytest.raises(ValidationError):
        declare_experts(one, ["look.1.2"], get_dht_time() + MAX_RECORD_TTL + 30)


def test_withdrawn_experts_are_not_looked_up(dht_swarm):
    one, two, boot = dht_swarm.one, dht_swarm.two, dht_swarm.boot
    uids = ["wd.0.1", "wd.0.2"]
    expiration = get_dht_time() + TTL
    assert declare_experts(one, uids, expiration) and declare_experts(two, ["wd.0.2"], expiration)
    both = tuple(sorted([local_peer_id(one), local_peer_id(two)], key=lambda p: p.to_base58()))
    assert get_experts(boot, uids) == {"wd.0.1": (local_peer_id(one),), "wd.0.2": both}  # control
    assert declare_experts(one, uids, expiration + 1, online=False)  # later than what it replaces
    assert get_experts(boot, uids) == {"wd.0.1": (), "wd.0.2": (local_peer_id(two),)}
    assert get_expert_successors(boot, ["wd.", "wd.0."]) == {
        "wd.": {0: (local_peer_id(two),)},
        "wd.0.": {2: (local_peer_id(two),)},
    }


def test_a_peer_cannot_write_into_another_peers_entries(dht_swarm):
    one, two = dht_swarm.one, dht_swarm.two
    assert declare_experts(one, ["own.2.2"], get_dht_time() + TTL)
    key, subkey, value = expert_entry("own.2.2", 1, local_subkey(one))
    # two writes a record in one's subkey: refused by the signature; a malformed one in its own: by our validator
    assert not raw_store(two, key, value, subkey)
    key, subkey, value = expert_entry("own.2.5", 1, local_subkey(two))
    assert not raw_store(two, key, value, b"6@" + local_subkey(two))
    assert get_expert_successors(dht_swarm.boot, ["own.2."]) == {"own.2.": {2: (local_peer_id(one),)}}


# ---------------------------------------------------------------- beam search


def test_beam_search_is_exact_on_a_full_grid(dht_swarm):
    dhts = [dht_swarm.boot, dht_swarm.one, dht_swarm.two]
    live = {(i, j) for i in range(8) for j in range(8)}
    hosts = split_declare(dhts, [f"full.{i}.{j}" for i, j in sorted(live)])
    assert declare_experts(
        dht_swarm.one, ["full.8.0", "full.0.9"], get_dht_time() + TTL
    )  # outside the 8x8 grid
    torch.manual_seed(0)
    scores_BG = [torch.randn(32, 8), torch.randn(32, 8)]
    searcher = MoEBeamSearcher(dht_swarm.boot, "full.", (8, 8))
    found = searcher.find_best_experts(scores_BG, k=4)
    expected = brute_force(scores_BG, live, k=4)
    for b, (experts, coords) in enumerate(zip(found, expected, strict=True)):
        assert [expert.coords for expert in experts] == coords, b
        for expert in experts:
            assert expert.uid == f"full.{expert.coords[0]}.{expert.coords[1]}"
            assert expert.score == pytest.approx(
                sum(float(s[b, c]) for s, c in zip(scores_BG, expert.coords, strict=True))
            )
            assert expert.peers == (hosts[expert.uid],)
    # a wider beam finds the same; k larger than the grid gets every expert
    assert searcher.find_best_experts(scores_BG, k=4, beam_size=8) == found
    assert all(len(experts) == 64 for experts in searcher.find_best_experts(scores_BG, k=100))


def test_beam_search_finds_only_live_experts_on_a_sparse_grid(dht_swarm):
    rng = random.Random(0)
    live = {(i, j) for i in range(16) for j in range(16) if rng.random() < 0.4}
    split_declare([dht_swarm.one, dht_swarm.two], [f"sparse.{i}.{j}" for i, j in sorted(live)])
    torch.manual_seed(1)
    scores_BG = [torch.randn(64, 16), torch.randn(64, 16)]
    searcher = MoEBeamSearcher(dht_swarm.boot, "sparse.", (16, 16))
    expected = brute_force(scores_BG, live, k=4)
    for beam_size, min_recall in ((4, 0.8), (8, 0.9)):
        found = searcher.find_best_experts(scores_BG, k=4, beam_size=beam_size)
        assert all(len(experts) == 4 and {e.coords for e in experts} <= live for experts in found)
        hits = sum(
            len({e.coords for e in experts} & set(coords))
            for experts, coords in zip(found, expected, strict=True)
        )
        assert hits / (4 * len(expected)) >= min_recall, (beam_size, hits)


def test_expired_and_undeclared_experts_are_never_returned(dht_swarm):
    one, two = dht_swarm.one, dht_swarm.two
    # one's experts (row 0) expire in 3 s; two's (row 1) live on; nobody declares rows 2, 3
    expires = get_dht_time() + 3.0
    assert declare_experts(one, [f"gone.0.{j}" for j in range(4)], expires)
    assert declare_experts(two, [f"gone.1.{j}" for j in range(4)], get_dht_time() + TTL)
    scores_BG = [torch.tensor([[10.0, 5.0, 20.0, 20.0]] * 2), torch.randn(2, 4)]  # rows 2, 3 score best
    searcher = MoEBeamSearcher(dht_swarm.boot, "gone.", (4, 4))
    rows = [
        {expert.coords[0] for expert in experts} for experts in searcher.find_best_experts(scores_BG, k=6)
    ]
    assert rows == [{0, 1}] * 2
    time.sleep(max(0.0, expires - get_dht_time()) + 0.5)  # past one's expiration
    found = searcher.find_best_experts(scores_BG, k=6)
    assert [[expert.uid for expert in experts] for experts in found] == [
        [f"gone.1.{j}" for j in sorted(range(4), key=lambda j: -float(scores_BG[1][b, j]))] for b in range(2)
    ]
    assert get_experts(dht_swarm.boot, ["gone.0.0"]) == {"gone.0.0": ()}


def test_beam_search_leaves_out_excluded_peers(dht_swarm):
    one, two = dht_swarm.one, dht_swarm.two
    hosts = split_declare([one, two], ["ex.0.0", "ex.0.1", "ex.1.0"])  # one: ex.0.0, ex.1.0; two: ex.0.1
    scores_BG = [torch.tensor([[0.0, 9.0]]), torch.tensor([[1.0, 0.0]])]
    searcher = MoEBeamSearcher(dht_swarm.boot, "ex.", (2, 2))
    assert [e.uid for e in searcher.find_best_experts(scores_BG, k=3)[0]] == ["ex.1.0", "ex.0.0", "ex.0.1"]
    # without one, row 1 (only one declares it) is dead, and so is ex.0.0
    found = searcher.find_best_experts(scores_BG, k=3, exclude=[hosts["ex.0.0"]])
    assert [(e.uid, e.peers) for e in found[0]] == [("ex.0.1", (hosts["ex.0.1"],))]


def test_a_cached_search_sees_what_its_lookups_found_until_they_are_stale(dht_swarm):
    one = dht_swarm.one
    assert declare_experts(one, ["ca.0.0"], get_dht_time() + TTL)
    scores_BG = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])]
    cached = MoEBeamSearcher(dht_swarm.boot, "ca.", (2, 2), cache_seconds=2.0)
    uncached = MoEBeamSearcher(dht_swarm.boot, "ca.", (2, 2))
    assert [e.uid for e in cached.find_best_experts(scores_BG, k=2)[0]] == ["ca.0.0"]
    assert declare_experts(one, ["ca.1.1"], get_dht_time() + TTL)  # a better expert comes
    assert [e.uid for e in cached.find_best_experts(scores_BG, k=2)[0]] == ["ca.0.0"]  # from the cache
    assert [e.uid for e in uncached.find_best_experts(scores_BG, k=2)[0]] == ["ca.1.1", "ca.0.0"]  # control
    time.sleep(2.0)
    assert [e.uid for e in cached.find_best_experts(scores_BG, k=2)[0]] == ["ca.1.1", "ca.0.0"]


def test_searcher_refuses_bad_arguments(dht_swarm):
    for prefix, grid in (
        ("ffn", (4,)),
        ("ffn.3", (4,)),
        ("ffn.", ()),
        ("ffn.", (0,)),
        ("ffn.", (MAX_GRID_SIZE + 1,)),
    ):
        with pytest.raises(ValidationError):
            MoEBeamSearcher(dht_swarm.boot, prefix, grid)
    with pytest.raises(ValidationError):
        MoEBeamSearcher(dht_swarm.boot, "ffn.", (2,) * (MAX_GRID_DIMS + 1))
    searcher = MoEBeamSearcher(dht_swarm.boot, "ffn.", (4, 4))
    for scores_BG, k, beam_size in (
        ([torch.zeros(2, 4)], 1, None),  # one dimension short
        ([torch.zeros(2, 4), torch.zeros(3, 4)], 1, None),  # batch sizes differ
        ([torch.zeros(2, 4), torch.zeros(2, 5)], 1, None),  # wrong grid size
        ([torch.zeros(2, 4), torch.zeros(2, 4)], 0, None),
        ([torch.zeros(2, 4), torch.zeros(2, 4)], 4, 2),  # beam narrower than k
    ):
        with pytest.raises(ValidationError):
            searcher.find_best_experts(scores_BG, k, beam_size=beam_size)
    assert searcher.find_best_experts([torch.zeros(2, 4), torch.zeros(2, 4)], 2) == [
        [],
        [],
    ]  # nobody declared
    assert isinstance(Expert("ffn.0.0", (0, 0), 0.0, ()), tuple)
