"""The DHT's process and what it holds: it dies with the process that made it, and owns its identity and port.

hivemind runs a DHT in a forked process (``hivemind.DHT`` is a ``ForkProcess``), which starts the p2p daemon
``p2pd`` as its own child (``P2P.create``, asyncio's ``create_subprocess_exec``). A normal ``shutdown()`` stops
both; but a parent killed with SIGKILL leaves them running for good, still listening and answering pings.
``SwarmDHT`` (what ``create_dht`` starts) closes that gap from inside the DHT process, without touching
hivemind:

- a watchdog thread notices when its parent is gone (``os.getppid()`` changed: the orphan was re-parented) and
  ends the process, its p2p daemon first (``_exit_with_children``), within ``WATCHDOG_PERIOD`` seconds;
- SIGTERM (what hivemind's ``shutdown()`` sends a DHT that does not stop in time) ends it the same way, where
  Python's default would leave the daemon behind.

Two processes must not be one peer: ``lock_identity`` takes an exclusive ``flock`` on the identity file for as
long as the DHT lives (the DHT process inherits it, so it outlives a killed parent only as long as the DHT
process does), and ``check_port_free`` refuses a TCP port that something already listens on (``p2pd`` binds
with SO_REUSEPORT, so a second daemon on the same port would start and share the port with the first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import threading
import time
import weakref
from typing import IO

import hivemind

from swarm_peer.errors import ValidationError

__all__ = ["WATCHDOG_PERIOD", "SwarmDHT", "check_port_free", "exit_when_orphaned", "lock_identity"]

logger = logging.getLogger(__name__)

WATCHDOG_PERIOD = 0.5  # seconds between the DHT process's checks that its parent is alive
_CHILD_GRACE = 1.0  # seconds the p2p daemon gets to exit on SIGTERM before SIGKILL

# identity lock of every SwarmDHT of this process; a DHT process closes the copies it inherited of the others'
_IDENTITY_LOCKS: weakref.WeakKeyDictionary[SwarmDHT, IO[bytes]] = weakref.WeakKeyDictionary()


class SwarmDHT(hivemind.DHT):
    """A ``hivemind.DHT`` whose process and p2p daemon end when the creating process ends, however it ends.

    ``identity_lock`` (from ``lock_identity``) is held until ``shutdown()`` and by the DHT process while it runs.
    """

    def __init__(self, *args, identity_lock: IO[bytes] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if identity_lock is not None:
            _IDENTITY_LOCKS[self] = identity_lock

    def run(self) -> None:  # in the DHT process
        for dht, lock in list(_IDENTITY_LOCKS.items()):
            if dht is not self:
                lock.close()  # another DHT's lock, inherited by fork: it is not this process's to hold
        signal.signal(signal.SIGTERM, lambda *_: _exit_with_children())
        parent = self._parent_pid
        threading.Thread(
            target=exit_when_orphaned, args=(parent,), name="swarm-dht-watchdog", daemon=True
        ).start()
        super().run()

    def shutdown(self) -> None:
        super().shutdown()
        lock = _IDENTITY_LOCKS.pop(self, None)
        if lock is not None:
            lock.close()


def exit_when_orphaned(parent_pid: int) -> None:
    """Run in a thread of a child process (a DHT's, an averager's): ends that process, and its own children,
    within ``WATCHDOG_PERIOD`` seconds of its parent ``parent_pid`` ending."""
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_PERIOD)
    logger.warning("The process that started this one is gone: stopping it and its children")
    _exit_with_children()


def _exit_with_children() -> None:
    """End this process's children (the p2p daemon): SIGTERM, then SIGKILL after a grace period; then exit."""
    children = _child_pids(os.getpid())
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _CHILD_GRACE
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        children = [pid for pid in children if _is_running(pid)]
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os._exit(0)


def _child_pids(pid: int) -> list[int]:
    """The pids of the live children of ``pid`` (from /proc: the parent pid is the 4th field of ``stat``)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ")"
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            children.append(int(entry))
    return children


def _is_running(pid: int) -> bool:
    """Whether ``pid`` (a child of this process) still runs; reaps it if it has exited."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def lock_identity(identity_path: str) -> IO[bytes]:
    """Take an exclusive lock on the identity file; the lock lasts until the returned file is closed.

    Raises ``ValidationError`` if another process (or another DHT of this one) holds it: two live peers with one
    identity would be one peer id at two addresses, each overwriting the other's records.
    """
    lock = open(identity_path, "rb")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValidationError(
                f"the identity file {identity_path} is in use by another running peer; "
                f"give each peer its own --identity"
            ) from None
        raise
    return lock


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValidationError`` if something listens on TCP ``host:port`` (port 0 always passes).

    Binds a probe socket without SO_REUSEPORT: it fails while any socket (a p2p daemon's included) listens there.
    SO_REUSEADDR lets it pass over connections of a stopped node still in TIME_WAIT. A node that binds the port
    between this check and the start of its daemon is not caught.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValidationError(f"port {port} on {host} is in use by another process") from None
            raise ValidationError(f"cannot listen on {host}:{port}: {e.strerror}") from None
