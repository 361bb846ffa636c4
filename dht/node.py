"""Creating a swarm DHT node, and calling into its process with a bounded wait.

``create_dht`` starts a ``hivemind.DHT`` whose peer id and record-signing key are one RSA key (see
``identity``), with the validators every swarm node needs::

    dht = create_dht(initial_peers=["/ip4/10.0.0.1/tcp/31337/p2p/Qm..."], identity_path="peer.id", port=31337)
    try:
        print(visible_maddrs(dht))
    finally:
        dht.shutdown()

hivemind runs the DHT in a forked process; requests travel over a pipe. Known limits (hivemind 1.1.12):
create the DHT from the main thread, before starting threads or CUDA; keep each request well under 16 KiB
(the DHT process dies on larger ones); ``run_coroutine`` needs a module-level function (a closure kills the
DHT process) — ``run_in_dht`` takes one plus keyword arguments and bounds the wait.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from swarm_peer.dht.identity import load_identity, peer_id_from_public_key, public_key_bytes, write_identity
from swarm_peer.dht.keys import peer_subkey
from swarm_peer.dht.process import SwarmDHT, check_port_free, lock_identity
from swarm_peer.dht.validation import SwarmRecordValidator
from swarm_peer.errors import SwarmError, ValidationError

__all__ = [
    "DEFAULT_TIMEOUT",
    "create_dht",
    "local_identity",
    "local_peer_id",
    "local_subkey",
    "request_chunks",
    "run_in_dht",
    "validate_initial_peers",
    "visible_maddrs",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds; the bound of every DHT call that is not given one
_GRACE = 1.0  # extra seconds the caller waits beyond a coroutine's own timeout (pipe round trip)
ReturnType = TypeVar("ReturnType")
Item = TypeVar("Item")


@dataclass(frozen=True)
class _Signer:
    """The swarm identity of a DHT created by ``create_dht``."""

    peer_id: PeerID
    owner_marker: bytes  # RSASignatureValidator.local_public_key
    private_key: RSAPrivateKey  # the identity: signs records and statements (e.g. ``protocols.verification``)


_SIGNERS: weakref.WeakKeyDictionary[hivemind.DHT, _Signer] = weakref.WeakKeyDictionary()
# mp.Connection.send is not thread-safe; sends under PIPE_BUF are atomic, but a lock costs nothing here
_SEND_LOCK = threading.Lock()


def create_dht(
    *,
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | None = None,
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    use_relay: bool = True,
    use_auto_relay: bool = False,
    start: bool = True,
    timeout: float | None = None,
    **kwargs: Any,
) -> hivemind.DHT:
    """Start (unless ``start=False``) a DHT node that can sign, validate and announce swarm records.

    - listens on ``/ip4/{host}/tcp/{port}`` (``/ip6/`` for an IPv6 ``host``; port 0 = any free port);
    - ``identity_path``: a libp2p identity file with an RSA key (created if missing) that fixes the peer id
      across restarts and signs this peer's records; without it, a fresh key is used for this node only;
    - ``client_mode``: the node makes requests but serves none (for peers behind NAT and for clients);
    - record validators: ``RSASignatureValidator`` with the identity key, then ``SwarmRecordValidator``,
      then any ``record_validators`` passed in ``kwargs``;
    - other ``kwargs`` go to ``hivemind.DHT`` / ``DHTNode.create`` / ``P2P.create``.

    Raises ``ValidationError`` for a bad host, a port in use, a malformed initial peer (``validate_initial_peers``),
    a bad identity file or one that another live peer uses (``process.lock_identity``); ``SwarmError`` if the
    node fails to start or to reach any initial peer within ``timeout`` (default: hivemind's own bounds, about
    15 s for the daemon and a few seconds for the initial peers). The DHT process and its p2p daemon end with
    the calling process (``process.SwarmDHT``).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError as e:
        raise ValidationError(f"host must be an IP address, got {host!r}") from e
    if type(port) is not int or not 0 <= port < 65536:
        raise ValidationError(f"port must be an int in [0, 65536), got {port!r}")
    host_maddr = f"/ip{address.version}/{host}/tcp/{port}"
    initial_peers = validate_initial_peers(initial_peers)
    check_port_free(host, port)

    temp_dir = identity_lock = None
    if identity_path is not None:
        private_key = load_identity(identity_path)
        identity_lock = lock_identity(identity_path)
    else:
        # p2pd reads its identity from a file: write a fresh key to a private temporary one
        private_key = RSAPrivateKey()
        temp_dir = tempfile.mkdtemp(prefix="swarm-peer-identity-")
        identity_path = os.path.join(temp_dir, "identity")
        write_identity(private_key, identity_path)
        kwargs.setdefault("check_if_identity_free", False)  # a fresh key cannot be taken

    signature_validator = RSASignatureValidator(private_key)
    validators = [signature_validator, SwarmRecordValidator(), *kwargs.pop("record_validators", ())]
    signer = _Signer(
        peer_id=peer_id_from_public_key(public_key_bytes(private_key)),
        owner_marker=signature_validator.local_public_key,
        private_key=private_key,
    )
    await_ready = kwargs.pop("await_ready", True)
    dht = SwarmDHT(
        initial_peers=initial_peers or None,
        start=False,
        host_maddrs=[host_maddr],
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=identity_path,
        client_mode=client_mode,
        use_relay=use_relay,
        use_auto_relay=use_auto_relay,
        record_validators=validators,
        identity_lock=identity_lock,
        **kwargs,
    )
    try:
        if start:
            dht.run_in_background(await_ready=await_ready, timeout=timeout)
    except BaseException as e:
        dht.shutdown()  # a node still starting after the timeout is stopped; this also releases the identity
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if isinstance(e, _START_ERRORS):
            raise _start_error(e, initial_peers, host_maddr) from e
        raise
    _SIGNERS[dht] = signer
    if temp_dir is not None:
        if start and await_ready:
            shutil.rmtree(temp_dir, ignore_errors=True)  # the daemon has read it
        else:
            weakref.finalize(dht, shutil.rmtree, temp_dir, ignore_errors=True)
    logger.info(
        "Created a DHT node %s listening on %s (client_mode=%s)", signer.peer_id, host_maddr, client_mode
    )
    return dht


