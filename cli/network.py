"""Joining the swarm from the command line: ``--initial-peers`` checked at once, and failures in one line.

Every command that joins the swarm checks its ``--initial-peers`` here before it loads anything, so a typo
costs no time and prints no traceback::

    error: Invalid value for '--initial-peers': 'garbage' is not a peer's multiaddr like /ip4/10.0.0.1/...

Commands that only use a swarm (``generate``, ``finetune``, ``status``) need at least one initial peer; ``dht``
and ``join`` may start a new swarm without one. An initial peer that does not answer is reported by
``create_dht`` as a ``SwarmError`` (``cannot join the swarm at ...``), which ``main`` prints as one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from swarm_peer.errors import SwarmError, ValidationError
from swarm_peer.settings import NetworkSettings

if TYPE_CHECKING:
    import hivemind

__all__ = ["check_initial_peers", "join_swarm"]


def check_initial_peers(initial_peers: tuple[str, ...], *, required: bool) -> None:
    """Raise ``click.UsageError`` if peers are ``required`` and none are given, ``click.BadParameter`` for a
    malformed one."""
    if required and not initial_peers:
        raise click.UsageError("give --initial-peers: the multiaddr of a peer in the swarm")
    from swarm_peer.dht import validate_initial_peers  # imports hivemind: not before a usage error

    try:
        validate_initial_peers(initial_peers)
    except ValidationError as e:
        raise click.BadParameter(str(e), param_hint="--initial-peers") from None


def join_swarm(network: NetworkSettings, timeout: float) -> hivemind.DHT:
    """A DHT node joined to the swarm within ``timeout``; ``click.ClickException`` if it cannot join."""
    from swarm_peer.dht import create_dht

    check_initial_peers(network.initial_peers, required=True)
    try:
        return create_dht(**network.model_dump(), timeout=timeout)
    except SwarmError as e:
        raise click.ClickException(str(e)) from None
