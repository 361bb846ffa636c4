"""Peers come and go: block choice, rebalancing, latency-aware routing, bans, and failover that keeps the output.

Every swarm here is real: a bootstrap node and peers as processes on 127.0.0.1 serving a random-weight 4-block
Llama. Peers announce a fixed ``--throughput`` so the balancing decisions do not depend on this machine's noise.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm, SwarmProcess
from swarm_peer.dht import ServerState, get_block_servers

from .conftest import client_settings, reference_model

FIXED = ["--throughput", "100", "--rebalance-period", "0"]
PROMPT = torch.tensor([[5, 17, 42, 9, 77, 3]])
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def path(tiny_checkpoints) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def want(path) -> torch.Tensor:
    """Greedy tokens of local transformers: what every run below must produce, failures or not."""
    return reference_model(path).generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


def _client(path: str, swarm: LocalSwarm, **settings):
    return DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm, **settings))


def _peer(swarm: LocalSwarm, peer_id) -> SwarmProcess:
    return next(peer for peer in swarm.peers if peer.peer_id == str(peer_id))


def _kill(peer: SwarmProcess) -> None:
    """kill -9 of the peer's whole process group (its DHT process and p2pd too): no goodbye, no OFFLINE record."""
    os.killpg(peer.process.pid, signal.SIGKILL)
    peer.process.wait(10)


class _KillAfter:
    """A generate() streamer that kills the first peer of the session's route after ``tokens`` new tokens."""

    def __init__(self, model, swarm: LocalSwarm, tokens: int):
        self.model, self.swarm, self.tokens, self.calls = model, swarm, tokens, 0
        self.killed = None
        self.route_before: list = []

    def put(self, value) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == self.tokens + 1:
            session = self.model._active_session
            self.route_before = session.route
            self.killed = self.route_before[0].peer_id
            _kill(_peer(self.swarm, self.killed))

    def end(self) -> None:
        pass


def _generate_killing_a_peer(path, swarm, want):
    model = _client(path, swarm, retry_timeout=60)
    try:
        streamer = _KillAfter(model, swarm, tokens=5)
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
            route_after = session.route
        assert streamer.killed is not None, "the peer was never killed"
        assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"
        assert streamer.killed not in [hop.peer_id for hop in route_after], "the dead peer is still routed"
        assert model.router.health.is_banned(streamer.killed)
        return streamer.route_before, route_after
    finally:
        model.shutdown()


@pytest.mark.timeout(240)
def test_failover_to_a_peer_with_the_same_span(path, want):
    with LocalSwarm(path, [(0, 4), (0, 4)], peer_args=FIXED) as swarm:
        before, after = _generate_killing_a_peer(path, swarm, want)
    assert len(before) == 1 and len(after) == 1 and before[0].peer_id != after[0].peer_id


@pytest.mark.timeout(240)
def test_failover_to_two_peers_that_split_the_span(path, want):
    with LocalSwarm(path, [(0, 4), (0, 2), (2, 4)], peer_args=FIXED) as swarm:
        before, after = _generate_killing_a_peer(path, swarm, want)
    assert [(hop.start, hop.end) for hop in before] == [(0, 4)]  # one hop is the shortest route
    assert [(hop.start, hop.end) for hop in after] == [(0, 2), (2, 4)]  # rebuilt on two peers by replay


@pytest.mark.timeout(180)
def test_joining_peer_takes_the_gap(path):
    with LocalSwarm(path, [(0, 2)], peer_args=FIXED) as swarm:
        assert swarm.add_peer(extra_args=["--num-blocks", "2"]).blocks == (2, 4)
        assert swarm.add_peer(extra_args=["--num-blocks", "1"]).blocks in {(0, 1), (1, 2), (2, 3), (3, 4)}


