"""A swarm spread over several hosts: bootstrap node, two peers and a client, each in its own network namespace.

    namespace "hub": bridge br0 (no link to the machine's own network)
      |-- veth -- boot    10.231.0.1:31337   swarm-peer dht
      |-- veth -- peer0   10.231.0.2:31337   swarm-peer join --blocks 0:2
      |-- veth -- peer1   10.231.0.3:31337   swarm-peer join --blocks 2:4
      `-- veth -- client  10.231.0.4         python -m tests.test_multihost (this file, as the client program)

Each namespace has its own loopback, so a peer that announced 127.0.0.1 could not be reached from another one;
and since the bridge lives in a namespace of its own, the subnet cannot clash with the machine's networks.
Creating namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2: the test is skipped without them.
Teardown ends every process the test started (their p2pd daemons included), then deletes the namespaces, which
deletes their veths and the bridge; the root namespace is never changed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import READY_PREFIX, SwarmProcess
from swarm_peer.dht import get_block_servers
from swarm_peer.settings import ClientSettings, NetworkSettings

from .conftest import reference_model

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PORT = 31337  # every namespace has ports of its own, so one fixed port is free in each
ROLES = ("boot", "peer0", "peer1", "client")
SPANS = {"peer0": (0, 2), "peer1": (2, 4)}  # of the 4-layer tiny llama
PROMPT = [1, 17, 42, 99, 5, 64, 23]
NEW_TOKENS = 8
START_TIMEOUT = 60.0  # seconds for one process to print its ready line
RESULT_PREFIX = "RESULT "

# ``ip netns exec`` checks connectivity from inside a namespace: a refused connection to a port nobody listens
# on (9, discard) proves the other kernel answered; a timeout or "unreachable" means the link is broken.
_PROBE = """
import socket, sys, time
for addr in sys.argv[1:]:
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection((addr, 9), timeout=1).close()
            break
        except ConnectionRefusedError:
            break
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"{addr} is unreachable: {e!r}")
            time.sleep(0.1)
