"""``swarm-peer status``: one table of the swarm: per model, which peers serve which blocks, and the gaps.

    swarm-peer status --initial-peers /ip4/10.0.0.1/tcp/31337/p2p/Qm...           # every model peers list
    swarm-peer status --initial-peers /ip4/10.0.0.1/tcp/31337/p2p/Qm... ./tiny    # one model

prints a model row (its id, then the readable name peers list it under) with the block coverage, then a bar per
peer over the model's blocks::

     model / peer                                   state     span   blocks   tok/s   cache   version   name
     ─────────────────────────────────────────────────────────────────────────────────────────────────────────────────
     1f0c5e9ad2b74c3e8e51f0a9d6c2b4a7  tiny-llama   GAPS      0:4    11✗✗                                uncovered: 2:4
       QmXuFb…paGnYH                                ONLINE    0:2    ██··       100   8,192   0.1.0     alice
       Qma65r…9xNcCd                                OFFLINE   2:4    ··██       100   8,192   0.1.0     alice

The coverage bar shows, per column, the fewest ONLINE peers on any block of that column (``✗``: none). Models
with more than ``BAR_WIDTH`` blocks get one column per several blocks. A model comes from the swarm's catalog
(``dht.list_models``), or from the MODEL argument: an announced model id, a checkpoint directory or
``smollm2`` (its id and size are then read from the checkpoint, so it works even if no peer lists it).

Exit status: 0 when every shown model has an ONLINE peer on every block, 1 otherwise or when no model is found.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import click
import hivemind
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils.multiaddr import Multiaddr
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from swarm_peer.dht import (
    ServerInfo,
    ServerState,
    block_ranges,
    create_dht,
    get_block_servers,
    list_model_infos,
    validate_model_id,
)
from swarm_peer.errors import ValidationError
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint
from swarm_peer.settings import NetworkSettings

__all__ = [
    "BAR_WIDTH",
    "ModelStatus",
    "coverage_bar",
    "model_status",
    "render_status",
    "resolve_model",
    "run_status",
    "span_bar",
]

logger = logging.getLogger(__name__)

BAR_WIDTH = 60  # at most this many columns per bar; a column stands for ceil(num_blocks / BAR_WIDTH) blocks
_NON_TERMINAL_WIDTH = 240  # piped output: wide enough that rich never folds a row
_STATE_STYLES = {ServerState.ONLINE: "green", ServerState.JOINING: "yellow", ServerState.OFFLINE: "dim red"}


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model in the swarm.

    ``peers``: one (peer id, record) per peer that announced any block, the record in its best state (a peer
    that moved keeps OFFLINE records on the blocks it left until they expire); sorted by span.
    ``online``: per block, how many peers announced it as ONLINE.
    """

    model_id: str
    num_blocks: int
    peers: tuple[tuple[PeerID, ServerInfo], ...]
    online: tuple[int, ...]
    name: str = ""  # the readable name peers list the model under (never part of its id)

    @property
    def uncovered(self) -> tuple[tuple[int, int], ...]:
        """[start, end) ranges of blocks with no ONLINE peer."""
        return block_ranges(block for block, count in enumerate(self.online) if count == 0)

    @property
    def covered(self) -> bool:
        """Whether every block has an ONLINE peer."""
        return not self.uncovered


def resolve_model(model: str) -> tuple[str, int | None]:
    """The model id (and number of blocks, when known locally) that the MODEL argument names.

    ``smollm2`` or an existing path is a checkpoint (resolving ``smollm2`` may convert it once); anything else
    must be a model id as peers announce it. Raises ``click.BadParameter`` for a malformed model id, and
    ``ValidationError`` for a path that is no checkpoint.
    """
    if model == DEMO_MODEL or Path(model).expanduser().exists():
        checkpoint = resolve_checkpoint(model)
        return checkpoint.model_id, checkpoint.num_blocks
    try:
        return validate_model_id(model), None
    except ValidationError as e:
        raise click.BadParameter(f"{e} (nor is it a checkpoint directory)", param_hint="MODEL") from None


def model_status(
    dht: hivemind.DHT, model_id: str, num_blocks: int, *, timeout: float | None = None, name: str = ""
) -> ModelStatus:
    """Look up every block of ``model_id`` (one DHT request) and summarize it. Raises ``TimeoutError``."""
    servers = get_block_servers(dht, model_id, range(num_blocks), timeout=timeout)
    best: dict[PeerID, ServerInfo] = {}
    for block_servers in servers:
        for peer_id, info in block_servers.items():
            if peer_id not in best or info.state > best[peer_id].state:
                best[peer_id] = info
    peers = sorted(
        best.items(), key=lambda item: (item[1].start_block, item[1].end_block, item[0].to_base58())
    )
    online = tuple(
        sum(info.state == ServerState.ONLINE for info in block_servers.values()) for block_servers in servers
    )
    return ModelStatus(model_id, num_blocks, tuple(peers), online, name)


def _columns(num_blocks: int, width: int) -> list[range]:
    """The blocks each bar column stands for: ``num_blocks`` split into ``min(num_blocks, width)`` columns."""
    per_column = math.ceil(num_blocks / width)
    return [range(start, min(start + per_column, num_blocks)) for start in range(0, num_blocks, per_column)]


