"""``swarm-peer status``: one table of the swarm: per model, which peers serve which blocks, and the gaps; then
the training runs going on and their volunteers.

    swarm-peer status --initial-peers /ip4/10.0.0.1/tcp/31337/p2p/Qm...           # every model peers list
    swarm-peer status --initial-peers /ip4/10.0.0.1/tcp/31337/p2p/Qm... ./tiny    # one model

prints a model row (its id, then the readable name peers list it under) with the block coverage, then a bar per
peer over the model's blocks (a SWARM training run, ``join --train``, is listed as a model whose id is ``run-`` and
the run id; its peers' rows add their stage's optimizer steps and the samples/s they train)::

     model / peer                                   state     span   blocks   tok/s   cache   version   name
     ─────────────────────────────────────────────────────────────────────────────────────────────────────────────────
     1f0c5e9ad2b74c3e8e51f0a9d6c2b4a7  tiny-llama   GAPS      0:4    11✗✗                                uncovered: 2:4
       QmXuFb…paGnYH                                ONLINE    0:2    ██··       100   8,192   0.1.0     alice
       Qma65r…9xNcCd                                OFFLINE   2:4    ··██       100   8,192   0.1.0     alice

The coverage bar shows, per column, the fewest ONLINE peers on any block of that column (``✗``: none). Every
ONLINE peer is pinged (its ``swarm.v1.info`` RPC, in parallel, ``PING_TIMEOUT``): one that does not answer is
shown as UNREACHABLE and covers nothing, however fresh its record (a killed peer's records outlive it by up to
two announce periods). Models with more than ``BAR_WIDTH`` blocks get one column per several blocks. A model comes from the swarm's catalog
(``dht.list_model_infos``), or from the MODEL argument: an announced model id, a checkpoint directory or
``smollm2`` (its id and size are then read from the checkpoint, so it works even if no peer lists it).

Without MODEL, a second table lists the training runs volunteers announce (``swarm-peer train``,
``dht.list_runs``): a row per run (its model, how many volunteers announce it, the highest step any reached, how
updates are aggregated, inner steps per outer step), then a row per volunteer (its step, last loss, and the size
of the group it averaged with last)::

     training run / volunteer   model     volunteers   step   loss     group   aggregator      inner steps   version
     ───────────────────────────────────────────────────────────────────────────────────────────────────────────────
     my-run                     smollm2            2    120                     centered_clip            50
       QmXuFb…paGnYH                                    120   3.2104       2                                 0.1.0
       Qma65r…9xNcCd                                    119   3.3012       2                                 0.1.0

Then, for verified runs (``swarm-peer train --verify``), a third table lists the peers volunteers declare banned
(``dht.list_bans``, in the same DHT request as the runs): per run, how many volunteers it lists, then a row per
banned peer: how many of them declare the ban, whether the run agrees on it (``dht.agreed_bans``: a strict
majority of its volunteers, whom every volunteer then bans), and a reason::

     training run / banned peer   declared by   agreed   reason
     ─────────────────────────────────────────────────────────────────────────────
     my-run                              of 5
       Qma65r…9xNcCd                        3   yes      owner: wrong result
       QmXuFb…paGnYH                        1   no       input: scaled

The command is bounded: ``--timeout`` is one deadline for all of it (joining, listing, lookups, pings); at most
``MAX_MODELS`` models are looked up (pass MODEL to see another), each in one request for at most ``MAX_BLOCKS``
blocks (records that claim more are refused by every node), and at most ``MAX_RUNS`` runs are shown, with at
most ``MAX_RUN_PEERS`` volunteers and ``MAX_BANS`` bans each. What the deadline cuts off is named in a warning;
a swarm that does not list its runs in time still gets its models shown, with a warning that the runs are unknown.

``--experts PATTERN`` (repeatable) shows a grid of experts instead (``swarm-peer join --experts``): a row per pattern
(how many of its experts have a host that answers), then a row per peer that declares some of them (how many, the
first and last, whether it answers)::

     expert grid / peer   experts   of     first     last      state
     ──────────────────────────────────────────────────────────────────────
     ffn.[0:8].[0:8]          48    64   ffn.0.0   ffn.5.7   GAPS
       QmXuFb…paGnYH          32         ffn.0.0   ffn.3.7   ONLINE
       Qma65r…9xNcCd          16         ffn.4.0   ffn.5.7   UNREACHABLE

with exit status 1 if some expert of a pattern has no host that answers. A pattern names at most
``MAX_STATUS_EXPERTS`` experts.

Exit status: 0 when every shown model has a reachable ONLINE peer on every block, 1 otherwise (a model cut off
by the deadline or the cap included) or when neither a model nor a training run is found. Training runs never
change the exit status: a swarm that only trains exits 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import hivemind
from hivemind.p2p import PeerID
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from swarm_peer.cli.network import check_initial_peers, join_swarm
from swarm_peer.dht import (
    RunInfo,
    ServerInfo,
    ServerState,
    agreed_bans,
    get_block_servers,
    list_model_infos,
    list_runs_and_bans,
    validate_model_id,
)
from swarm_peer.dht.snapshot import MAX_MODELS, PING_TIMEOUT, ModelStatus, model_status, online_peers
from swarm_peer.errors import ValidationError
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings, NetworkSettings

__all__ = [
    "BAR_WIDTH",
    "MAX_BANS",
    "MAX_RUNS",
    "MAX_RUN_PEERS",
    "coverage_bar",
    "MAX_STATUS_EXPERTS",
    "render_bans",
    "render_experts",
    "run_expert_status",
    "render_runs",
    "render_status",
    "resolve_model",
    "run_status",
    "span_bar",
]

logger = logging.getLogger(__name__)

BAR_WIDTH = 60  # at most this many columns per bar; a column stands for ceil(num_blocks / BAR_WIDTH) blocks
MAX_RUNS = 16  # training runs shown, those with most volunteers (anyone can list runs: not trusted)
MAX_RUN_PEERS = 32  # volunteer rows shown per run, the furthest first
MAX_BANS = 32  # ban rows shown per run, the most declared first
MAX_STATUS_EXPERTS = 4096  # experts of one ``--experts`` pattern looked up (each a DHT key)
_NON_TERMINAL_WIDTH = 240  # piped output: wide enough that rich never folds a row
_STATE_STYLES = {ServerState.ONLINE: "green", ServerState.JOINING: "yellow", ServerState.OFFLINE: "dim red"}
_UNREACHABLE_STYLE = "bold red"


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


def _short(peer_id: PeerID | str) -> str:
    text = peer_id if isinstance(peer_id, str) else peer_id.to_base58()
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
    # SWARM training runs (``join --train``): each stage peer's optimizer steps and the samples/s it trains
    training = any(info.training_step is not None for status in statuses for _, info in status.peers)
    if training:
        table.add_column("step", justify="right", no_wrap=True)
        table.add_column("samples/s", justify="right", no_wrap=True)
    table.add_column("KV free", justify="right", no_wrap=True)
    table.add_column("graphs free", justify="right", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("name")
    for status in statuses:
        gaps = Text(f"uncovered: {_spans(status.uncovered)}", style="bold red") if status.uncovered else ""
        table.add_row(
            Text.assemble((status.model_id, "bold"), f"  {status.name}" if status.name else ""),
            Text("covered", style="green") if status.covered else Text("GAPS", style="bold red"),
            f"0:{status.num_blocks}",
            coverage_bar(status.online),
            *[""] * (6 if training else 4),
            gaps,
        )
        for peer_id, info in status.peers:
            state, style = info.state.name, _STATE_STYLES[info.state]
            if peer_id in status.unreachable:
                state, style = "UNREACHABLE", _UNREACHABLE_STYLE
            table.add_row(
                "  " + _short(peer_id),
                Text(state, style=style),
                f"{info.start_block}:{info.end_block}",
                Text(span_bar(info.start_block, info.end_block, status.num_blocks), style=style),
                f"{info.throughput:.0f}" if info.throughput else "—",
                *(
                    [
                        "" if info.training_step is None else str(info.training_step),
                        "" if info.training_step is None else f"{info.samples_per_second:.1f}",
                    ]
                    if training
                    else []
                ),
                _mib(info.cache_mb_left),
                _mib(info.graph_cache_mb_left),
                Text(info.version),  # Text, not str: what peers announce is never read as rich markup
                Text(info.public_name or ""),
            )
        table.add_section()
    console.print(table)


def render_runs(runs: dict[str, dict[str, RunInfo]], console: Console) -> None:
    """Print one table: per training run a summary row, then one row per volunteer, the furthest first.

    ``runs`` is ``dht.list_runs``'s {run id: {peer id (base58): RunInfo}}. Where volunteers disagree on the
    model name, the aggregator or the inner steps, the run row shows what most say (on a tie, the furthest).
    """
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    table.add_column("training run / volunteer", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("volunteers", justify="right", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("group", justify="right", no_wrap=True)
    table.add_column("aggregator", no_wrap=True)
    table.add_column("inner steps", justify="right", no_wrap=True)
    table.add_column("version", no_wrap=True)
    for run_id, volunteers in runs.items():
        furthest = sorted(volunteers.items(), key=lambda item: (-item[1].step, item[0]))
        infos = [info for _, info in furthest]
        table.add_row(
            Text(run_id, style="bold"),
            Text(_most_said(info.model_name for info in infos)),  # Text: never read as rich markup
            str(len(infos)),
            str(infos[0].step),
            "",
            "",
            Text(_most_said(info.aggregator for info in infos)),
            str(_most_said(info.inner_steps for info in infos)),
            "",
        )
        for peer_id, info in furthest[:MAX_RUN_PEERS]:
            table.add_row(
                "  " + _short(peer_id),
                "",
                "",
                str(info.step),
                "—" if info.loss is None else f"{info.loss:.4f}",
                str(info.peers),
                "",
                "",
                Text(info.version),
            )
        if len(furthest) > MAX_RUN_PEERS:
            table.add_row(Text(f"  … {len(furthest) - MAX_RUN_PEERS} more", style="dim"))
        table.add_section()
    console.print(table)


def render_bans(
    runs: dict[str, dict[str, RunInfo]], bans: dict[str, dict[str, dict[str, str]]], console: Console
) -> None:
    """Print one table: per run, the peers its volunteers declare banned, the most declared first.

    ``bans`` is ``dht.list_bans``'s {run id: {banned peer: {declarer: reason}}}, ``runs`` ``dht.list_runs``'s. A row
    says how many of the run's listed volunteers declare the ban (declarations of others count for nothing),
    whether the run agrees on it (``dht.agreed_bans``: a strict majority), and the reason most of them give.
    """
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    table.add_column("training run / banned peer", no_wrap=True)
    table.add_column("declared by", justify="right", no_wrap=True)
    table.add_column("agreed", no_wrap=True)
    table.add_column("reason")
    for run_id, banned in bans.items():
        volunteers = runs.get(run_id, {})
        agreed = agreed_bans(banned, volunteers)
        declared = {
            peer: [why for declarer, why in declarers.items() if declarer in volunteers]
            for peer, declarers in banned.items()
        }
        rows = sorted(declared.items(), key=lambda item: (item[0] not in agreed, -len(item[1]), item[0]))
        table.add_row(Text(run_id, style="bold"), f"of {len(volunteers)}", "", "")
        for peer, reasons in rows[:MAX_BANS]:
            table.add_row(
                "  " + _short(peer),
                str(len(reasons)),
                Text("yes", style="bold red") if peer in agreed else Text("no", style="dim"),
                Text(
                    agreed.get(peer) or (_most_said(sorted(reasons)) if reasons else "")
                ),  # never rich markup
            )
        if len(rows) > MAX_BANS:
            table.add_row(Text(f"  … {len(rows) - MAX_BANS} more", style="dim"))
        table.add_section()
    console.print(table)


def _most_said(values):
    """The value said most often, the first said on a tie."""
    return Counter(values).most_common(1)[0][0]


def _mib(mib: float) -> str:
    return f"{mib / 1024:,.1f} GiB" if mib >= 1024 else f"{mib:,.0f} MiB"


class _Deadline:
    """What is left of one overall time budget."""

    def __init__(self, seconds: float):
        self.seconds, self._end = seconds, time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left, less ``reserve`` (kept for later steps); ``TimeoutError`` once there are none."""
        left = self._end - time.monotonic() - reserve
        if left <= 0:
            raise TimeoutError(f"--timeout of {self.seconds:.1f} s is spent")
        return left


