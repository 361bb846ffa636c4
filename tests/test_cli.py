"""The command line as a user runs it: the demo end to end, a graceful leave, and clear errors for bad args."""

from __future__ import annotations

import time

import pytest

from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.dht import ServerState, create_dht, get_block_servers
from swarm_peer.models import resolve_checkpoint

from .conftest import run_cli


def _cli(*args, timeout=120):
    return run_cli(*args, timeout=timeout)


@pytest.mark.timeout(400)
def test_demo_runs_end_to_end(smollm2_path):
    result = _cli("demo", "--max-new-tokens", "12", timeout=360)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0:10" in result.stderr and "10:20" in result.stderr and "20:30" in result.stderr
    assert "tokens/s through 3 peers" in result.stderr
    assert "Paris" in result.stdout, result.stdout  # SmolLM2-Instruct answers the default question


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, message",
    [
        (["join", "smollm2", "--blocks", "5:3"], "START < END"),
        (["join", "smollm2", "--blocks", "abc"], "expected START:END"),
        (["join", "/nonexistent/model", "--blocks", "0:1"], "neither 'smollm2' nor a checkpoint directory"),
        (["join", "smollm2", "--dtype", "int8"], "int8"),
    ],
)
def test_bad_arguments_get_clear_errors(args, message):
    result = _cli(*args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


@pytest.mark.timeout(120)
def test_sigterm_announces_offline_and_exits_cleanly(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    model_id = resolve_checkpoint(path).model_id
    with LocalSwarm(path, [(0, 4)]) as swarm:
        dht = create_dht(initial_peers=swarm.initial_peers, client_mode=True)
        try:
            (servers,) = get_block_servers(dht, model_id, [0])
            assert [info.state for info in servers.values()] == [ServerState.ONLINE]
            peer = swarm.peers[0]
            peer.process.terminate()  # SIGTERM to the peer alone
            assert peer.process.wait(30) == 0
            deadline = time.monotonic() + 10
            while True:
                (servers,) = get_block_servers(dht, model_id, [0])
                if [info.state for info in servers.values()] == [ServerState.OFFLINE]:
                    break
                assert time.monotonic() < deadline, f"record still says {servers}"
                time.sleep(0.2)
        finally:
            dht.shutdown()