# what hivemind raises when its p2p daemon does not start (a port taken, initial peers that do not answer), when
# no initial peer answers the DHT's ping (RuntimeError), or when the node is not ready within the timeout
_START_ERRORS = (P2PDaemonError, RuntimeError, TimeoutError)


def _start_error(e: BaseException, initial_peers: Sequence[str], host_maddr: str) -> SwarmError:
    """One line saying why the node did not start; p2pd's reasons come after a log timestamp, which goes."""
    where = f"join the swarm at {' '.join(initial_peers)}" if initial_peers else f"listen on {host_maddr}"
    reason = str(e).splitlines()[-1] if str(e) else "no answer in time"
    reason = re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", reason)
    return SwarmError(f"cannot {where}: {reason}")


def validate_initial_peers(initial_peers: Sequence[str]) -> list[str]:
    """Return ``initial_peers`` as a list if each is a peer's multiaddr (with ``/p2p/<peer id>``).

    Raises ``ValidationError`` naming the first one that is not, e.g. ``garbage`` or ``/ip4/10.0.0.1/tcp/5``.
    """
    for maddr in initial_peers:
        try:
            Multiaddr(maddr)["p2p"]
        except (ValueError, LookupError, TypeError) as e:
            raise ValidationError(
                f"{maddr!r} is not a peer's multiaddr like /ip4/10.0.0.1/tcp/31337/p2p/Qm... ({e})"
            ) from None
    return list(initial_peers)


def _signer(dht: hivemind.DHT) -> _Signer:
    signer = _SIGNERS.get(dht)
    if signer is None:
        raise ValidationError(
            "this DHT was not created by swarm_peer.dht.create_dht: it cannot sign swarm records"
        )
    return signer


def local_peer_id(dht: hivemind.DHT) -> PeerID:
    """The peer id of a DHT made by ``create_dht``, without a round trip to its process."""
    return _signer(dht).peer_id


def local_identity(dht: hivemind.DHT) -> RSAPrivateKey:
    """The identity key of a DHT made by ``create_dht`` (its public key is the peer id)."""
    return _signer(dht).private_key


def local_subkey(dht: hivemind.DHT) -> bytes:
    """The subkey this peer owns in every swarm key: ``peer_subkey(peer id, owner marker)``.

    Raises ``ValidationError`` if ``dht`` was not made by ``create_dht`` (its key and peer id are unknown).
    """
    signer = _signer(dht)
    return peer_subkey(signer.peer_id, signer.owner_marker)


def run_in_dht(
    dht: hivemind.DHT,
    fn: Callable[..., Awaitable[ReturnType]],
    *,
    timeout: float,
    **kwargs: Any,
) -> ReturnType:
    """Run ``await fn(dht, node, timeout=timeout, **kwargs)`` in the DHT process and return its result.

    ``fn`` must be a module-level coroutine function (hivemind pickles it by reference; a closure kills the
    DHT process), and should bound its own work by ``timeout``. Keep ``kwargs`` small (< 4 KiB pickled).
    Raises ``TimeoutError`` if no result arrives within ``timeout`` plus a second of grace, and whatever
    ``fn`` raised otherwise.
    """
    with _SEND_LOCK:
        future = dht.run_coroutine(partial(fn, timeout=timeout, **kwargs), return_future=True)
    try:
        return future.result(timeout=timeout + _GRACE)
    except TimeoutError:
        # not future.cancel(): the DHT process would then fail to set the late result and log an error
        raise TimeoutError(f"the DHT did not answer {fn.__name__} within {timeout + _GRACE:.1f} s") from None


def request_chunks(items: Iterable[Item], size: Callable[[Item], int], budget: int) -> list[list[Item]]:
    """``items`` in order, cut into lists whose ``size`` adds up to at most ``budget`` bytes (an item larger than
    the budget goes alone): the arguments of requests to the DHT process, which must stay under 4 KiB each."""
    chunks: list[list[Item]] = []
    used = budget
    for item in items:
        if used + size(item) > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += size(item)
    return chunks


async def _visible_maddrs(_dht: hivemind.DHT, node: hivemind.DHTNode, *, timeout: float) -> list[str]:
    return [str(maddr) for maddr in await node.get_visible_maddrs()]


def visible_maddrs(dht: hivemind.DHT, *, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Multiaddrs (with ``/p2p/<peer id>``) other peers can use as ``initial_peers`` to reach ``dht``."""
    return run_in_dht(dht, _visible_maddrs, timeout=timeout)
