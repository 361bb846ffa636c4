"""Health of a swarm-peer container (the Dockerfiles' HEALTHCHECK): checks what the container's command serves.

    python /opt/swarm-peer/healthcheck.py [PID]    # exit 0: healthy; 1: not, and one line says why

The command is read from /proc (process PID; by default the oldest ``swarm-peer`` process of the container) and
parsed by swarm-peer's own CLI parser, so the check follows the options the container was started with:

    dht      its --port accepts TCP connections: the libp2p listener other nodes bootstrap from is up
    join     with --metrics-port: GET /metrics answers 200 (the peer process serves); without it, its --port
             accepts TCP connections (its p2p daemon is up); with neither, that the process lives is all it checks
    api      GET /health answers 200: every block of the model is served by some peer (else 503: the API
             could not complete a request, so the container is unhealthy until the swarm covers the model again)
    monitor  GET /api/v1/state answers 200: the monitor serves its snapshot of the swarm
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request

TIMEOUT = 10.0  # seconds for one connection or request; the HEALTHCHECK's own --timeout is larger


def swarm_peer_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``swarm-peer`` in a process's argv (a console script or ``python -m``), else None."""
    for i, arg in enumerate(argv[:2]):
        if os.path.basename(arg) == "swarm-peer":
            return argv[i + 1 :]
    if argv[1:3] == ["-m", "swarm_peer.cli.main"]:
        return argv[3:]
    return None


def read_argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [arg.decode(errors="replace") for arg in f.read().split(b"\0")[:-1]]


def find_command() -> list[str]:
    """The arguments of the oldest ``swarm-peer`` process here (its DHT process, a fork, comes after it)."""
    for pid in sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            args = swarm_peer_args(read_argv(pid))
        except OSError:  # it exited meanwhile
            continue
        if args:
            return args
    raise LookupError("no swarm-peer process runs here")


def parse(args: list[str]) -> tuple[str, dict]:
    """(subcommand, its parameters) as swarm-peer's CLI parses ``args``."""
    from swarm_peer.cli.main import cli

    while args and args[0].startswith("-"):  # the group's own options (-v)
        args = args[1:]
    if not args or args[0] not in cli.commands:
        raise LookupError(f"not a swarm-peer command: {' '.join(args)!r}")
    name = args[0]
    return name, cli.commands[name].make_context(name, args[1:], resilient_parsing=True).params


def local_host(host: str) -> str:
    """Where to reach a server listening on ``host`` from inside its container."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def check_tcp(host: str, port: int) -> str:
    with socket.create_connection((local_host(host), port), timeout=TIMEOUT):
        return f"port {port} accepts connections"


def check_http(host: str, port: int, path: str) -> str:
    host = local_host(host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return f"GET {url}: {response.status}"
    except urllib.error.HTTPError as e:  # 503 from /health: its body names the missing blocks
        raise OSError(f"GET {url}: {e.code} {e.read(500).decode(errors='replace')}") from None


def check(name: str, params: dict) -> str:
    """One line saying what is healthy; ``OSError`` (or ``LookupError``) saying what is not."""
    host, port = params.get("host") or "127.0.0.1", params.get("port")
    if name == "api":
        return check_http(host, port, "/health")
    if name == "monitor":
        return check_http(host, port, "/api/v1/state")
    if name == "join" and params.get("metrics_port"):
        return check_http(host, params["metrics_port"], "/metrics")
    if name in ("dht", "join") and port:
        return check_tcp(host, port)
    if name == "join":
        return "the peer runs (give it --port or --metrics-port for a real check)"
    raise LookupError(f"no health check for `swarm-peer {name}`")


def main(argv: list[str]) -> int:
    try:
        args = swarm_peer_args(read_argv(int(argv[1]))) if len(argv) > 1 else find_command()
        if args is None:
            raise LookupError(f"process {argv[1]} does not run swarm-peer")
        name, params = parse(args)
        if name in ("api", "monitor") and not params.get("port"):
            raise LookupError(f"`swarm-peer {name} --port 0` listens on a port chosen at start: give --port")
        print(f"healthy: swarm-peer {name}: {check(name, params)}")
        return 0
    except (OSError, LookupError) as e:
        print(f"unhealthy: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
