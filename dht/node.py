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
import shutil
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from swarm_peer.dht.identity import load_identity, peer_id_from_public_key, public_key_bytes, write_identity
from swarm_peer.dht.keys import peer_subkey
from swarm_peer.dht.validation import SwarmRecordValidator
from swarm_peer.errors import ValidationError

__all__ = ["DEFAULT_TIMEOUT", "create_dht", "local_peer_id", "local_subkey", "run_in_dht", "visible_maddrs"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds; the bound of every DHT call that is not given one
_GRACE = 1.0  # extra seconds the caller waits beyond a coroutine's own timeout (pipe round trip)
ReturnType = TypeVar("ReturnType")


@dataclass(frozen=True)
class _Signer:
    """The swarm identity of a DHT created by ``create_dht``."""

    peer_id: PeerID
    owner_marker: bytes  # RSASignatureValidator.local_public_key


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

    Raises ``ValidationError`` for a bad host, port or identity file; hivemind's errors if the node fails to
    start (e.g. ``P2PDaemonError`` when the identity is already used by a live peer).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError as e:
        raise ValidationError(f"host must be an IP address, got {host!r}") from e
    if type(port) is not int or not 0 <= port < 65536:
        raise ValidationError(f"port must be an int in [0, 65536), got {port!r}")
    host_maddr = f"/ip{address.version}/{host}/tcp/{port}"

    temp_dir = None
    if identity_path is not None:
        private_key = load_identity(identity_path)
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
    )
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers) or None,
            start=start,
            host_maddrs=[host_maddr],
            announce_maddrs=list(announce_maddrs) or None,
            identity_path=identity_path,
            client_mode=client_mode,
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            record_validators=validators,
            **kwargs,
        )
    except BaseException:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    _SIGNERS[dht] = signer
    if temp_dir is not None:
        if start and kwargs.get("await_ready", True):
            shutil.rmtree(temp_dir, ignore_errors=True)  # the daemon has read it
        else:
            weakref.finalize(dht, shutil.rmtree, temp_dir, ignore_errors=True)
    logger.info(
        "Created a DHT node %s listening on %s (client_mode=%s)", signer.peer_id, host_maddr, client_mode
    )
    return dht


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


async def _visible_maddrs(_dht: hivemind.DHT, node: hivemind.DHTNode, *, timeout: float) -> list[str]:
    return [str(maddr) for maddr in await node.get_visible_maddrs()]


def visible_maddrs(dht: hivemind.DHT, *, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Multiaddrs (with ``/p2p/<peer id>``) other peers can use as ``initial_peers`` to reach ``dht``."""
    return run_in_dht(dht, _visible_maddrs, timeout=timeout)