def _spans(model) -> dict[str, tuple[int, int]]:
    """peer id -> span, as the DHT shows ONLINE peers now."""
    spans = {}
    for peers in get_block_servers(model.swarm.dht, model.model_id, range(4)):
        for peer_id, info in peers.items():
            if info.state == ServerState.ONLINE:
                spans[str(peer_id)] = (info.start_block, info.end_block)
    return spans


def _wait_for(predicate, timeout: float, what: str, period: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)


REBALANCING = ["--throughput", "100", "--rebalance-period", "2", "--announce-period", "2"]


@pytest.mark.timeout(240)
def test_rebalancing_moves_one_peer_to_the_weak_span_then_stays(path):
    # blocks 0:2 are served 3x, blocks 2:4 once: the bottleneck is 2:4
    with LocalSwarm(path, [(0, 2), (0, 2), (0, 2), (2, 4)], peer_args=REBALANCING) as swarm:
        model = _client(path, swarm)
        try:

            def balanced():
                spans = _spans(model)
                counts = sorted(list(spans.values()).count(span) for span in [(0, 2), (2, 4)])
                return counts == [2, 2] and len(spans) == 4 and spans

            settled = _wait_for(balanced, 90, "one peer to move to blocks 2:4")
            # a balanced swarm does not move: watch several rebalancing periods
            time.sleep(12)
            assert _spans(model) == settled
        finally:
            model.shutdown()


@pytest.mark.timeout(240)
def test_balanced_swarm_never_moves(path):
    with LocalSwarm(path, [(0, 2), (2, 4), (0, 2), (2, 4)], peer_args=REBALANCING) as swarm:
        model = _client(path, swarm)
        try:
            first = _wait_for(lambda: len(s := _spans(model)) == 4 and s, 30, "all peers announced")
            time.sleep(12)  # about 6 rebalancing periods of each peer
            assert _spans(model) == first
        finally:
            model.shutdown()


@pytest.mark.timeout(240)
def test_rebalancing_during_a_live_session_keeps_it_going(path, want):
    args = [
        "--throughput",
        "100",
        "--rebalance-period",
        "2",
        "--announce-period",
        "2",
        "--shutdown-grace",
        "1",
    ]
    with LocalSwarm(path, [(0, 2), (2, 4)], peer_args=args) as swarm:
        mover = swarm.peers[0]
        model = _client(path, swarm, retry_timeout=60)
        try:
            with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
                first = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
                assert [str(hop.peer_id) for hop in session.route][0] == mover.peer_id
                # a strong peer on 0:2 makes 2:4 the bottleneck: the old 0:2 peer should move there
                swarm.add_peer(0, 2, extra_args=["--throughput", "1000", "--rebalance-period", "0"])
                _wait_for(lambda: _spans(model).get(mover.peer_id) == (2, 4), 60, "the peer to move to 2:4")

                def first_hop() -> str:
                    return next(str(hop.peer_id) for hop in session.route if hop.start == 0)

                # the mover serves its old session for its grace period (1 s), then hands it back on the next step
                got = first
                while first_hop() == mover.peer_id and got.shape[1] < want.shape[1]:
                    got = model.generate(got, max_new_tokens=1, do_sample=False)
                    time.sleep(0.25)
                assert first_hop() != mover.peer_id, "the mover kept its old session past its grace period"
                if got.shape[1] < want.shape[1]:
                    got = model.generate(got, max_new_tokens=want.shape[1] - got.shape[1], do_sample=False)
        finally:
            model.shutdown()
    assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"


@pytest.mark.timeout(180)
def test_routing_prefers_the_lower_latency_chain(path):
    with LocalSwarm(path, [(0, 2), (2, 4)], peer_args=FIXED) as swarm:
        slow = swarm.add_peer(0, 4, extra_args=["--added-latency", "0.05"])
        model = _client(path, swarm)
        try:
            route = model.router.inference_route()
            # control: the slow peer alone is the fewest-hops chain, which a latency-blind router would pick
            assert [(hop.start, hop.end) for hop in route] == [(0, 2), (2, 4)]
            assert slow.peer_id not in [str(hop.peer_id) for hop in route]
            slow_rtt = model.router.health.rtt(next(p for p in _peer_ids(model) if str(p) == slow.peer_id))
            assert slow_rtt is not None and slow_rtt > 0.04  # measured, not assumed
        finally:
            model.shutdown()