def run_status(
    model: str | None, network: NetworkSettings, *, timeout: float, console: Console | None = None
) -> int:
    """Print the swarm's status table for ``model`` (default: every model peers list, then the training runs);
    return the exit status.

    ``timeout`` bounds the whole command (see the module docstring). Raises ``click.UsageError`` for bad
    arguments and ``click.ClickException`` when the swarm cannot be joined, does not answer, or serves no (such)
    model (without ``model``: no model and no training run).
    """
    deadline = _Deadline(timeout)
    check_initial_peers(network.initial_peers, required=True)
    model_id, num_blocks = resolve_model(model) if model is not None else (None, None)
    dht = join_swarm(network, deadline.left())
    try:
        models = _models_to_show(dht, model_id, num_blocks, deadline)
        found: dict[str, list[dict[PeerID, ServerInfo]]] = {}
        for m, n in models.items():
            try:  # a model that takes the rest of the time is skipped, not fatal: anyone can list models
                found[m] = get_block_servers(dht, m, range(n[0]), timeout=deadline.left(reserve=PING_TIMEOUT))
            except TimeoutError:
                logger.debug("Looking up %s ran out of time", m, exc_info=True)
        skipped = [m for m in models if m not in found]
        if models and not found:
            raise TimeoutError(f"no model could be looked up within {timeout:.1f} s")
        # the swarm-wide view also lists training runs: after the models' lookups, leaving the pings their time
        runs, bans = (
            _runs_to_show(dht, deadline, reserve=PING_TIMEOUT if found else 0.0)
            if model is None
            else ({}, {})
        )
        if not models and not runs:
            what = (
                "a model or a training run"
                if runs is not None
                else "a model (training runs: no answer in time)"
            )
            raise click.ClickException(f"no peer in the swarm lists {what}")
        unreachable = _unreachable(dht, network, found, deadline)
    except TimeoutError as e:
        raise click.ClickException(f"the swarm did not answer: {e}") from None
    finally:
        dht.shutdown()

    statuses = [
        model_status(m, models[m][0], servers, unreachable, models[m][1]) for m, servers in found.items()
    ]
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = _NON_TERMINAL_WIDTH
    if statuses:
        render_status(statuses, console)
    if runs:
        render_runs(runs, console)
    if bans:
        render_bans(runs or {}, bans, console)
    elif runs is None:
        logger.warning("training runs unknown: the swarm did not list them within --timeout %.1f s", timeout)
    incomplete = [status for status in statuses if not status.covered]
    for status in incomplete:
        logger.warning("%s: no ONLINE peer serves blocks %s", status.model_id, _spans(status.uncovered))
    if skipped:
        logger.warning("not looked up within --timeout %.1f s: %s", timeout, ", ".join(skipped))
    return 1 if incomplete or skipped else 0