def span_bar(start: int, end: int, num_blocks: int, width: int = BAR_WIDTH) -> str:
    """A bar over the model's blocks, ``█`` where [start, end) covers some block: ``span_bar(1, 3, 6) == "·██···"``."""
    return "".join(
        "█" if column.start < end and start < column.stop else "·" for column in _columns(num_blocks, width)
    )


def coverage_bar(online: tuple[int, ...], width: int = BAR_WIDTH) -> Text:
    """Per column, the fewest ONLINE peers on any of its blocks: a digit (``+`` over 9), or a red ``✗`` for none."""
    bar = Text()
    for column in _columns(len(online), width):
        fewest = min(online[block] for block in column)
        if fewest == 0:
            bar.append("✗", style="bold red")
        else:
            bar.append(str(fewest) if fewest < 10 else "+", style="green")
    return bar


def _short(peer_id: PeerID) -> str:
    text = peer_id.to_base58()
    return text if len(text) <= 14 else f"{text[:6]}…{text[-6:]}"


def _spans(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{start}:{end}" for start, end in ranges)


def render_status(statuses: list[ModelStatus], console: Console) -> None:
    """Print one table: per model a coverage row, then one row (and bar) per peer."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    table.add_column("model / peer", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("span", no_wrap=True)
    table.add_column("blocks", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("cache", justify="right", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("name")
    for status in statuses:
        gaps = Text(f"uncovered: {_spans(status.uncovered)}", style="bold red") if status.uncovered else ""
        table.add_row(
            Text.assemble((status.model_id, "bold"), f"  {status.name}" if status.name else ""),
            Text("covered", style="green") if status.covered else Text("GAPS", style="bold red"),
            f"0:{status.num_blocks}",
            coverage_bar(status.online),
            "",
            "",
            "",
            gaps,
        )
        for peer_id, info in status.peers:
            style = _STATE_STYLES[info.state]
            table.add_row(
                "  " + _short(peer_id),
                Text(info.state.name, style=style),
                f"{info.start_block}:{info.end_block}",
                Text(span_bar(info.start_block, info.end_block, status.num_blocks), style=style),
                f"{info.throughput:.0f}" if info.throughput else "—",
                f"{info.cache_tokens_left:,}",
                Text(info.version),  # Text, not str: what peers announce is never read as rich markup
                Text(info.public_name or ""),
            )
        table.add_section()
    console.print(table)


def _check_initial_peers(initial_peers: tuple[str, ...]) -> None:
    if not initial_peers:
        raise click.UsageError("give --initial-peers: the multiaddr of a peer in the swarm")
    for maddr in initial_peers:
        try:
            Multiaddr(maddr)["p2p"]
        except (ValueError, LookupError) as e:
            raise click.BadParameter(
                f"{maddr!r} is not a peer's multiaddr like /ip4/10.0.0.1/tcp/31337/p2p/Qm... ({e})",
                param_hint="--initial-peers",
            ) from None


def _join(network: NetworkSettings, timeout: float) -> hivemind.DHT:
    """A DHT node joined to the swarm within ``timeout``; ``click.ClickException`` if it cannot join."""
    dht = create_dht(**network.model_dump(), start=False)
    try:
        dht.run_in_background(await_ready=True, timeout=timeout)
    except (P2PDaemonError, RuntimeError, TimeoutError) as e:
        dht.shutdown()
        reason = str(e) or f"no answer within {timeout:.1f} s"
        raise click.ClickException(
            f"cannot join the swarm at {' '.join(network.initial_peers)}: {reason}"
        ) from None
    return dht


def run_status(
    model: str | None, network: NetworkSettings, *, timeout: float, console: Console | None = None
) -> int:
    """Print the swarm's status table for ``model`` (default: every model peers list); return the exit status.

    ``timeout`` bounds joining the DHT and each lookup. Raises ``click.UsageError`` for bad arguments and
    ``click.ClickException`` when the swarm cannot be joined, does not answer, or serves no (such) model.
    """
    _check_initial_peers(network.initial_peers)
    model_id, num_blocks = resolve_model(model) if model is not None else (None, None)
    dht = _join(network, timeout)
    try:
        infos = list_model_infos(dht, timeout=timeout)
        names = {m: info.name for m, info in infos.items()}
        if num_blocks is not None:
            models = {model_id: num_blocks}
        else:
            models = {m: info.num_blocks for m, info in infos.items()}
            if model_id is not None:
                if model_id not in models:
                    raise click.ClickException(f"no peer in the swarm lists the model {model_id}")
                models = {model_id: models[model_id]}
            elif not models:
                raise click.ClickException("no peer in the swarm lists a model")
        statuses = [
            model_status(dht, m, n, timeout=timeout, name=names.get(m, "")) for m, n in models.items()
        ]
    except TimeoutError as e:
        raise click.ClickException(f"the swarm did not answer: {e}") from None
    finally:
        dht.shutdown()

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = _NON_TERMINAL_WIDTH
    render_status(statuses, console)
    incomplete = [status for status in statuses if not status.covered]
    for status in incomplete:
        logger.warning("%s: no ONLINE peer serves blocks %s", status.model_id, _spans(status.uncovered))
    return 1 if incomplete else 0
