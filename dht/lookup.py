"""Finding the peers that serve blocks of a model: one DHT request for all blocks.

    servers = get_block_servers(dht, "llama-7b", range(32))   # servers[i]: {PeerID: ServerInfo} for block i
    online = online_servers(dht, "llama-7b", range(32))       # the same, ONLINE peers only

and the experts of a grid (``expert_record``), by uid or by prefix level:

    get_experts(dht, ["ffn.3.7"])                  # {"ffn.3.7": (PeerID, ...)}: the peers that host it
    get_expert_successors(dht, ["ffn.", "ffn.3."])  # {"ffn.": {3: (PeerID, ...), ...}, "ffn.3.": {7: ...}}

Entries are kept only if they are well-formed records for that very key, in a subkey owned by the peer they
name (``<peer id>[owner:<its rsa key>]``); anything else (another component's value, an unsigned or foreign
entry, a record of another schema version) is skipped with a debug log. Signatures are checked by the
DHT's own validators as records arrive (``create_dht`` installs them), before this module sees the values.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import hivemind
from hivemind.p2p import PeerID

from swarm_peer.dht.expert_record import (
    parse_expert_entry,
    validate_expert_prefix,
    validate_expert_uid,
)
from swarm_peer.dht.identity import peer_id_from_public_key
from swarm_peer.dht.keys import block_key, block_ranges, parse_peer_subkey, validate_model_id
from swarm_peer.dht.node import DEFAULT_TIMEOUT, request_chunks, run_in_dht
from swarm_peer.dht.records import ServerInfo, ServerState, from_dht_value
from swarm_peer.errors import ValidationError

__all__ = ["get_block_servers", "get_expert_successors", "get_experts", "online_servers"]

logger = logging.getLogger(__name__)

_EXPERT_KEY_BYTES_PER_REQUEST = 3072  # of expert keys sent to the DHT process: a request stays under 4 KiB


async def _get_entries(
    _dht: hivemind.DHT,
    node: hivemind.DHTNode,
    *,
    timeout: float,
    model_id: str,
    ranges: tuple[tuple[int, int], ...],
) -> dict[int, dict[Any, Any] | None] | None:
    """In the DHT process: {block: latest {subkey: value}} for the blocks of ``ranges``; None on timeout.

    A non-dictionary value maps to None; blocks with nothing found are left out. Blocks travel as ranges so
    that the request over the pipe stays small however many blocks are asked for.
    """
    keys = {block_key(model_id, block): block for start, end in ranges for block in range(start, end)}
    try:
        # sufficient_expiration_time=inf is get(latest=True): ask all nearest nodes and merge their subkeys,
        # instead of stopping at the first node (maybe our own cache) that knows some of them
        found = await asyncio.wait_for(node.get_many(keys, sufficient_expiration_time=float("inf")), timeout)
    except TimeoutError:
        return None
    entries: dict[int, dict[Any, Any] | None] = {}
    for key, item in found.items():
        if item is not None:
            is_dict = isinstance(item.value, dict)
            entries[keys[key]] = (
                {subkey: entry.value for subkey, entry in item.value.items()} if is_dict else None
            )
    return entries


def get_block_servers(
    dht: hivemind.DHT, model_id: str, blocks: Sequence[int], *, timeout: float | None = None
) -> list[dict[PeerID, ServerInfo]]:
    """For each of ``blocks``, the peers that announced it and their latest records, in any state.

    Callers that route requests keep ``ServerState.ONLINE`` (see ``online_servers``). ``timeout`` bounds the
    whole lookup (default ``DEFAULT_TIMEOUT``). Raises ``TimeoutError`` if the DHT does not answer in time,
    ``ValidationError`` for a bad model id or block index.
    """
    validate_model_id(model_id)
    blocks = list(blocks)
    for block in blocks:
        block_key(model_id, block)  # validates the index
    if not blocks:
        return []
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    entries = run_in_dht(dht, _get_entries, timeout=timeout, model_id=model_id, ranges=block_ranges(blocks))
    if entries is None:
        raise TimeoutError(f"looking up {len(blocks)} blocks of {model_id} took over {timeout:.1f} s")
    return [_parse_entries(entries.get(block, {}), model_id, block) for block in blocks]


def _parse_entries(entries: dict[Any, Any] | None, model_id: str, block: int) -> dict[PeerID, ServerInfo]:
    """Keep the well-formed records of ``model_id.block`` whose subkey is owned by the peer it names."""
    if entries is None:
        logger.debug("Ignored a non-dictionary value under %s", block_key(model_id, block))
        return {}
    servers: dict[PeerID, ServerInfo] = {}
    for subkey, value in entries.items():
        try:
            peer_id, public_key = parse_peer_subkey(subkey)
            if peer_id_from_public_key(public_key) != peer_id:
                raise ValidationError(f"subkey of {peer_id} is owned by another key")
            servers[peer_id] = from_dht_value(value, model_id=model_id, block=block)
        except ValidationError as e:
            logger.debug("Ignored an entry under %s: %s", block_key(model_id, block), e)
    return servers


def online_servers(
    dht: hivemind.DHT, model_id: str, blocks: Sequence[int], *, timeout: float | None = None
) -> list[dict[PeerID, ServerInfo]]:
    """``get_block_servers`` restricted to peers whose state is ``ServerState.ONLINE``."""
    return [
        {peer_id: info for peer_id, info in servers.items() if info.state == ServerState.ONLINE}
        for servers in get_block_servers(dht, model_id, blocks, timeout=timeout)
    ]


async def _get_expert_entries(
    _dht: hivemind.DHT, node: hivemind.DHTNode, *, timeout: float, keys: tuple[str, ...]
) -> dict[str, dict[int | None, tuple[PeerID, ...]]] | None:
    """In the DHT process: per expert key, {next coordinate (None under a uid's own key): peers} of its well-formed
    entries (``expert_record.parse_expert_entry``; anything else is skipped with a debug log); None on timeout.

    Entries are parsed here, so that what comes back over the pipe is small (no RSA keys).
    """
    try:
        # latest: ask all nearest nodes and merge their subkeys (every peer writes its own subkey)
        found = await asyncio.wait_for(node.get_many(keys, sufficient_expiration_time=float("inf")), timeout)
    except TimeoutError:
        return None
    entries: dict[str, dict[int | None, tuple[PeerID, ...]]] = {}
    for key in keys:
        item = found.get(key)
        peers: dict[int | None, list[PeerID]] = {}
        for subkey, entry in item.value.items() if item is not None and isinstance(item.value, dict) else ():
            try:
                expert = parse_expert_entry(key, subkey, entry.value)
            except ValidationError as e:
                logger.debug("Ignored an entry under %s: %s", key, e)
                continue
            if not expert.online:
                continue  # the peer withdrew it
            peers.setdefault(expert.coord, []).append(expert.peer_id)
        entries[key] = {coord: tuple(sorted(set(ids), key=PeerID.to_base58)) for coord, ids in peers.items()}
    return entries


def _expert_lookup(
    dht: hivemind.DHT, keys: Sequence[str], timeout: float | None
) -> dict[str, dict[int | None, tuple[PeerID, ...]]]:
    """``_get_expert_entries`` of ``keys``, in requests of at most ``_EXPERT_KEY_BYTES_PER_REQUEST`` bytes of keys.

    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``) a request.
    """
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    # ~8 bytes of pickle per key besides its characters
    chunks = request_chunks(dict.fromkeys(keys), lambda key: len(key) + 8, _EXPERT_KEY_BYTES_PER_REQUEST)
    entries: dict[str, dict[int | None, tuple[PeerID, ...]]] = {}
    for chunk in chunks:
        found = run_in_dht(dht, _get_expert_entries, timeout=timeout, keys=tuple(chunk))
        if found is None:
            raise TimeoutError(f"looking up {len(chunk)} expert keys took over {timeout:.1f} s")
        entries.update(found)
    return entries


def get_experts(
    dht: hivemind.DHT, uids: Sequence[str], *, timeout: float | None = None
) -> dict[str, tuple[PeerID, ...]]:
    """The peers that declare each of ``uids`` (``declare_experts``) and whose records have neither expired nor been
    withdrawn, as {uid: peer ids, sorted}; uids nobody hosts map to ``()``.

    Entries are kept only if they are well-formed expert records for that very uid, in a subkey owned by the peer
    it names; anything else is skipped with a debug log. Raises ``TimeoutError`` if the DHT does not answer within
    ``timeout`` (default ``DEFAULT_TIMEOUT``) a request, ``ValidationError`` for a malformed uid.
    """
    for uid in uids:
        validate_expert_uid(uid)
    entries = _expert_lookup(dht, uids, timeout)
    return {uid: entries[uid].get(None, ()) for uid in uids}


def get_expert_successors(
    dht: hivemind.DHT, prefixes: Sequence[str], *, timeout: float | None = None
) -> dict[str, dict[int, tuple[PeerID, ...]]]:
    """For each prefix key (``"ffn."``, ``"ffn.3."``: a grid's name and some coordinates), its live next coordinates
    and the peers that declare an expert under each, as {prefix: {coordinate: peer ids, sorted}}, in one DHT
    request (or a few, for many prefixes). Under a prefix one coordinate short of the uids (``"ffn.3."`` of a 2-D
    grid), the peers of coordinate 7 are those that host ``"ffn.3.7"``.

    Entries are kept as ``get_experts`` keeps them. Raises ``TimeoutError`` as ``get_experts``, ``ValidationError``
    for a malformed prefix.
    """
    for prefix in prefixes:
        validate_expert_prefix(prefix)
    entries = _expert_lookup(dht, prefixes, timeout)
    return {
        prefix: {coord: peers for coord, peers in entries[prefix].items() if coord is not None}
        for prefix in prefixes
    }