def _models_to_show(
    dht: hivemind.DHT, model_id: str | None, num_blocks: int | None, deadline: _Deadline
) -> dict[str, tuple[int, str]]:
    """{model id: (num_blocks, readable name)} of the models to look up: MODEL's, or at most ``MAX_MODELS`` that
    peers list (maybe none)."""
    infos = list_model_infos(dht, timeout=deadline.left())
    models = {m: (info.num_blocks, info.name) for m, info in infos.items()}
    if num_blocks is not None:
        return {model_id: (num_blocks, models.get(model_id, (0, ""))[1])}
    if model_id is not None:
        if model_id not in models:
            raise click.ClickException(f"no peer in the swarm lists the model {model_id}")
        return {model_id: models[model_id]}
    if len(models) > MAX_MODELS:
        logger.warning(
            "peers list %d models; showing the first %d (give MODEL to see another)", len(models), MAX_MODELS
        )
    return dict(list(models.items())[:MAX_MODELS])


def _runs_to_show(
    dht: hivemind.DHT, deadline: _Deadline, reserve: float
) -> tuple[dict[str, dict[str, RunInfo]] | None, dict[str, dict[str, dict[str, str]]]]:
    """The training runs volunteers list, at most ``MAX_RUNS`` (those with most volunteers), sorted by run id, and
    the bans declared in them (one DHT request); (None, {}) if the DHT does not list them before ``reserve``
    seconds are left of the deadline."""
    try:
        runs, bans = list_runs_and_bans(dht, timeout=deadline.left(reserve=reserve))
    except TimeoutError:
        logger.debug("Listing the training runs ran out of time", exc_info=True)
        return None, {}
    if len(runs) > MAX_RUNS:
        logger.warning(
            "volunteers list %d training runs; showing the %d with most volunteers", len(runs), MAX_RUNS
        )
        shown = sorted(runs, key=lambda run_id: (-len(runs[run_id]), run_id))[:MAX_RUNS]
        runs = {run_id: runs[run_id] for run_id in sorted(shown)}
    return runs, {run_id: bans[run_id] for run_id in runs if run_id in bans}


