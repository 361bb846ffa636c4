"""Creates the bootstrap node's identity file if it is missing, and prints the line docker/compose.yaml reads.

    python /opt/swarm-peer/bootstrap_id.py /data/bootstrap.key       # prints BOOTSTRAP_ID=Qm...

The file is a libp2p RSA key (swarm-peer's ``--identity`` format, mode 0400); the peer id printed is the one
``swarm-peer dht --identity FILE`` runs under, so ``/dns4/bootstrap/tcp/31337/p2p/$BOOTSTRAP_ID`` stays the
bootstrap's multiaddr for as long as the file is kept.
"""

from __future__ import annotations

import sys

from hivemind.p2p import PeerID

from swarm_peer.dht import load_identity


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} IDENTITY_FILE", file=sys.stderr)
        return 2
    load_identity(argv[1])  # creates the file if it is missing; refuses one that is not an RSA libp2p key
    with open(argv[1], "rb") as f:
        print(f"BOOTSTRAP_ID={PeerID.from_identity(f.read()).to_base58()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
