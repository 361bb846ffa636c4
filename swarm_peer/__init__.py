"""swarm-peer: run and train models too large for one machine on a swarm of volunteer peers.

>>> from swarm_peer import DistributedModelForCausalLM
>>> model = DistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=[maddr])
>>> model.generate(input_ids, max_new_tokens=40)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarm-peer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from swarm_peer.errors import (  # noqa: E402
    BusyError,
    DeadlineError,
    InternalError,
    MissingBlocksError,
    MissingWeightsError,
    PeerError,
    RoutingError,
    SessionError,
    SwarmError,
    UnknownSessionError,
    ValidationError,
)
from swarm_peer.models import Checkpoint, resolve_checkpoint  # noqa: E402
from swarm_peer.settings import ClientSettings, NetworkSettings, PeerSettings  # noqa: E402


def __getattr__(name: str):
    # The client pulls in transformers and hivemind; import it only when asked for.
    if name in ("DistributedModelForCausalLM", "InferenceSession", "RemoteSequential"):
        from swarm_peer import client

        return getattr(client, name)
    raise AttributeError(f"module 'swarm_peer' has no attribute {name!r}")


__all__ = [
    "__version__",
    "DistributedModelForCausalLM",
    "InferenceSession",
    "RemoteSequential",
    "Checkpoint",
    "resolve_checkpoint",
    "NetworkSettings",
    "PeerSettings",
    "ClientSettings",
    "SwarmError",
    "ValidationError",
    "RoutingError",
    "PeerError",
    "BusyError",
    "MissingBlocksError",
    "DeadlineError",
    "UnknownSessionError",
    "MissingWeightsError",
    "InternalError",
    "SessionError",
]
