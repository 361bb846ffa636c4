"""The swarm's catalogs: every hosting peer lists its model under ``MODELS_KEY``, every volunteer of a training
run lists the run under ``RUNS_KEY``, and the peers it bans from the run under ``BANS_KEY`` (see ``listing``).

    declare_span(dht, "llama-7b", info, expiration_time=get_dht_time() + 60, num_blocks=32)   # a peer
    list_models(dht)   # {"llama-7b": 32, ...}, from every peer's record
    list_model_infos(dht)   # {"llama-7b": ModelInfo(model_id="llama-7b", num_blocks=32, name="Llama 7B"), ...}

    declare_run(dht, RunInfo(run_id="my-run", ...), expiration_time=get_dht_time() + 60)   # a volunteer
    list_runs(dht)   # {"my-run": {"QmPeer...": RunInfo(run_id="my-run", step=120, ...), ...}, ...}

    declare_bans(dht, "my-run", {"QmLiar...": "owner: wrong result"}, expiration_time=...)   # a verified volunteer
    list_bans(dht)   # {"my-run": {"QmLiar...": {"QmDeclarer...": "owner: wrong result", ...}}, ...}

``declare_span(..., num_blocks=...)`` (and so ``Announcer(..., num_blocks=...)``) stores the model record in
the same request and with the same expiration as the span's records, so a model leaves the catalog when its
last peer's records expire; a run leaves it when its last volunteer's record expires (``RunAnnouncer``).
A ban leaves it with its declarer's run record (``RunAnnouncer(..., bans=...)``).
The record formats are in ``model_record``, ``run_record`` and ``ban_record``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import hivemind
from hivemind.p2p import PeerID

from swarm_peer.dht.ban_record import BANS, BanInfo, ban_from_dht_value
from swarm_peer.dht.identity import peer_id_from_public_key
from swarm_peer.dht.listing import Listing
from swarm_peer.dht.model_record import MODELS, ModelInfo, model_from_dht_value
from swarm_peer.dht.node import DEFAULT_TIMEOUT, run_in_dht
from swarm_peer.dht.run_record import RUNS, RunInfo, run_from_dht_value
from swarm_peer.errors import ValidationError

__all__ = ["list_bans", "list_model_infos", "list_models", "list_runs", "list_runs_and_bans"]

logger = logging.getLogger(__name__)
Info = TypeVar("Info")


async def _get_listed(
    _dht: hivemind.DHT, node: hivemind.DHTNode, *, timeout: float, keys: tuple[str, ...]
) -> dict[str, dict[Any, Any]] | None:
    """In the DHT process: per key, the latest {subkey: value} under it ({} if none), in one request; None on
    timeout."""
    try:
        # latest: ask all nearest nodes and merge their subkeys (every peer writes its own subkey)
        found = await asyncio.wait_for(node.get_many(keys, sufficient_expiration_time=float("inf")), timeout)
    except TimeoutError:
        return None
    return {
        # a non-dictionary value cannot be a peer's record (the validator refuses one anyway)
        key: {subkey: entry.value for subkey, entry in value.value.items()}
        if value is not None and isinstance(value.value, dict)
        else {}
        for key, value in found.items()
    }


def _get(dht: hivemind.DHT, listings: tuple[Listing, ...], timeout: float | None) -> list[dict[Any, Any]]:
    """The entries under the keys of ``listings``, in one DHT request: one {subkey: value} per listing.

    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``).
    """
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    keys = tuple(listing.key for listing in listings)
    entries = run_in_dht(dht, _get_listed, timeout=timeout, keys=keys)
    if entries is None:
        kinds = " and ".join(f"{listing.kind}s" for listing in listings)
        raise TimeoutError(f"listing the swarm's {kinds} took over {timeout:.1f} s")
    return [entries[key] for key in keys]


def _parse(
    listing: Listing, parse: Callable[[Any], Info], entries: dict[Any, Any]
) -> list[tuple[str, PeerID, Info]]:
    """(name, peer id, record) of every entry of ``listing`` that is a well-formed record (``parse``) in a subkey
    owned by the peer it names, made for the name of its subkey; anything else is skipped with a debug log."""
    listed = []
    for subkey, value in entries.items():
        try:
            name, peer_id, public_key = listing.parse_subkey(subkey)
            if peer_id_from_public_key(public_key) != peer_id:
                raise ValidationError(f"subkey of {peer_id} is owned by another key")
            info = parse(value)
            if value[listing.name_field] != name:
                raise ValidationError(f"record for {value[listing.name_field]} in the subkey of {name}")
        except ValidationError as e:
            logger.debug("Ignored an entry under %s: %s", listing.key, e)
            continue
        listed.append((name, peer_id, info))
    return listed


def _list(
    dht: hivemind.DHT, listing: Listing, parse: Callable[[Any], Info], timeout: float | None
) -> list[tuple[str, PeerID, Info]]:
    """``_parse`` of the entries under ``listing.key``. Raises ``TimeoutError`` as ``_get``."""
    return _parse(listing, parse, _get(dht, (listing,), timeout)[0])


def list_model_infos(dht: hivemind.DHT, *, timeout: float | None = None) -> dict[str, ModelInfo]:
    """The models peers declare, as {model_id: ModelInfo}, sorted by model id.

    Entries are kept only if they are well-formed model records in a subkey owned by the peer it names and
    made for the model it names; anything else is skipped with a debug log. Should peers disagree on a
    model's number of blocks, the number most of them declare wins (the larger on a tie, so that a gap is
    shown rather than hidden); on its readable name (each peer names it), the most common non-empty name wins
    (the first in sorted order on a tie).
    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``).
    """
    votes: dict[str, Counter[int]] = {}
    names: dict[str, Counter[str]] = {}
    for model_id, _peer_id, info in _list(dht, MODELS, model_from_dht_value, timeout):
        votes.setdefault(model_id, Counter())[info.num_blocks] += 1
        names.setdefault(model_id, Counter())[info.name] += bool(info.name)
    return {
        model_id: ModelInfo(
            model_id=model_id,
            num_blocks=max(counts, key=lambda num_blocks: (counts[num_blocks], num_blocks)),
            name=min(names[model_id], key=lambda name: (-names[model_id][name], name)),
        )
        for model_id, counts in sorted(votes.items())
    }


def list_models(dht: hivemind.DHT, *, timeout: float | None = None) -> dict[str, int]:
    """The models peers declare, as {model_id: num_blocks}, sorted by model id (see ``list_model_infos``).

    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``).
    """
    return {model_id: info.num_blocks for model_id, info in list_model_infos(dht, timeout=timeout).items()}


def list_runs(dht: hivemind.DHT, *, timeout: float | None = None) -> dict[str, dict[str, RunInfo]]:
    """The training runs volunteers declare (``declare_run``), as {run id: {peer id (base58): RunInfo}}, sorted
    by run id, then peer id.

    Entries are kept only if they are well-formed run records in a subkey owned by the peer it names and made
    for the run it names; anything else is skipped with a debug log.
    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``).
    """
    return _runs(_list(dht, RUNS, run_from_dht_value, timeout))


def list_bans(
    dht: hivemind.DHT, run_id: str | None = None, *, timeout: float | None = None
) -> dict[str, dict[str, dict[str, str]]]:
    """The bans volunteers declare (``declare_bans``), as {run id: {banned peer: {declarer: reason}}} (peer ids in
    base58), sorted; only ``run_id``'s, if given. Who is to be trusted is ``ban_record.agreed_bans``'s question.

    Entries are kept only if they are well-formed ban records in a subkey owned by the peer it names and made for
    the ban it names; anything else is skipped with a debug log.
    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``).
    """
    return _bans(_list(dht, BANS, ban_from_dht_value, timeout), run_id)


def list_runs_and_bans(
    dht: hivemind.DHT, run_id: str | None = None, *, timeout: float | None = None
) -> tuple[dict[str, dict[str, RunInfo]], dict[str, dict[str, dict[str, str]]]]:
    """``list_runs`` and ``list_bans`` in one DHT request; only ``run_id``'s, if given.

    Raises ``TimeoutError`` if the DHT does not answer within ``timeout`` (default ``DEFAULT_TIMEOUT``).
    """
    runs, bans = _get(dht, (RUNS, BANS), timeout)
    runs = _runs(_parse(RUNS, run_from_dht_value, runs))
    if run_id is not None:
        runs = {run_id: runs[run_id]} if run_id in runs else {}
    return runs, _bans(_parse(BANS, ban_from_dht_value, bans), run_id)


def _runs(listed: list[tuple[str, PeerID, RunInfo]]) -> dict[str, dict[str, RunInfo]]:
    runs: dict[str, dict[str, RunInfo]] = {}
    for run_id, peer_id, info in sorted(listed, key=lambda entry: (entry[0], entry[1].to_base58())):
        runs.setdefault(run_id, {})[peer_id.to_base58()] = info
    return runs


def _bans(
    listed: list[tuple[str, PeerID, BanInfo]], run_id: str | None
) -> dict[str, dict[str, dict[str, str]]]:
    bans: dict[str, dict[str, dict[str, str]]] = {}
    for _, declarer, info in sorted(listed, key=lambda entry: (entry[0], entry[1].to_base58())):
        if run_id is None or info.run_id == run_id:
            bans.setdefault(info.run_id, {}).setdefault(info.peer, {})[declarer.to_base58()] = info.reason
    return bans
