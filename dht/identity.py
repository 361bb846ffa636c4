"""Peer identity: one RSA key that is both the libp2p identity (peer id) and the DHT record signing key.

hivemind gives a peer two unrelated keys by default: the p2p daemon's identity (which determines the
peer id) and ``RSASignatureValidator``'s key (which signs protected DHT records). swarm-peer uses a single
RSA key for both, so the peer id of a record's subkey can be checked against the key that signed it
(``peer_id_from_public_key``): a peer cannot announce itself under another peer's id.

The identity file is hivemind's format (``P2P.generate_identity``: a libp2p ``PrivateKey`` protobuf with an
RSA key, mode 0400). With a persistent file the peer id and the signing key survive restarts::

    key = load_identity("peer.id")          # creates the file if it is missing
    PeerID.from_identity(open("peer.id", "rb").read()) == peer_id_from_public_key(public_key_bytes(key))
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm_peer.errors import ValidationError

__all__ = ["load_identity", "peer_id_from_public_key", "public_key_bytes", "write_identity"]

logger = logging.getLogger(__name__)


class _LoadedRSAPrivateKey(RSAPrivateKey):
    """hivemind's ``RSAPrivateKey`` around an existing key (its own constructor always generates a new one)."""

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._private_key = private_key


def load_identity(identity_path: str) -> RSAPrivateKey:
    """Read the RSA key of a libp2p identity file, creating the file first (mode 0400) if it is missing.

    Raises ``ValidationError`` if the file is not a libp2p private key, or holds a non-RSA key (e.g. an
    Ed25519 identity made by another tool: records could not be signed with it).
    """
    if not os.path.exists(identity_path):
        logger.info("Generating a new peer identity in %s", identity_path)
        P2P.generate_identity(identity_path)
    with open(identity_path, "rb") as f:
        data = f.read()
    try:
        protobuf = crypto_pb2.PrivateKey.FromString(data)
    except Exception as e:  # protobuf raises DecodeError, or others on truncated input
        raise ValidationError(f"{identity_path} is not a libp2p identity file: {e}") from e
    if protobuf.key_type != crypto_pb2.KeyType.RSA:
        raise ValidationError(
            f"{identity_path} holds a {crypto_pb2.KeyType.Name(protobuf.key_type)} key; swarm-peer signs its "
            f"records with the identity key and needs RSA (delete the file to generate a new identity)"
        )
    private_key = serialization.load_der_private_key(protobuf.data, password=None)
    return _LoadedRSAPrivateKey(private_key)


def write_identity(private_key: RSAPrivateKey, identity_path: str) -> None:
    """Write ``private_key`` as a libp2p identity file (hivemind's format, mode 0400); the file must not exist."""
    protobuf = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=private_key.to_bytes())
    fd = os.open(identity_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(protobuf.SerializeToString())


def public_key_bytes(private_key: RSAPrivateKey) -> bytes:
    """The serialized public key (OpenSSH format) as it appears in the ``[owner:...]`` marker."""
    return private_key.get_public_key().to_bytes()


@functools.lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> PeerID:
    """The libp2p peer id of an RSA public key given in OpenSSH format (as in an ``[owner:...]`` marker).

    Same derivation as ``PeerID.from_identity``: sha2-256 multihash of the protobuf-wrapped DER key.
    Raises ``ValidationError`` if ``public_key`` is not an RSA public key.
    """
    try:
        key = serialization.load_ssh_public_key(public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValidationError(f"not an OpenSSH public key: {public_key[:32]!r}...") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValidationError(f"not an RSA public key: {public_key[:32]!r}...")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))
