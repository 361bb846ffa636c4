"""Announcing a peer's span in the DHT: one signed record per block, refreshed before it expires; and a
volunteer's training run.

    declare_span(dht, "llama-7b", info, expiration_time=get_dht_time() + 60)   # once

    announcer = Announcer(dht, "llama-7b", lambda: current_info(), period=30, num_blocks=32)  # keep it up
    announcer.start()
    ...
    announcer.update()     # something changed (state, span, cache left): re-announce now
    announcer.stop()       # publish OFFLINE, then join

A record lives in this peer's own subkey of ``block_key(model_id, b)`` (``local_subkey``), signed by the
peer's key, so nobody else can overwrite or erase it. hivemind keeps, per subkey, the value with the latest
expiration time: a new record replaces the old one only if it expires later, so announcements use
non-decreasing expiration times (``Announcer`` guarantees it). Given the model's ``num_blocks``, both also
list the model in the swarm's catalog (``model_record``, ``catalog.list_models``), so that status pages can
find it.

A volunteer of a training run is listed the same way, under ``RUNS_KEY`` (``run_record``)::

    declare_run(dht, RunInfo(run_id="my-run", ...), get_dht_time() + 60)       # once
    with RunAnnouncer(dht, lambda: trainer_info(), period=30):                   # keep it up while training
        ...

and so are the experts a peer hosts, on a grid, with every prefix level (``expert_record``)::

    declare_experts(dht, ["ffn.3.7", "ffn.3.5"], get_dht_time() + 60)
    with ExpertAnnouncer(dht, lambda: hosted_uids, period=30):                 # keep them up; withdrawn on exit
        ...

and the peers a volunteer of a verified run bans, under ``BANS_KEY`` (``ban_record``)::

    declare_bans(dht, "my-run", {"QmLiar...": "owner: wrong result"}, get_dht_time() + 60)
    RunAnnouncer(dht, lambda: trainer_info(), bans=lambda: dict(trainer.banned))  # with every run record
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Self, TypeVar

import hivemind
from hivemind.utils import get_dht_time
from pydantic import ValidationError as PydanticValidationError

from swarm_peer.dht.ban_record import BANS, BANS_KEY, BanInfo, ban_to_dht_value, short_reason
from swarm_peer.dht.expert_record import expert_entry, expert_records
from swarm_peer.dht.keys import block_key, block_ranges, validate_model_id
from swarm_peer.dht.model_record import MODELS_KEY, ModelInfo, model_subkey, model_to_dht_value
from swarm_peer.dht.node import DEFAULT_TIMEOUT, local_subkey, request_chunks, run_in_dht
from swarm_peer.dht.records import MAX_ANNOUNCE_PERIOD, MAX_RECORD_TTL, ServerInfo, ServerState, to_dht_value
from swarm_peer.dht.run_record import RUNS, RUNS_KEY, RunInfo, run_to_dht_value
from swarm_peer.errors import ValidationError

__all__ = [
    "Announcer",
    "ExpertAnnouncer",
    "RunAnnouncer",
    "declare_bans",
    "declare_experts",
    "declare_run",
    "declare_span",
]

logger = logging.getLogger(__name__)
Info = TypeVar("Info", ServerInfo, RunInfo, tuple[str, ...])

_EXPIRATION_STEP = 1e-3  # seconds; a replacing record must expire strictly later than the one it replaces
_BANS_PER_REQUEST = 12  # ~200 bytes each with the longest reason: a request stays well under 4 KiB
_EXPERT_BYTES_PER_REQUEST = 2560  # of (uid, depth) records, with the ~450-byte subkey: under 4 KiB a request


async def _store_span(
    _dht: hivemind.DHT,
    node: hivemind.DHTNode,
    *,
    timeout: float,
    model_id: str,
    info: ServerInfo,
    ranges: tuple[tuple[int, int], ...],
    subkey: bytes,
    expiration_time: float,
    num_blocks: int | None = None,
    model_name: str = "",
) -> tuple[dict[int, bool], bool | None] | None:
    """In the DHT process: store the record of every block of ``ranges`` in one ``store_many``, and with
    ``num_blocks`` the model record (``model_record``) in the same request.

    Returns ({block: stored}, model record stored or None if not asked), or None on timeout. Blocks travel as
    [start, end) ranges and values are built here, so that the request over the pipe stays small however long
    the span.
    """
    blocks = [block for start, end in ranges for block in range(start, end)]
    keys = [block_key(model_id, block) for block in blocks]
    values = [to_dht_value(info, model_id=model_id, block=block) for block in blocks]
    subkeys = [subkey] * len(keys)
    if num_blocks is not None:
        keys.append(MODELS_KEY)
        values.append(
            model_to_dht_value(ModelInfo(model_id=model_id, num_blocks=num_blocks, name=model_name))
        )
        subkeys.append(model_subkey(model_id, subkey))
    try:
        store_ok = await asyncio.wait_for(
            node.store_many(keys, values, expiration_time, subkeys=subkeys), timeout
        )
    except TimeoutError:
        return None
    block_keys = keys[: len(blocks)]
    stored = {block: bool(store_ok[key, subkey]) for block, key in zip(blocks, block_keys, strict=True)}
    return stored, None if num_blocks is None else bool(store_ok[MODELS_KEY, subkeys[-1]])


def declare_span(
    dht: hivemind.DHT,
    model_id: str,
    info: ServerInfo,
    *,
    expiration_time: float,
    blocks: Sequence[int] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    num_blocks: int | None = None,
    model_name: str = "",
) -> bool:
    """Store ``info`` under this peer's subkey of every block of its span, until ``expiration_time``.

    ``blocks`` restricts the store to some blocks of the span (default: all of ``[start_block, end_block)``).
    ``num_blocks`` (the model's number of blocks) also lists the model in the swarm's catalog, in the same DHT
    request: ``ModelInfo(model_id, num_blocks, model_name)`` under ``MODELS_KEY`` (see ``catalog.list_models``);
    ``model_name`` is the readable name listings show.
    ``expiration_time`` is absolute, in ``hivemind.get_dht_time()`` seconds; it must be later than that of
    the record it replaces, or the DHT keeps the old one. ``dht`` must come from ``create_dht``.

    Returns True if the DHT accepted every record, False if some store was rejected or the DHT did not answer
    within ``timeout`` (logged as a warning). Raises ``ValidationError`` if ``info`` cannot be announced
    (block outside the span, record over the size cap, bad model id or ``num_blocks``, foreign ``dht``, an
    expiration more than ``MAX_RECORD_TTL`` from now: every node would refuse it).
    """
    validate_model_id(model_id)
    _check_expiration(expiration_time)
    if num_blocks is not None:
        _model_info(model_id, num_blocks, model_name)  # raise here, not in the DHT process
    blocks = tuple(range(info.start_block, info.end_block) if blocks is None else blocks)
    for block in blocks:
        to_dht_value(info, model_id=model_id, block=block)  # raise here, not in the DHT process
    if not blocks:
        return True
    subkey = local_subkey(dht)
    expiration_time = float(expiration_time)  # store_many tells one time from a list by isinstance(float)
    result = _in_dht(
        dht,
        _store_span,
        timeout=timeout,
        model_id=model_id,
        info=info,
        ranges=block_ranges(blocks),
        subkey=subkey,
        expiration_time=expiration_time,
        num_blocks=num_blocks,
        model_name=model_name,
    )
    if result is None:
        logger.warning("Announcing %s blocks %s timed out after %.1f s", model_id, _spans(blocks), timeout)
        return False
    stored, listed = result
    rejected = [block for block, ok in stored.items() if not ok]
    if rejected:
        logger.warning("The DHT did not store the records of %s blocks %s", model_id, _spans(rejected))
    if listed is False:
        logger.warning("The DHT did not store the model record of %s", model_id)
    return not rejected and listed is not False


def _in_dht(dht: hivemind.DHT, fn, *, timeout: float, **kwargs):
    """``run_in_dht``, with None for a DHT that does not answer within ``timeout``."""
    try:
        return run_in_dht(dht, fn, timeout=timeout, **kwargs)
    except TimeoutError:
        return None


def _check_expiration(expiration_time: float) -> None:
    if not expiration_time - get_dht_time() <= MAX_RECORD_TTL:
        raise ValidationError(f"records may expire at most {MAX_RECORD_TTL:.0f} s from now")


def _model_info(model_id: str, num_blocks: int, model_name: str = "") -> ModelInfo:
    try:
        return ModelInfo(model_id=model_id, num_blocks=num_blocks, name=model_name)
    except PydanticValidationError as e:
        raise ValidationError(
            f"cannot list {model_id} with num_blocks={num_blocks!r}, name={model_name!r}: {e}"
        ) from e


def _spans(blocks: Sequence[int]) -> str:
    """Short text for a set of block indices: ``[0, 1, 2, 5]`` -> ``"0:3,5:6"``."""
    return ",".join(f"{start}:{end}" for start, end in block_ranges(blocks))


class _PeriodicAnnouncer(threading.Thread, Generic[Info], metaclass=abc.ABCMeta):
    """A daemon thread that declares ``info_fn()`` every ``period`` seconds (and at once after ``update()``), with
    an expiration of ``2 * period`` from now, and a final record when stopped.

    Expiration times only grow (the DHT keeps, per subkey, the record that expires last). Every DHT call is
    bounded by ``timeout``; a failed announcement is logged and retried at the next period, and an exception
    from ``info_fn`` skips that round. Subclasses say how a record is declared (``_declare``) and what the final
    one says (``_final_info``). Usable as a context manager, which starts and stops it.
    """

    def __init__(
        self, dht: hivemind.DHT, info_fn: Callable[[], Info], period: float, *, timeout: float, what: str
    ):
        if not 0 < period <= MAX_ANNOUNCE_PERIOD:
            raise ValidationError(
                f"announce period must be in (0, {MAX_ANNOUNCE_PERIOD:.0f}] s, got {period}"
            )
        local_subkey(dht)  # fail now, not in the thread, if the DHT cannot sign
        super().__init__(name=f"swarm-announcer-{what}", daemon=True)
        self.dht, self.info_fn = dht, info_fn
        self.period, self.timeout = period, timeout
        self.what = what  # for logs
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._final = True  # whether stopping declares a final record
        self._last_info: Info | None = None  # the last declared record and its expiration time
        self._last_expiration = -math.inf

    def run(self) -> None:
        while not self._stopping.is_set():
            info = self._current_info()
            if info is not None:
                self._announce(info, ttl=2 * self.period)
            self._wakeup.wait(self.period)
            self._wakeup.clear()
        if self._final:
            self._announce_final()

    def update(self) -> None:
        """Re-announce now (returns at once; the thread does the work)."""
        self._wakeup.set()

    def _finish(self, timeout: float | None) -> bool:
        """Stop the thread (it declares the final record, if ``self._final``) and join it; whether it ended in
        ``timeout`` (default: enough for the announcement in flight plus the final one)."""
        self._stopping.set()
        self._wakeup.set()
        if self.ident is None:  # never started: announce from this thread
            if self._final:
                self._announce_final()
            return True
        timeout = 3 * (self.timeout + 1.0) if timeout is None else timeout
        self.join(timeout)
        if self.is_alive():
            logger.warning("Announcer for %s did not stop within %.1f s", self.what, timeout)
        return not self.is_alive()

    def stop(self) -> bool:
        return self._finish(None)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _current_info(self) -> Info | None:
        try:
            return self.info_fn()
        except Exception:
            logger.warning(
                "info_fn of the %s announcer failed; skipping this round", self.what, exc_info=True
            )
            return None

    def _announce_final(self) -> None:
        """Declare the final record. It must expire after the last one (the DHT would keep the older one), so it
        lives until shortly after that one would have expired: at most ``2 * period``."""
        info = self._current_info() or self._last_info
        if info is not None:
            self._announce(self._final_info(info), ttl=self.period)

    def _final_info(self, info: Info) -> Info:
        return info

    def _announce(self, info: Info, *, ttl: float) -> None:
        """Declare ``info`` with an expiration ``ttl`` from now, and later than the last one."""
        expiration_time = max(get_dht_time() + ttl, self._last_expiration + _EXPIRATION_STEP)
        try:
            self._declare(info, expiration_time)
        except Exception:
            logger.warning("Announcing %s failed", self.what, exc_info=True)
        # even a failed store may have reached some replicas: the next record must expire later
        self._last_info, self._last_expiration = info, expiration_time

    @abc.abstractmethod
    def _declare(self, info: Info, expiration_time: float) -> None:
        """Store ``info`` in the DHT, expiring at ``expiration_time`` (raises on failure)."""


class Announcer(_PeriodicAnnouncer[ServerInfo]):
    """A daemon thread that keeps this peer's span announced in the DHT.

    Every ``period`` seconds (and at once after ``update()``) it declares ``info_fn()`` with an expiration of
    ``2 * period`` from now. When the span moves, the blocks it left get an OFFLINE record. ``stop()``
    declares the final state and joins. Every DHT call is bounded by ``timeout``; a failed announcement is
    logged and retried at the next period, and an exception from ``info_fn`` skips that round. With
    ``num_blocks`` (the model's number of blocks), every announcement also lists the model in the swarm's
    catalog, in the same DHT request (see ``declare_span``), under the readable name ``model_name``.

    Usable as a context manager: ``with Announcer(dht, "llama-7b", info_fn): ...`` starts and stops it.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        model_id: str,
        info_fn: Callable[[], ServerInfo],
        period: float = 30.0,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        num_blocks: int | None = None,
        model_name: str = "",
    ):
        validate_model_id(model_id)
        if num_blocks is not None:
            _model_info(model_id, num_blocks, model_name)
        super().__init__(dht, info_fn, period, timeout=timeout, what=model_id)
        self.model_id = model_id
        self.num_blocks = num_blocks  # lists the model with every announcement, if given
        self.model_name = model_name
        self._final_state = ServerState.OFFLINE

    def stop(self, final_state: ServerState = ServerState.OFFLINE, timeout: float | None = None) -> bool:
        """Declare ``final_state`` for the span and join the thread; True if it ended within ``timeout``.

        The final record must expire after the last announcement (the DHT would keep the older one), so it
        lives until shortly after that one would have expired: at most ``2 * period``. ``timeout`` defaults to
        enough time for the announcement in flight plus the final one.
        """
        self._final_state = final_state
        return self._finish(timeout)

    def _final_info(self, info: ServerInfo) -> ServerInfo:
        return info.model_copy(update={"state": self._final_state})

    def _declare(self, info: ServerInfo, expiration_time: float) -> None:
        """Declare ``info`` and OFFLINE on the blocks the span left since the last record."""
        if self._last_info is not None:
            left = sorted(
                set(range(self._last_info.start_block, self._last_info.end_block))
                - set(range(info.start_block, info.end_block))
            )
            if left:
                offline = self._last_info.model_copy(update={"state": ServerState.OFFLINE})
                declare_span(
                    self.dht,
                    self.model_id,
                    offline,
                    expiration_time=expiration_time,
                    blocks=left,
                    timeout=self.timeout,
                )
        declare_span(
            self.dht,
            self.model_id,
            info,
            expiration_time=expiration_time,
            timeout=self.timeout,
            num_blocks=self.num_blocks,
            model_name=self.model_name,
        )


async def _store_run(
    _dht: hivemind.DHT,
    node: hivemind.DHTNode,
    *,
    timeout: float,
    value: dict[str, Any],
    subkey: bytes,
    expiration_time: float,
) -> bool | None:
    """In the DHT process: store a run record under ``RUNS_KEY``; whether it was stored, None on timeout."""
    try:
        return bool(
            await asyncio.wait_for(node.store(RUNS_KEY, value, expiration_time, subkey=subkey), timeout)
        )
    except TimeoutError:
        return None


def declare_run(
    dht: hivemind.DHT, info: RunInfo, expiration_time: float, *, timeout: float = DEFAULT_TIMEOUT
) -> bool:
    """List this volunteer in the training run ``info.run_id`` (``run_record``) until ``expiration_time``.

    The record goes under ``RUNS_KEY``, in this peer's subkey for the run (``RUNS.subkey``). ``expiration_time``
    is absolute, in ``hivemind.get_dht_time()`` seconds; it must be later than that of the record it replaces,
    or the DHT keeps the old one. ``dht`` must come from ``create_dht``.

    Returns True if the DHT accepted the record, False if it was rejected or the DHT did not answer within
    ``timeout`` (logged as a warning). Raises ``ValidationError`` if ``info`` cannot be announced (malformed,
    e.g. a ``model_copy(update=...)`` with a bad field; a foreign ``dht``; an expiration more than
    ``MAX_RECORD_TTL`` from now: every node would refuse it).
    """
    _check_expiration(expiration_time)
    value = run_to_dht_value(info)
    subkey = RUNS.subkey(info.run_id, local_subkey(dht))
    stored = _in_dht(
        dht,
        _store_run,
        timeout=timeout,
        value=value,
        subkey=subkey,
        expiration_time=float(expiration_time),
    )
    if stored is None:
        logger.warning("Announcing run %s timed out after %.1f s", info.run_id, timeout)
    elif not stored:
        logger.warning("The DHT did not store the record of run %s", info.run_id)
    return bool(stored)


async def _store_bans(
    _dht: hivemind.DHT,
    node: hivemind.DHTNode,
    *,
    timeout: float,
    run_id: str,
    bans: tuple[tuple[str, str], ...],
    subkey: bytes,
    expiration_time: float,
) -> dict[str, bool] | None:
    """In the DHT process: store a ban record per (peer, reason) of ``bans`` under ``BANS_KEY`` in one
    ``store_many``; {peer: stored}, None on timeout. Records and subkeys are built here, so that the request over
    the pipe stays small."""
    infos = [BanInfo(run_id=run_id, peer=peer, reason=reason) for peer, reason in bans]
    subkeys = [BANS.subkey(f"{run_id}/{info.peer}", subkey) for info in infos]
    values = [ban_to_dht_value(info) for info in infos]
    try:
        stored = await asyncio.wait_for(
            node.store_many([BANS_KEY] * len(infos), values, expiration_time, subkeys=subkeys), timeout
        )
    except TimeoutError:
        return None
    return {info.peer: bool(stored[BANS_KEY, s]) for info, s in zip(infos, subkeys, strict=True)}


def declare_bans(
    dht: hivemind.DHT,
    run_id: str,
    banned: Mapping[str, str],
    expiration_time: float,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Declare that this volunteer bans the peers of ``banned`` ({peer id (base58): reason}) from ``run_id``
    (``ban_record``), until ``expiration_time``.

    Each ban is a record under ``BANS_KEY``, in this peer's subkey for it (``BANS.subkey``); reasons are cut to
    what a record may say (``short_reason``). Requests carry at most ``_BANS_PER_REQUEST`` bans each (a request
    to the DHT process stays under 4 KiB), each bounded by ``timeout``. ``expiration_time`` is absolute, in
    ``hivemind.get_dht_time()`` seconds; it must be later than that of the records it replaces.

    Returns True if the DHT accepted every record (or there were none), False otherwise (logged as a warning).
    Raises ``ValidationError`` for a malformed run id or peer id, a foreign ``dht``, or an expiration more than
    ``MAX_RECORD_TTL`` from now: every node would refuse them.
    """
    _check_expiration(expiration_time)
    bans = []
    for peer, why in sorted(banned.items()):
        info = BanInfo.model_construct(run_id=run_id, peer=peer, reason=short_reason(why))
        ban_to_dht_value(info)  # raise here, not in the DHT process
        bans.append((peer, info.reason))
    subkey, ok = local_subkey(dht), True
    for start in range(0, len(bans), _BANS_PER_REQUEST):
        chunk = tuple(bans[start : start + _BANS_PER_REQUEST])
        stored = _in_dht(
            dht,
            _store_bans,
            timeout=timeout,
            run_id=run_id,
            bans=chunk,
            subkey=subkey,
            expiration_time=float(expiration_time),
        )
        if stored is None:
            logger.warning(
                "Declaring %d bans from run %s timed out after %.1f s", len(chunk), run_id, timeout
            )
            ok = False
        elif not all(stored.values()):
            refused = [peer for peer, was_stored in stored.items() if not was_stored]
            logger.warning("The DHT did not store the bans of %s from run %s", ", ".join(refused), run_id)
            ok = False
    return ok


async def _store_experts(
    _dht: hivemind.DHT,
    node: hivemind.DHTNode,
    *,
    timeout: float,
    records: tuple[tuple[str, int], ...],
    subkey: bytes,
    expiration_time: float,
    online: bool,
) -> dict[str, bool] | None:
    """In the DHT process: store the expert records ``records`` ((uid, depth), ``expert_record.expert_entry``) in
    one ``store_many``; {key: all its records stored}, None on timeout. Records are built here, so that the request
    over the pipe stays small."""
    entries = [expert_entry(uid, depth, subkey, online) for uid, depth in records]
    keys, subkeys, values = (list(column) for column in zip(*entries, strict=True))
    try:
        stored = await asyncio.wait_for(
            node.store_many(keys, values, expiration_time, subkeys=subkeys), timeout
        )
    except TimeoutError:
        return None
    ok: dict[str, bool] = {}
    for key, sub in zip(keys, subkeys, strict=True):
        ok[key] = ok.get(key, True) and bool(stored[key, sub])
    return ok


def declare_experts(
    dht: hivemind.DHT,
    uids: Sequence[str],
    expiration_time: float,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    online: bool = True,
) -> bool:
    """Declare that this peer hosts the experts ``uids`` (``"ffn.3.7"``: a grid's name, then coordinates) until
    ``expiration_time``: under each uid's key and every prefix level's (``expert_record``), so that beam search
    (``swarm_peer.moe``) finds them. ``online=False`` withdraws them instead: the same records, marked off, replace
    the live ones (they must expire later), and lookups skip them. A prefix record stands for all of this peer's
    uids under that prefix and next coordinate: withdraw them together.

    Requests carry at most ``_EXPERT_BYTES_PER_REQUEST`` bytes of uids each (a request to the DHT process stays
    under 4 KiB), each bounded by ``timeout``; records shared by several uids are written once. ``expiration_time``
    is absolute, in ``hivemind.get_dht_time()`` seconds; it must be later than that of the records it replaces.

    Returns True if the DHT accepted every record (or there were none), False otherwise (logged as a warning).
    Raises ``ValidationError`` for a malformed uid (``expert_record.validate_expert_uid``), a foreign ``dht``, or an
    expiration more than ``MAX_RECORD_TTL`` from now: every node would refuse them.
    """
    _check_expiration(expiration_time)
    records = expert_records(uids)  # raises here, not in the DHT process
    subkey, ok = local_subkey(dht), True
    # ~16 bytes of pickle per (uid, depth) besides the uid
    chunks = request_chunks(records, lambda record: len(record[0]) + 16, _EXPERT_BYTES_PER_REQUEST)
    for chunk in chunks:
        stored = _in_dht(
            dht,
            _store_experts,
            timeout=timeout,
            records=tuple(chunk),
            subkey=subkey,
            expiration_time=float(expiration_time),
            online=online,
        )
        if stored is None:
            logger.warning("Declaring %d expert records timed out after %.1f s", len(chunk), timeout)
            ok = False
        elif not all(stored.values()):
            refused = [key for key, was_stored in stored.items() if not was_stored]
            logger.warning("The DHT did not store the expert records under %s", ", ".join(refused))
            ok = False
    return ok


class ExpertAnnouncer(_PeriodicAnnouncer[tuple[str, ...]]):
    """A daemon thread that keeps this peer's experts declared in the DHT (``declare_experts``), as ``Announcer``
    keeps a span: every ``period`` seconds (and at once after ``update()``) it declares ``uids()`` with an expiration
    of ``2 * period`` from now; ``stop()`` withdraws them (records marked off, which lookups skip) and joins.
    Usable as a context manager::

        with ExpertAnnouncer(dht, lambda: ("ffn.0.3", "ffn.5.1"), period=30):
            serve()
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        uids: Callable[[], Sequence[str]],
        period: float = 30.0,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        super().__init__(dht, lambda: tuple(uids()), period, timeout=timeout, what="experts")
        self._online = True

    def _final_info(self, uids: tuple[str, ...]) -> tuple[str, ...]:
        self._online = False
        return uids

    def _declare(self, uids: tuple[str, ...], expiration_time: float) -> None:
        declare_experts(self.dht, uids, expiration_time, timeout=self.timeout, online=self._online)


class RunAnnouncer(_PeriodicAnnouncer[RunInfo]):
    """A daemon thread that keeps this volunteer listed in its training run (``declare_run``).

    Every ``period`` seconds (and at once after ``update()``) it declares ``info()`` with an expiration of
    ``2 * period`` from now, so a volunteer that dies leaves the listing within two periods. ``info`` is called
    from the thread: return an immutable snapshot (a ``RunInfo``). Every DHT call is bounded by ``timeout``; a
    failed announcement is logged and retried at the next period, and an exception from ``info`` skips that
    round. Usable as a context manager, which starts and stops it::

        with RunAnnouncer(dht, lambda: trainer.run_info(), period=30, bans=lambda: dict(trainer.banned)):
            trainer.train()

    ``bans`` (optional, called from the thread) returns the peers this volunteer bans from the run, {peer id
    (base58): reason}: they are declared with every run record, with the same expiration (``declare_bans``).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        info: Callable[[], RunInfo],
        period: float = 30.0,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        bans: Callable[[], Mapping[str, str]] | None = None,
    ):
        super().__init__(dht, info, period, timeout=timeout, what="run")
        self.bans = bans

    def stop(self, final: bool = True, timeout: float | None = None) -> bool:
        """Stop announcing and join the thread; True if it ended within ``timeout``.

        With ``final``, declare ``info()`` a last time (the final step and loss). The DHT keeps, per subkey,
        the record that expires last, so no record can end an earlier one: the final record expires with the
        last one (after at most ``2 * period``), and without it, the last one stays until then.
        """
        self._final = final
        return self._finish(timeout)

    def _declare(self, info: RunInfo, expiration_time: float) -> None:
        declare_run(self.dht, info, expiration_time, timeout=self.timeout)
        banned = self.bans() if self.bans is not None else {}
        if banned:
            declare_bans(self.dht, info.run_id, banned, expiration_time, timeout=self.timeout)
