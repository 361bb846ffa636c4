"""The throughput probe: how fast this peer computes one block, measured once per model/device/dtype.

On join a peer runs one real block of the model on its device and dtype: a forward pass over a batch of
``_FORWARD_TOKENS`` tokens (tokens/s through one block) and a run of single-token inference steps with a KV cache
(steps/s through one block). The figures are cached on disk, keyed by model, device, dtype and torch version, so a
restart does not measure again. What the peer announces for its span of ``n`` blocks (``announced``):

- ``throughput`` = min(forward tokens/s per block / n, network tokens/s): tokens/s it adds to each of its blocks;
- ``inference_rps`` = inference steps/s per block / n: how many steps/s a session through its span can make;
- ``network_tps``: tokens/s its link carries, estimated from the declared bandwidth (hidden states in and out).

>>> probe = measure_block(checkpoint, device="cpu", dtype="float32")     # or cached_probe(...)
>>> announced(probe, num_blocks=10, hidden_size=576, dtype="float32", bandwidth_mbps=100)

``decode_threads(span)`` measures, on the peer's own blocks, how many CPU threads a single-token inference step
should use (see ``swarm_peer.threads``), and caches the answer the same way.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from swarm_peer.dht.records import MAX_RATE
from swarm_peer.models import Checkpoint, atomic_write, cache_dir, read_json
from swarm_peer.peer.blocks import DTYPES, BlockSpan
from swarm_peer.threads import cached_fastest_threads

__all__ = [
    "BlockProbe",
    "announced",
    "cached_probe",
    "decode_threads",
    "measure_block",
    "network_tps",
]

logger = logging.getLogger(__name__)

_FORWARD_TOKENS = 128
_INFERENCE_STEPS = 16
_REPEATS = 3
_CACHE_FILE = "throughput.json"


@dataclass(frozen=True)
class BlockProbe:
    """Measured speed of one block: forward tokens/s and inference steps/s (batch 1)."""

    forward_tps: float
    inference_sps: float


def measure_block(checkpoint: Checkpoint, *, device: str, dtype: str) -> BlockProbe:
    """Loads block 0 and times it; median over a few repeats, after one warm-up."""
    span = BlockSpan(checkpoint, 0, 1, dtype=dtype, device=device)
    D = span.hidden_size
    hidden_BTD = torch.randn(1, _FORWARD_TOKENS, D, generator=torch.Generator().manual_seed(0))
    mask_BS = torch.ones(1, _FORWARD_TOKENS, dtype=torch.long)
    positions_BT = torch.arange(_FORWARD_TOKENS).unsqueeze(0)

    def forward() -> None:
        span.forward(hidden_BTD, mask_BS, positions_BT, 0, 1)

    with torch.inference_mode():
        forward_seconds = _median_seconds(forward, device)
        inference_seconds = _median_seconds(_decode_steps(span), device)
    return BlockProbe(_FORWARD_TOKENS / forward_seconds, _INFERENCE_STEPS / inference_seconds)


def decode_threads(span: BlockSpan, *, remeasure: bool = False) -> int:
    """CPU threads for single-token inference steps through ``span``: the fastest for 16 such steps through its
    first block, cached per model and dtype (``swarm_peer.threads``). Accelerators keep torch's setting."""
    if span.device.type != "cpu":
        return torch.get_num_threads()
    name = f"decode|{span.checkpoint.model_id}|{span.dtype_name}"
    return cached_fastest_threads(name, _decode_steps(span), remeasure=remeasure)


def _decode_steps(span: BlockSpan):
    """A run of ``_INFERENCE_STEPS`` single-token steps with a fresh KV cache through the span's first block."""
    a = span.start
    hidden_BTD = torch.randn(
        1, _INFERENCE_STEPS, span.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    mask_BS = torch.ones(1, _INFERENCE_STEPS, dtype=torch.long)
    positions_BT = torch.arange(_INFERENCE_STEPS).unsqueeze(0)

    def steps() -> None:
        cache = span.new_cache(a, a + 1)
        for t in range(_INFERENCE_STEPS):
            span.forward(
                hidden_BTD[:, t : t + 1], mask_BS[:, : t + 1], positions_BT[:, t : t + 1], a, a + 1, cache
            )

    return steps


def _median_seconds(fn, device: str) -> float:
    figures = []
    for _ in range(_REPEATS + 1):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        figures.append(time.perf_counter() - t0)
    return statistics.median(figures[1:])


def cached_probe(checkpoint: Checkpoint, *, device: str, dtype: str, remeasure: bool = False) -> BlockProbe:
    """The cached probe for this model/device/dtype/torch, measuring (and caching) it when missing."""
    key = f"{checkpoint.model_id}|{device}|{dtype}|torch-{torch.__version__}"
    path = cache_dir() / _CACHE_FILE
    entries = read_json(path)
    if not isinstance(entries, dict):
        entries = {}
    if not remeasure and key in entries:
        try:
            return BlockProbe(**entries[key])
        except TypeError:
            logger.warning("Ignoring a malformed entry of %s for %s", path, key)
    t0 = time.perf_counter()
    probe = measure_block(checkpoint, device=device, dtype=dtype)
    logger.info(
        "Measured one block in %.1f s: %.0f tokens/s forward, %.1f steps/s inference",
        time.perf_counter() - t0,
        probe.forward_tps,
        probe.inference_sps,
    )
    entries[key] = asdict(probe)
    atomic_write(path, json.dumps(entries, indent=1).encode())
    return probe


def network_tps(*, hidden_size: int, dtype: str, bandwidth_mbps: float) -> float:
    """Tokens/s a link of ``bandwidth_mbps`` carries: each token's hidden state goes in and comes out."""
    bytes_per_token = 2 * hidden_size * DTYPES[dtype].itemsize
    return bandwidth_mbps * 1e6 / 8 / bytes_per_token


def announced(
    probe: BlockProbe, *, num_blocks: int, hidden_size: int, dtype: str, bandwidth_mbps: float
) -> dict[str, float]:
    """The ``ServerInfo`` fields for a span of ``num_blocks``: throughput, inference_rps, network_tps.

    Each is at most ``MAX_RATE``, the most a record may say (a tiny model on a fast device can measure more).
    """
    network = min(network_tps(hidden_size=hidden_size, dtype=dtype, bandwidth_mbps=bandwidth_mbps), MAX_RATE)
    return {
        "throughput": min(probe.forward_tps / num_blocks, network),
        "inference_rps": min(probe.inference_sps / num_blocks, MAX_RATE),
        "network_tps": network,
    }