def _unreachable(
    dht: hivemind.DHT,
    network: NetworkSettings,
    found: dict[str, list[dict[PeerID, ServerInfo]]],
    deadline: _Deadline,
) -> frozenset[PeerID]:
    """The ONLINE peers of ``found`` that do not answer an info RPC within ``PING_TIMEOUT`` (all at once)."""
    online = online_peers(found)
    if not online:
        return frozenset()
    runtime = SwarmRuntime(ClientSettings(network=network), dht=dht)
    try:
        rtts = runtime.ping(online, timeout=min(PING_TIMEOUT, deadline.left()))
    finally:
        runtime.shutdown()
    return frozenset(peer_id for peer_id, rtt in rtts.items() if rtt is None)


@dataclass(frozen=True)
class GridStatus:
    """The experts of one pattern: who hosts each, and which hosts did not answer a ping."""

    pattern: str
    hosts: dict[str, tuple[PeerID, ...]]  # uid -> peers that declare it, in the pattern's order
    unreachable: frozenset[PeerID]

    @property
    def served(self) -> list[str]:
        """The uids with a host that answers."""
        return [uid for uid, peers in self.hosts.items() if set(peers) - self.unreachable]


def render_experts(grids: list[GridStatus], console: Console) -> None:
    """Print one table: per pattern how many of its experts are served, then one row per peer that declares some."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    for name, justify in (
        ("expert grid / peer", "left"), ("experts", "right"), ("of", "right"), ("first", "left"),
        ("last", "left"), ("state", "left"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)
    for grid in grids:
        served = grid.served
        table.add_row(
            Text(grid.pattern, style="bold"),
            str(len(served)),
            str(len(grid.hosts)),
            served[0] if served else "—",
            served[-1] if served else "—",
            Text("served", style="green")
            if len(served) == len(grid.hosts)
            else Text("GAPS", style="bold red"),
        )
        by_peer: dict[PeerID, list[str]] = {}
        for uid, peers in grid.hosts.items():
            for peer_id in peers:
                by_peer.setdefault(peer_id, []).append(uid)
        for peer_id, uids in sorted(by_peer.items(), key=lambda item: (-len(item[1]), str(item[0]))):
            down = peer_id in grid.unreachable
            table.add_row(
                "  " + _short(peer_id),
                str(len(uids)),
                "",
                uids[0],
                uids[-1],
                Text("UNREACHABLE", style=_UNREACHABLE_STYLE) if down else Text("ONLINE", style="green"),
            )
        table.add_section()
    console.print(table)


def run_expert_status(
    patterns: tuple[str, ...], network: NetworkSettings, *, timeout: float, console: Console | None = None
) -> int:
    """Print who hosts the experts of each pattern (see the module docstring); return the exit status: 1 if some
    expert has no host that answers. ``timeout`` bounds the whole command. Raises ``click.UsageError`` for a bad
    pattern, ``click.ClickException`` when the swarm cannot be joined or does not answer."""
    from swarm_peer.dht import get_experts
    from swarm_peer.moe.experts import expand_grid

    deadline = _Deadline(timeout)
    try:
        uids_of = {pattern: expand_grid(pattern) for pattern in patterns}
    except ValidationError as e:
        raise click.UsageError(str(e)) from None
    for pattern, uids in uids_of.items():
        if len(uids) > MAX_STATUS_EXPERTS:
            raise click.UsageError(
                f"{pattern} names {len(uids)} experts; status looks up {MAX_STATUS_EXPERTS}"
            )
    dht = join_swarm(network, deadline.left())
    try:
        hosts = {
            pattern: get_experts(dht, uids, timeout=deadline.left(reserve=PING_TIMEOUT))
            for pattern, uids in uids_of.items()
        }
        peers = {peer_id for found in hosts.values() for host in found.values() for peer_id in host}
        unreachable: frozenset[PeerID] = frozenset()
        if peers:
            runtime = SwarmRuntime(ClientSettings(network=network), dht=dht)
            try:
                rtts = runtime.ping(peers, timeout=min(PING_TIMEOUT, deadline.left()))
            finally:
                runtime.shutdown()
            unreachable = frozenset(peer_id for peer_id, rtt in rtts.items() if rtt is None)
    except TimeoutError as e:
        raise click.ClickException(f"the swarm did not answer: {e}") from None
    finally:
        dht.shutdown()
    grids = [GridStatus(pattern, hosts[pattern], unreachable) for pattern in patterns]
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = _NON_TERMINAL_WIDTH
    render_experts(grids, console)
    short = [grid.pattern for grid in grids if len(grid.served) < len(grid.hosts)]
    for pattern in short:
        logger.warning("%s: some experts have no host that answers", pattern)
    return 1 if short else 0