def _peer_ids(model):
    return {peer for peers in get_block_servers(model.swarm.dht, model.model_id, range(4)) for peer in peers}


@pytest.mark.timeout(180)
def test_a_failing_peer_is_banned_until_its_ban_expires(path):
    with LocalSwarm(path, [(0, 4)], peer_args=FIXED) as swarm:
        # announced and ONLINE, but every call to it times out (its replies take longer than the ping timeout)
        dead = swarm.add_peer(0, 4, extra_args=["--added-latency", "30"])
        model = _client(path, swarm, ban_seconds=3)
        pinged = []
        real_ping = model.swarm.ping

        def counting_ping(peers, timeout=2.0):
            peers = list(peers)
            pinged.extend(str(peer) for peer in peers)
            return real_ping(peers, timeout)

        model.swarm.ping = counting_ping
        try:
            route = model.router.inference_route()
            assert [str(hop.peer_id) for hop in route] != [dead.peer_id]
            assert pinged.count(dead.peer_id) == 1
            t_banned = time.monotonic()
            while time.monotonic() - t_banned < 0.5:  # banned: never tried again
                model.router.inference_route()
            assert pinged.count(dead.peer_id) == 1
            dead_id = next(p for p in _peer_ids(model) if str(p) == dead.peer_id)
            # once the ban has expired, the peer is tried again, fails, and is banned twice as long
            _wait_for(
                lambda: not model.router.health.is_banned(dead_id), 10, "the ban to expire", period=0.05
            )
            model.router.inference_route()
            assert pinged.count(dead.peer_id) == 2
            assert model.router.health.failures(dead_id) == 2
        finally:
            model.shutdown()


@pytest.mark.timeout(240)
def test_failover_of_a_hop_that_dies_before_it_answers_a_pushed_step(path, want):
    """The last hop dies after the step was pushed to it and before it answered: the session holds only the first
    hop's input of that step, and nothing tells it the peer is gone (a stream reports a lost peer when it is
    written to). Once the step is far slower than the ones before, the session relays it hop by hop: the hops that
    computed it answer with their saved outputs (their caches must not take it twice), the write to the dead hop
    fails, and its replacement computes the step. The request timeout (60 s) is longer than the retry budget
    here (30 s): waiting it out instead would leave no time to fail over."""
    with LocalSwarm(path, [(0, 1), (1, 3)], peer_args=FIXED) as swarm:
        # it answers each step 0.3 s after it took it: time to kill it in between
        slow = swarm.add_peer(3, 4, extra_args=["--added-latency", "0.3"])
        model = _client(path, swarm, retry_timeout=30)
        try:
            with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
                first = model.generate(PROMPT, max_new_tokens=5, do_sample=False)
                assert str(session.route[-1].peer_id) == slow.peer_id
                healthy = session._streams[:-1]
                spare = swarm.add_peer(3, 4)
                _wait_for(lambda: spare.peer_id in _spans(model), 30, "the spare peer to be announced")
                killer = threading.Timer(0.15, _kill, [slow])  # during the next step
                killer.start()
                got = model.generate(first, max_new_tokens=NEW_TOKENS - 5, do_sample=False)
                killer.join()
                route_after = [str(hop.peer_id) for hop in session.route]
                # the healthy hops kept their sessions: none was blamed for the dead one's silence
                assert all(a is b for a, b in zip(session._streams[:-1], healthy, strict=True))
        finally:
            model.shutdown()
    assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"
    assert route_after[-1] == spare.peer_id