"""


@dataclass(frozen=True)
class Host:
    """One "machine": a network namespace with one address on the shared bridge."""

    role: str
    netns: str
    addr: str

    @property
    def maddr(self) -> str:
        return f"/ip4/{self.addr}/tcp/{PORT}"


def _ip_binary() -> str | None:
    return shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    """Four namespaces on one bridge (see the module docstring), keyed by role; always torn down."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces with `ip netns add`")
    ip = _ip_binary()
    if ip is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    prefix = f"swarmpeer{os.getpid()}"  # unique while this process lives
    hub = f"{prefix}-hub"
    hosts = {role: Host(role, f"{prefix}-{role}", f"10.231.0.{i}") for i, role in enumerate(ROLES, start=1)}
    created: list[str] = []
    try:
        for netns in [hub, *(host.netns for host in hosts.values())]:
            result = _run(ip, "netns", "add", netns, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot create network namespaces (`ip netns add`: {result.stderr.strip()})")
            created.append(netns)
        _run(ip, "-n", hub, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _run(ip, "-n", hub, "link", "set", "br0", "up")
        for i, host in enumerate(hosts.values()):
            # both ends are created directly inside their namespaces: nothing appears in the root namespace
            veth = ["eth0", "netns", host.netns, "type", "veth", "peer", "name", f"v{i}", "netns", hub]
            _run(ip, "link", "add", *veth)
            _run(ip, "-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _run(ip, "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _run(ip, "-n", host.netns, "link", "set", "eth0", "up")
            _run(ip, "-n", host.netns, "link", "set", "lo", "up")
        for host in hosts.values():
            others = [other.addr for other in hosts.values() if other is not host]
            _run(ip, "netns", "exec", host.netns, sys.executable, "-c", _PROBE, *others)
        yield hosts
    finally:
        for netns in reversed(created):
            _kill_leftovers(ip, netns)
            _run(ip, "netns", "delete", netns, check=False)


def _kill_leftovers(ip: str, netns: str) -> None:
    """SIGKILLs whatever still runs in ``netns`` once the process groups are ended.

    Usually that is only torch's ``torch_shm_manager``: it leaves the process group (setsid) and would exit by
    itself a couple of seconds after its last client; anything else left here escaped its process group.
    """
    pids = [int(pid) for pid in _run(ip, "netns", "pids", netns, check=False).stdout.split()]
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            continue
        logger.info("killed %s (%d), left in namespace %s", name, pid, netns)


@pytest.fixture
def spawn(hosts, tmp_path) -> Iterator[Callable[..., SwarmProcess]]:
    """``spawn(host, name, *python_args)`` runs ``python *python_args`` inside ``host``'s namespace.

    Each process gets its own process group (its DHT process and p2pd daemon join it), its stderr goes to
    ``tmp_path/{name}.log``; at teardown each is ended with ``_end``, the last started first.
    """
    ip = _ip_binary()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    processes: list[SwarmProcess] = []

    def spawn(host: Host, name: str, *args: str) -> SwarmProcess:
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "wb") as log:
            # `ip netns exec` enters the namespace and execs the command: the pid and group stay the same
            process = subprocess.Popen(
                [ip, "netns", "exec", host.netns, sys.executable, *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                text=True,
                start_new_session=True,
            )
        proc = SwarmProcess(f"{name} ({host.addr})", process, log_path)
        threading.Thread(target=_pump, args=(process.stdout, proc), daemon=True).start()
        processes.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in reversed(processes):  # peers leave while the bootstrap still runs
            _end(proc, grace=15)


def _end(proc: SwarmProcess, grace: float) -> None:
    """SIGTERMs the process alone, then SIGKILLs its whole group after at most ``grace`` seconds.

    Not SIGTERM to the group: that would also stop the peer's DHT process and p2pd at once, and the peer would
    wait for its OFFLINE announcement until that times out. SIGKILL to the group afterwards reaches what is
    left, even when the leader has exited.
    """
    if proc.process.poll() is None:
        proc.process.terminate()
        try:
            proc.process.wait(grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit within %.0f s of SIGTERM; killing it", proc.name, grace)
    try:
        os.killpg(proc.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.process.wait(5)


def _pump(stream, proc: SwarmProcess) -> None:
    for line in stream:
        proc.lines.put(line.rstrip("\n"))


@pytest.mark.timeout(180)
def test_generation_across_hosts(hosts, spawn, tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    boot, client = hosts["boot"], hosts["client"]
    cli = ["-m", "swarm_peer.cli.main"]

    def network(host: Host) -> list[str]:
        return ["--host", host.addr, "--port", str(PORT), "--announce-maddrs", host.maddr]

    bootstrap = spawn(boot, "bootstrap", *cli, "dht", *network(boot))
    initial_peer = bootstrap.wait_line(lambda line: line.startswith("/ip4/"), START_TIMEOUT)
    assert initial_peer.startswith(boot.maddr + "/p2p/"), initial_peer

    peers = {}
    for role, (start, end) in SPANS.items():
        span = f"{start}:{end}"
        args = ["join", path, "--blocks", span, "--compute-threads", "1", "--initial-peers", initial_peer]
        peers[role] = spawn(hosts[role], f"peer-{start}_{end}", *cli, *args, *network(hosts[role]))
    host_of_peer_id = {}  # from each peer's own "Serving blocks 0:2 of MODEL as PEER_ID" line
    for role, proc in peers.items():
        ready = proc.wait_line(lambda line: line.startswith(READY_PREFIX), START_TIMEOUT)
        host_of_peer_id[ready.rsplit(" as ", 1)[1]] = hosts[role]

    runner = spawn(client, "client", "-m", "tests.test_multihost", path, initial_peer, client.addr)
    want = _greedy(reference_model(path))  # computed here while the client starts
    result = runner.wait_line(lambda line: line.startswith(RESULT_PREFIX), START_TIMEOUT)
    report = json.loads(result.removeprefix(RESULT_PREFIX))

    assert report["tokens"] == want, f"swarm {report['tokens']} != local {want}"
    # the client found both peers in the DHT, each with the span it was told to serve ...
    spans = {peer_id: tuple(span) for peer_id, span in report["spans"].items()}
    assert spans == {peer_id: SPANS[host.role] for peer_id, host in host_of_peer_id.items()}
    # ... and reached each one at the address it announced in its own namespace: an address the client learned
    # from the swarm (it was given only the bootstrap's), and not a loopback one, which would be its own
    for peer_id, host in host_of_peer_id.items():
        addrs = report["connections"].get(peer_id)
        assert addrs, f"the client has no connection to {host.role} ({peer_id}): {report['connections']}"
        assert all(addr.startswith(host.maddr) for addr in addrs), f"{host.role} reached at {addrs}"


def _greedy(model) -> list[int]:
    """``PROMPT`` and the ``NEW_TOKENS`` greedy tokens after it, from a local or a distributed model."""
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    return out[0].tolist()


def _client(model_path: str, initial_peer: str, host: str) -> None:
    """The client program, run in its own namespace: generate through the swarm, then print a RESULT line.

    The line holds the generated tokens, the span each peer announced in the DHT, and the remote address of
    each of the client's libp2p connections, keyed by peer id.
    """
    network = NetworkSettings(initial_peers=(initial_peer,), host=host, client_mode=True)
    model = DistributedModelForCausalLM.from_pretrained(model_path, settings=ClientSettings(network=network))
    try:
        tokens = _greedy(model)
        servers = get_block_servers(model.swarm.dht, model.model_id, range(model.checkpoint.num_blocks))
        connections = model.swarm.run(model.swarm.p2p.list_peers(), timeout=10)
    finally:
        model.shutdown()
    report = {
        "tokens": tokens,
        "spans": {
            str(peer_id): [info.start_block, info.end_block]
            for block in servers
            for peer_id, info in block.items()
        },
        "connections": {str(info.peer_id): [str(addr) for addr in info.addrs] for info in connections},
    }
    print(RESULT_PREFIX + json.dumps(report), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    _client(*sys.argv[1:])
