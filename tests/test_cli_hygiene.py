"""The command line's hygiene, as a user meets it: one-line errors for bad or unreachable ``--initial-peers``,
no wait without them, one node per port and per identity, and no processes left behind by ``kill -9``.

Every process is a real ``swarm-peer`` command; every wait is bounded.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from swarm_peer.cli.local_swarm import LocalSwarm, SwarmProcess

from .conftest import free_port, run_cli
from .processes import alive, cmdline, descendants

NOBODY = (
    "/ip4/127.0.0.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"  # nothing listens on port 1
)
QUICK = 40.0  # seconds: a failing command's bound, start-up included, on a loaded 2-core machine
GONE_WITHIN = 10.0  # seconds for a killed process's children to follow it


def _assert_one_line_error(result: subprocess.CompletedProcess, started: float) -> None:
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert elapsed < QUICK, f"took {elapsed:.1f} s"


def _commands(checkpoint: str) -> dict[str, list[str]]:
    return {
        "dht": ["dht"],
        "join": ["join", checkpoint, "--blocks", "0:1", "--throughput", "100"],
        "generate": ["generate", checkpoint, "hello", "--max-new-tokens", "1"],
        "status": ["status"],
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["dht", "join", "generate", "status"])
def test_bad_or_unreachable_initial_peers_give_a_one_line_error(tiny_checkpoints, command):
    args = _commands(tiny_checkpoints["llama"])[command]
    for peer, message in [("garbage", "is not a peer's multiaddr"), (NOBODY, "cannot join the swarm")]:
        started = time.monotonic()
        result = run_cli(*args, "--initial-peers", peer, timeout=QUICK + 30)
        _assert_one_line_error(result, started)
        assert message in result.stderr, result.stderr[-3000:]


@pytest.mark.timeout(60)
def test_generate_without_initial_peers_fails_at_once(tiny_checkpoints):
    started = time.monotonic()
    result = run_cli("generate", tiny_checkpoints["llama"], "hello", timeout=30)
    assert time.monotonic() - started < 5
    assert result.returncode != 0 and "--initial-peers" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(180)
def test_second_node_on_a_port_or_with_an_identity_fails(tmp_path, tiny_checkpoints):
    port, identity = free_port(), str(tmp_path / "peer.id")
    bootstrap_args = ["--port", str(port), "--identity", identity]
    with LocalSwarm(tiny_checkpoints["llama"], [], bootstrap_args=bootstrap_args) as swarm:
        for args, message in [
            (["--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
            (["--identity", identity], f"identity file {identity} is in use"),
        ]:
            started = time.monotonic()
            result = run_cli("dht", *args, timeout=QUICK + 30)
            _assert_one_line_error(result, started)
            assert message in result.stderr, result.stderr[-3000:]
        assert swarm.processes[0].process.poll() is None, "the first node died"


def _kill_9_leaves_nothing(proc: SwarmProcess) -> None:
    family = descendants(proc.process.pid)
    assert any(cmdline(pid).endswith("p2pd") for pid in family), [cmdline(p) for p in family]
    proc.process.send_signal(signal.SIGKILL)  # the process alone, as the OOM killer or `kill -9 PID` does
    proc.process.wait(10)
    deadline = time.monotonic() + GONE_WITHIN
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: cmdline(pid) for pid in alive(family)}
    assert not left, f"still running after kill -9 of their parent: {left}"


@pytest.mark.timeout(240)
def test_kill_9_of_join_or_dht_leaves_no_children(tiny_checkpoints):
    with LocalSwarm(tiny_checkpoints["llama"], [(0, 4)], peer_args=["--throughput", "100"]) as swarm:
        _kill_9_leaves_nothing(swarm.peers[0])  # `swarm-peer join`: its DHT process and p2pd
        _kill_9_leaves_nothing(swarm.processes[0])  # `swarm-peer dht`, the bootstrap node


@pytest.mark.timeout(120)
def test_output_is_our_own_lines_unless_verbose(tiny_checkpoints):
    with LocalSwarm(tiny_checkpoints["llama"], [(0, 4)], peer_args=["--throughput", "100"]) as swarm:
        peer, boot = swarm.peers[0], swarm.processes[0]
        assert peer.ready_line.startswith("Serving blocks 0:4")  # stdout: the one line a script reads
        for log in (peer.log_tail(), boot.log_tail()):  # stderr: nothing while all goes well
            assert "INFO" not in log and "Serving blocks" not in log and "Created a DHT" not in log, log
    verbose = run_cli("-v", "dht", "--initial-peers", NOBODY, timeout=QUICK + 30)
    assert "DEBUG" in verbose.stderr, verbose.stderr[-3000:]
