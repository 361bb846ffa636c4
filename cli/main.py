"""``swarm-peer`` commands: dht, join, generate, finetune, train, status, demo.

    swarm-peer dht --host 127.0.0.1 --port 31337 --identity boot.key
    swarm-peer join MODEL --initial-peers MADDR --blocks 0:15 [--device cpu] [--dtype float32]
    swarm-peer join --experts 'ffn.[0:8].[0:8]' --expert-type ffn --hidden 512 --initial-peers MADDR [--lr 1e-3]
    swarm-peer generate MODEL --initial-peers MADDR --max-new-tokens 40 "The capital of France is"
    swarm-peer finetune MODEL --initial-peers MADDR --data FILE.txt --output DIR [--mode lora|ptune|deep_ptune]
    swarm-peer train MODEL --data FILE.txt --run-id RUN --initial-peers MADDR [--inner-steps 50] [--min-peers K]
    swarm-peer status --initial-peers MADDR [MODEL]
    swarm-peer export-client MODEL OUT/
    swarm-peer demo

MODEL is a local checkpoint directory, or ``smollm2`` for the bundled demo model. Logging goes to stderr (warnings
and the commands' own lines; with ``-v``, everything); stdout carries only what a script may read (multiaddrs,
the "Serving blocks" line, generated text). Errors are one line (``error: ...``), with exit status 1 or 2.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

import click

from swarm_peer.errors import SwarmError

logger = logging.getLogger("swarm_peer.cli")


_PROGRESS = "swarm_peer.progress"  # in the click context's meta: whether the command shows progress bars


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    """By default: warnings, and the info lines of the commands themselves (``swarm_peer.cli``, and the metrics
    URL of a peer); with ``--verbose``: every debug line of swarm-peer, timestamped; with ``--quiet``: errors only,
    and no progress bars (``progress_bars``), third-party ones included. Libraries stay at warnings (errors with
    ``--quiet``)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose and not quiet:
        for ours in ("swarm_peer.cli", "swarm_peer.peer.metrics"):
            logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("hivemind", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR if quiet else logging.WARNING)
    if quiet:
        # tqdm reads this when it is first imported (not yet: commands import their libraries later), so the bars
        # of libraries (transformers' GGUF loading, ...) are off too, here and in the processes this one starts
        os.environ["TQDM_DISABLE"] = "1"


def progress_bars() -> bool:
    """Whether the running command shows progress bars on stderr: yes, unless ``--quiet``; never outside the CLI."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.meta.get(_PROGRESS, False)


def _network_options(f, *, client: bool = False):
    """The options of how a command joins the swarm; a ``client`` command (it serves nothing) defaults to client
    mode, and ``--no-client-mode`` makes it a full DHT node that others can reach and store records on."""
    if client:
        client_mode = click.option(
            "--client-mode/--no-client-mode",
            default=True,
            show_default=True,
            help="make outgoing connections only (behind NAT/firewall); off: a full DHT node",
        )
    else:
        client_mode = click.option(
            "--client-mode", is_flag=True, help="make outgoing connections only (behind NAT/firewall)"
        )
    options = [
        click.option("--initial-peers", multiple=True, help="multiaddr of a peer in the swarm (repeatable)"),
        click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on"),
        click.option("--port", default=0, type=click.IntRange(0, 65535), help="TCP port (0 = any free port)"),
        click.option(
            "--identity", "identity_path", type=click.Path(dir_okay=False), help="key file: stable peer id"
        ),
        click.option("--announce-maddrs", multiple=True, help="public multiaddr to announce (repeatable)"),
        client_mode,
        click.option("--no-relay", is_flag=True, help="do not use libp2p relays"),
        click.option("--use-auto-relay", is_flag=True, help="find relays automatically when not reachable"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _client_network_options(f):
    return _network_options(f, client=True)


def _network_settings(kwargs: dict, *, need_peers: bool = False):
    """The ``NetworkSettings`` of the network options; ``--initial-peers`` checked (and required if
    ``need_peers``) before the command loads anything."""
    from swarm_peer.settings import NetworkSettings

    return NetworkSettings(
        initial_peers=_initial_peers(kwargs.pop("initial_peers"), required=need_peers),
        host=kwargs.pop("host"),
        port=kwargs.pop("port"),
        identity_path=kwargs.pop("identity_path"),
        announce_maddrs=tuple(kwargs.pop("announce_maddrs")),
        client_mode=kwargs.pop("client_mode"),
        use_relay=not kwargs.pop("no_relay"),
        use_auto_relay=kwargs.pop("use_auto_relay"),
    )


def _initial_peers(values: tuple[str, ...], *, required: bool) -> tuple[str, ...]:
    """The multiaddrs of ``--initial-peers`` (each value may hold several, space-separated), checked."""
    from swarm_peer.cli.network import check_initial_peers

    initial_peers = tuple(p for arg in values for p in arg.split())
    check_initial_peers(initial_peers, required=required)
    return initial_peers


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.option("-q", "--quiet", is_flag=True, help="errors only, no progress bars")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """swarm-peer: pool machines to run models too large for any one of them."""
    if verbose and quiet:
        raise click.UsageError("give -v/--verbose or -q/--quiet, not both")
    _configure_logging(verbose, quiet)
    ctx.meta[_PROGRESS] = not quiet


@cli.command()
@_network_options
def dht(**kwargs) -> None:
    """Run a DHT node (e.g. a swarm's bootstrap peer); prints its multiaddrs, one per line."""
    from swarm_peer.dht import create_dht, visible_maddrs

    net = _network_settings(kwargs)
    node = create_dht(**net.model_dump())
    for maddr in visible_maddrs(node):
        click.echo(maddr)
    sys.stdout.flush()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        node.shutdown()


def _parse_blocks(ctx, param, value):
    if value is None:
        return None
    try:
        start, end = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected START:END, e.g. 0:15, not {value!r}") from None
    if not 0 <= start < end:
        raise click.BadParameter(f"need 0 <= START < END, got {value!r}")
    return start, end


_COUNT = click.IntRange(min=1)


def _peer_option(field: str, type=_COUNT, **extra):
    """A ``join`` option whose default and help come from ``PeerSettings``, so the two never disagree."""
    return _settings_option("PeerSettings", field, type, **extra)


def _settings_option(settings: str, field: str, type, **extra):
    """An option whose default and help come from the field of the settings class named ``settings``."""
    import swarm_peer.settings

    info = getattr(swarm_peer.settings, settings).model_fields[field]
    return click.option(
        "--" + field.replace("_", "-"),
        field,
        type=type,
        default=None if info.is_required() else info.default,
        show_default=True,
        help=info.description,
        **extra,
    )


_PEER_FIELDS = (
    "cache_mb",
    "client_cache_share",
    "max_length",
    "max_batch_tokens",
    "batch_wait_ms",
    "throughput",
    "bandwidth_mbps",
    "rebalance_period",
    "balance_quality",
    "announce_period",
    "shutdown_grace",
    "session_timeout",
    "max_session_seconds",
    "max_request_seconds",
    "max_inbound_mb",
    "max_streams",
    "added_latency",
    "adapters",
    "max_lora_rank",
    "lora_cache_mb",
    "graph_cache_mb",
    "metrics_port",
    "progress",
)


def _parse_throughput(ctx, param, value: str):
    if value in ("auto", "eval"):
        return value
    from swarm_peer.dht.records import MAX_RATE  # imports hivemind: only when joining

    try:
        throughput = float(value)
    except ValueError:
        raise click.BadParameter("expected tokens/s (a number), 'auto' or 'eval'") from None
    if not 0 < throughput <= MAX_RATE:
        raise click.BadParameter(f"expected tokens/s in (0, {MAX_RATE:.0e}], 'auto' or 'eval'")
    return throughput


def _check_announce_period(ctx, param, value: float) -> float:
    from swarm_peer.dht.records import MAX_ANNOUNCE_PERIOD  # imports hivemind: only when joining

    if value > MAX_ANNOUNCE_PERIOD:
        raise click.BadParameter(f"at most {MAX_ANNOUNCE_PERIOD:.0f} s: records outliving that are refused")
    return value


def _stage_option(field: str, type=_COUNT, **extra):
    """A ``join --train`` option, with its default and help from ``StageSettings``."""
    return _settings_option("StageSettings", field, type, **extra)


def _expert_option(field: str, type=_COUNT, **extra):
    """A ``join`` option of the experts a peer hosts, with its default and help from ``ExpertSettings``."""
    return _settings_option("ExpertSettings", field, type, **extra)


def _trained_option(field: str, type, **extra):
    """A ``join`` option that trained experts and a training stage share (``ExpertSettings``, ``StageSettings``):
    its help gives each one's default; left out, each keeps its own."""
    import swarm_peer.settings

    expert = swarm_peer.settings.ExpertSettings.model_fields[field]
    stage = swarm_peer.settings.StageSettings.model_fields[field]
    return click.option(
        "--" + field.replace("_", "-"),
        field,
        type=type,
        default=None,
        help=f"{stage.description} [default: {expert.default} for experts, {stage.default} for a stage]",
        **extra,
    )


_EXPERT_FIELDS = ("expert_type", "expert_modules", "seed", "update_every", "checkpoint_period", "fail_rate")
_TRAINED_FIELDS = ("lr", "weight_decay", "average_every", "averaging_timeout")
_STAGE_FIELDS = ("run_id", "target_batch_size", "aggregator", "compression", "emulated_speed")


def _expert_settings(patterns: tuple[str, ...], hidden: int | None, checkpoint_dir: str | None, kwargs: dict):
    """The ``ExpertSettings`` of ``join --experts PATTERN ...`` (None without ``--experts``)."""
    from swarm_peer.moe.experts import expand_grid
    from swarm_peer.settings import ExpertSettings

    fields = {field: kwargs.pop(field) for field in _EXPERT_FIELDS}
    if not patterns:
        if hidden is not None or checkpoint_dir is not None:
            raise click.UsageError("--hidden and --checkpoint-dir go with --experts")
        return None
    if hidden is None:
        raise click.UsageError("--experts needs --hidden (the experts' width)")
    uids = tuple(dict.fromkeys(uid for pattern in patterns for uid in expand_grid(pattern)))
    return ExpertSettings(
        uids=uids, hidden=hidden, checkpoint_dir=checkpoint_dir, **fields, **_trained(kwargs)
    )


def _trained(kwargs: dict) -> dict:
    """The options that trained experts and a stage share (``_trained_option``), those given."""
    return {field: value for field in _TRAINED_FIELDS if (value := kwargs.pop(field)) is not None}


def _stage_settings(train: bool, kwargs: dict):
    """The ``StageSettings`` of ``join MODEL --train --run-id RUN ...`` (None without ``--train``)."""
    from swarm_peer.settings import StageSettings

    fields = {field: kwargs.pop(field) for field in _STAGE_FIELDS}
    if not train:
        if fields["run_id"] is not None:
            raise click.UsageError("--run-id goes with --train")
        return None
    if fields["run_id"] is None:
        raise click.UsageError("--train needs --run-id (the run's name)")
    if kwargs["adapters"]:
        raise click.UsageError("a training stage serves no --adapters")
    return StageSettings(**fields, **_trained(kwargs))


@cli.command()
@click.argument("model", required=False)
@click.option(
    "--experts",
    "expert_patterns",
    multiple=True,
    metavar="PATTERN",
    help="host trainable experts instead of blocks: a grid of uids, e.g. 'ffn.[0:8].[0:8]' (repeatable)",
)
@_expert_option("expert_type", type=str)
@click.option("--hidden", type=click.IntRange(1, 65536), help="the experts' input and output width")
@_expert_option("expert_modules", type=str, multiple=True, metavar="MODULE")
@_trained_option("lr", type=click.FloatRange(min=0, min_open=True))
@_trained_option("weight_decay", type=click.FloatRange(min=0))
@_expert_option("update_every")
@_trained_option("average_every", type=_COUNT)
@_trained_option("averaging_timeout", type=click.FloatRange(min=0, min_open=True))
@_expert_option("seed", type=int)
@click.option(
    "--train",
    is_flag=True,
    help="train the blocks as a stage of a SWARM run (--run-id); trainers push batches",
)
@_stage_option("run_id", type=str)
@_stage_option("target_batch_size")
@_stage_option("aggregator", type=click.Choice(["centered_clip", "mean"]))
@_stage_option("compression", type=click.Choice(["none", "float16", "8bit"]))
@_stage_option("emulated_speed", type=click.FloatRange(min=0, min_open=True), hidden=True)
@click.option(
    "--checkpoint-dir", type=click.Path(file_okay=False), help="the experts' state: saved and restored"
)
@_expert_option("checkpoint_period", type=click.FloatRange(min=0))
@_expert_option("fail_rate", type=click.FloatRange(0, 1), hidden=True)
@click.option("--blocks", callback=_parse_blocks, help="span START:END of blocks to serve, e.g. 0:15")
@click.option(
    "--num-blocks", type=click.IntRange(min=1), help="serve this many blocks where the swarm is weakest"
)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@_peer_option("cache_mb", type=click.FloatRange(min=0, min_open=True))
@_peer_option("client_cache_share", type=click.FloatRange(min=0, max=1, min_open=True))
@_peer_option("max_length")
@_peer_option("max_batch_tokens")
@_peer_option("batch_wait_ms", type=click.FloatRange(min=0, max=1000))
@_peer_option("throughput", type=str, callback=_parse_throughput)
@_peer_option("bandwidth_mbps", type=click.FloatRange(min=0, min_open=True))
@_peer_option("rebalance_period", type=click.FloatRange(min=0))
@_peer_option("balance_quality", type=click.FloatRange(min=0, max=1, min_open=True))
@_peer_option("announce_period", type=click.FloatRange(min=0, min_open=True), callback=_check_announce_period)
@_peer_option("shutdown_grace", type=click.FloatRange(min=0))
@_peer_option("session_timeout", type=click.FloatRange(min=0, min_open=True))
@_peer_option("max_session_seconds", type=click.FloatRange(min=0, min_open=True))
@_peer_option("max_request_seconds", type=click.FloatRange(min=0, min_open=True))
@_peer_option("max_inbound_mb", type=click.FloatRange(min=0, min_open=True))
@_peer_option("max_streams")
@_peer_option("added_latency", type=click.FloatRange(min=0), hidden=True)
@_peer_option("adapters", type=str, multiple=True, metavar="[NAME=]PATH")
@_peer_option("max_lora_rank")
@_peer_option("lora_cache_mb", type=click.FloatRange(min=0, min_open=True))
@_peer_option("graph_cache_mb", type=click.FloatRange(min=0))
@_peer_option("metrics_port", type=click.IntRange(0, 65535))
@click.option(
    "--progress/--no-progress",
    default=progress_bars,
    help="progress bars on stderr while it is a terminal (converting the demo model, loading blocks) [default: on, "
    "off with -q]",
)
@click.option("--public-name", help="a name shown to others in swarm listings")
@click.option(
    "--model-name", help="the model's readable name in listings and logs [default: its folder's name]"
)
@click.option(
    "--compute-threads",
    type=click.IntRange(min=1),
    help="torch threads for all compute [default: torch's; single-token steps measure whether 1 is as fast]",
)
@_network_options
def join(
    model,
    expert_patterns,
    hidden,
    checkpoint_dir,
    train,
    blocks,
    num_blocks,
    device,
    dtype,
    public_name,
    model_name,
    compute_threads,
    **kwargs,
):
    """Serve blocks of MODEL (a checkpoint dir, or 'smollm2') to the swarm, or trainable experts (--experts)."""
    if (model is None) == (not expert_patterns):
        raise click.UsageError(
            "give MODEL to serve its blocks, or --experts PATTERN to host experts (not both)"
        )
    if expert_patterns and (blocks or num_blocks or kwargs["adapters"] or dtype != "float32"):
        raise click.UsageError(
            "--blocks, --num-blocks, --adapters and --dtype are for blocks: experts train in float32"
        )
    if train and expert_patterns:
        raise click.UsageError("--train trains a span of MODEL's blocks; experts train as they are")
    stage = _stage_settings(train, kwargs)
    experts = _expert_settings(expert_patterns, hidden, checkpoint_dir, kwargs)
    if experts is None and stage is None and (given := _trained(kwargs)):
        options = ", ".join("--" + field.replace("_", "-") for field in given)
        raise click.UsageError(f"{options}: for trained experts (--experts) or a training stage (--train)")

    from transformers.utils import logging as transformers_logging

    from swarm_peer.peer.server import ExpertPeer, Peer
    from swarm_peer.settings import PeerSettings

    transformers_logging.disable_progress_bar()  # a bar per span loaded: the peer logs one line instead

    if blocks and num_blocks:
        raise click.UsageError("give either --blocks or --num-blocks, not both")
    if kwargs["rebalance_period"] == 0:
        kwargs["rebalance_period"] = None  # never move
    settings = PeerSettings(
        model=model,
        experts=experts,
        train=stage,
        blocks=blocks,
        num_blocks=num_blocks,
        device=device,
        dtype=dtype,
        public_name=public_name,
        model_name=model_name,
        **{field: kwargs.pop(field) for field in _PEER_FIELDS},
        compute_threads=compute_threads,
        network=_network_settings(kwargs),
    )
    if experts is not None:
        expert_peer = ExpertPeer(settings)
        patterns = " ".join(expert_patterns)
        expert_peer.run(
            on_ready=lambda: click.echo(
                f"Serving experts {patterns} ({len(experts.uids)} {experts.expert_type}) as {expert_peer.dht.peer_id}"
            )
        )
        return
    peer = Peer(settings)
    peer.run(
        on_ready=lambda: click.echo(
            f"Serving blocks {peer.span.start}:{peer.span.end} of {peer.model_id} as {peer.dht.peer_id}"
        )
    )


_compression_option = click.option(
    "--compression",
    type=click.Choice(["none", "float16", "bfloat16", "8bit"]),
    default="none",
    show_default=True,
    help="how hidden states (and gradients) travel between the peers and this client",
)


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--chat/--no-chat", default=False, help="apply the tokenizer's chat template to the prompt")
@click.option("--do-sample", is_flag=True, help="sample instead of greedy decoding")
@click.option("--temperature", type=float, default=1.0)
@click.option("--top-p", type=float, default=1.0)
@click.option("--seed", type=int, default=0)
@_compression_option
@_client_network_options
def generate(model, prompt, max_new_tokens, chat, do_sample, temperature, top_p, seed, compression, **kwargs):
    """Generate from PROMPT through the swarm, printing text as it is produced."""
    from swarm_peer.settings import ClientSettings

    settings = ClientSettings(network=_network_settings(kwargs, need_peers=True), compression=compression)
    from swarm_peer.cli.generation import stream_generate  # torch and transformers: after the argument checks

    stream_generate(
        model,
        prompt,
        settings,
        max_new_tokens=max_new_tokens,
        chat=chat,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


def _parse_target_modules(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(","))
    bad = [name for name in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name)]
    if bad:
        raise click.BadParameter(f"expected comma-separated module names, e.g. q_proj,v_proj; bad: {bad}")
    return names


@cli.command()
@click.argument("model")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a UTF-8 text file to train on",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="folder to save the PEFT adapter into",
)
@click.option("--mode", type=click.Choice(["lora", "ptune", "deep_ptune"]), default="lora", show_default=True)
@click.option("--lora-r", type=_COUNT, default=8, show_default=True, help="LoRA rank")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=16, show_default=True)
@click.option(
    "--target-modules",
    default="q_proj,v_proj",
    show_default=True,
    callback=_parse_target_modules,
    help="comma-separated linear layers of each block that LoRA adapts",
)
@click.option("--num-prompts", type=_COUNT, default=16, show_default=True, help="prompt tokens (ptune modes)")
@click.option("--steps", type=_COUNT, help="optimizer steps [default: one epoch]")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="passes over the data")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-size", type=_COUNT, default=4, show_default=True, help="blocks of text per step")
@click.option(
    "--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="tokens per block"
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False),
    help="tokenizer folder [default: the MODEL checkpoint]",
)
@click.option("--adapter", default="", help="train on top of this LoRA adapter that the peers serve")
@click.option("--seed", type=int, default=0, show_default=True)
@_compression_option
@_client_network_options
def finetune(model, data, output, mode, steps, epochs, batch_size, seq_len, tokenizer, compression, **kwargs):
    """Train a LoRA or (deep) prompts for MODEL on a text file through the swarm; save a PEFT adapter."""
    if steps and epochs:
        raise click.UsageError("give either --steps or --epochs, not both")
    from swarm_peer.cli.finetune import load_blocks, run_finetune
    from swarm_peer.models import resolve_checkpoint
    from swarm_peer.settings import ClientSettings

    # --initial-peers is checked, but not required yet: the data, tokenizer and LoRA targets are checked first
    settings = ClientSettings(network=_network_settings(kwargs), compression=compression)
    checkpoint = resolve_checkpoint(model)
    blocks_NT = load_blocks(data, tokenizer or checkpoint.path, seq_len)
    if not steps:
        steps = math.ceil(blocks_NT.shape[0] * (epochs or 1) / batch_size)
    logger.info(f"{blocks_NT.shape[0]} blocks of {seq_len} tokens, {steps} steps of {batch_size} blocks")
    losses = run_finetune(
        model,
        settings,
        data=data,
        output=output,
        mode=mode,
        blocks_NT=blocks_NT,
        steps=steps,
        batch_size=batch_size,
        **kwargs,
    )
    click.echo(f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}; adapter saved to {output}")


def _train_option(field: str, type=_COUNT, **extra):
    """A ``train`` option whose default and help come from ``TrainSettings``."""
    return _settings_option("TrainSettings", field, type, **extra)


_POSITIVE = click.FloatRange(min=0, min_open=True)
_TRAIN_FIELDS = (
    "run_id", "swarm", "inner_steps", "aggregator", "byzantine", "tau", "batch_size", "micro_batches", "seq_len", "lr",
    "weight_decay",
    "outer_lr", "outer_momentum", "steps", "min_peers", "group_size", "averaging_timeout", "compression",
    "checkpoint_dir", "device", "seed", "verify", "verify_rate", "attack",
)  # fmt: skip


@cli.command()
@click.argument("model")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="a UTF-8 text file: this volunteer's shard of the training text",
)
@_train_option("run_id", type=str, required=True)
@_train_option("swarm", type=bool, is_flag=True)
@_train_option("inner_steps")
@_train_option(
    "aggregator", type=click.Choice(["centered_clip", "mean", "median", "trimmed_mean", "krum", "geomedian"])
)
@_train_option("byzantine", type=click.IntRange(min=0))
@_train_option("tau", type=_POSITIVE)
@_train_option("batch_size")
@_train_option("micro_batches")
@_train_option("seq_len", type=click.IntRange(min=2))
@_train_option("lr", type=_POSITIVE)
@_train_option("weight_decay", type=click.FloatRange(min=0))
@_train_option("outer_lr", type=_POSITIVE)
@_train_option("outer_momentum", type=click.FloatRange(min=0, max=1, max_open=True))
@_train_option("steps")
@_train_option("min_peers")
@_train_option("group_size", type=click.IntRange(min=2))
@_train_option("averaging_timeout", type=_POSITIVE)
@_train_option("compression", type=click.Choice(["none", "float16", "8bit"]))
@_train_option("checkpoint_dir", type=click.Path(file_okay=False))
@_train_option("device", type=str)
@_train_option("seed", type=int)
@_train_option("verify", type=bool, is_flag=True)
@_train_option("verify_rate", type=click.FloatRange(min=0, max=1, min_open=True))
@_train_option("attack", type=click.Choice(["none", "scale", "nan", "owner"]), hidden=True)
@_network_options
def train(model, data, **kwargs):
    """Train MODEL together with the other volunteers of a run: DiLoCo over robust averaging; with --swarm, through
    the run's SWARM pipeline stages (peers that joined with --train)."""
    from pydantic import ValidationError

    from swarm_peer.settings import TrainSettings

    try:
        settings = TrainSettings(
            model=model,
            data=data,
            **{field: kwargs.pop(field) for field in _TRAIN_FIELDS},
            network=_network_settings(kwargs),
        )
    except ValidationError as e:
        raise click.UsageError("; ".join(_setting_error(error) for error in e.errors())) from None
    from swarm_peer.cli.train import run_train  # torch and transformers: after the argument checks

    run_train(settings)


def _setting_error(error: dict) -> str:
    """A pydantic error about a setting, as the option it came from says it."""
    message = error["msg"].removeprefix("Value error, ")
    return f"--{str(error['loc'][0]).replace('_', '-')}: {message}" if error["loc"] else message


@cli.command()
@click.argument("model", required=False)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="seconds to wait for the swarm when joining and per lookup",
)
@click.option(
    "--experts",
    "expert_patterns",
    multiple=True,
    metavar="PATTERN",
    help="show who hosts the experts of a grid instead, e.g. 'ffn.[0:8].[0:8]' (repeatable)",
)
@_client_network_options
def status(model, timeout, expert_patterns, **kwargs):
    """Who serves which blocks of MODEL (default: every model, then the training runs and the peers verified runs
    ban), or which experts of a grid (--experts); exit 1 on a gap."""
    network = _network_settings(kwargs, need_peers=True)
    if expert_patterns:
        if model is not None:
            raise click.UsageError("give MODEL or --experts, not both")
        from swarm_peer.cli.status import run_expert_status

        sys.exit(run_expert_status(expert_patterns, network, timeout=timeout))
    from swarm_peer.cli.status import run_status

    sys.exit(run_status(model, network, timeout=timeout))


@cli.command()
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="seconds between looks at the swarm (the page polls at that pace)",
)
@click.option("--initial-peers", multiple=True, help="multiaddr of a peer in the swarm (repeatable)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address the page is served on")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="HTTP port (0 = any)"
)
def monitor(refresh, initial_peers, host, port):
    """Serve a health page of the swarm (/) and its JSON (/api/v1/state) until Ctrl-C; prints "Monitor listening on
    http://HOST:PORT" when ready. Its DHT node is a client (outgoing connections only)."""
    from swarm_peer.settings import NetworkSettings

    network = NetworkSettings(initial_peers=_initial_peers(initial_peers, required=True), client_mode=True)
    from swarm_peer.cli.http import run_monitor  # hivemind, fastapi: after the argument checks

    run_monitor(network, host=host, port=port, refresh=refresh)


def _api_option(field: str, type=_COUNT, **extra):
    """An ``api`` option whose default and help come from ``ApiSettings``."""
    return _settings_option("ApiSettings", field, type, **extra)


_API_FIELDS = ("max_tokens", "max_prompt_tokens", "max_concurrent", "request_timeout", "max_body_kb")


@cli.command()
@click.argument("model")
@click.option("--name", help="the model's name in requests and /v1/models [default: MODEL]")
@_api_option("max_tokens")
@_api_option("max_prompt_tokens")
@_api_option("max_concurrent")
@_api_option("request_timeout", type=click.FloatRange(min=0, min_open=True))
@_api_option("max_body_kb")
@click.option("--initial-peers", multiple=True, help="multiaddr of a peer in the swarm (repeatable)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address the HTTP server listens on")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="HTTP port (0 = any)"
)
def api(model, name, initial_peers, host, port, **kwargs):
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /health, /metrics) and the swarm's
    health page (/) for MODEL, generating through the swarm."""
    from swarm_peer.settings import ApiSettings, ClientSettings, NetworkSettings

    network = NetworkSettings(initial_peers=_initial_peers(initial_peers, required=True), client_mode=True)
    settings = ApiSettings(
        model=model,
        name=name or (Path(model).name if Path(model).is_dir() else model),
        host=host,
        port=port,
        **{field: kwargs.pop(field) for field in _API_FIELDS},
        client=ClientSettings(network=network),
    )
    from swarm_peer.cli.http import run_api  # torch, transformers, fastapi: after the argument checks

    run_api(settings)


@cli.command("export-client")
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model-name", help="readable name stored in the manifest [default: MODEL's folder name]")
def export_client(model, output, model_name):
    """Write what a client of MODEL needs into the new folder OUTPUT: manifest, config, tokenizer, embeddings, head."""
    from swarm_peer.cli.export import export_client

    manifest = export_client(model, output, name=model_name)
    click.echo(f"Exported the client of {manifest.name} ({manifest.model_id}) to {output}")


@cli.command()
@click.option("--prompt", default="What is the capital of France? Answer in one sentence.", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--peers", "num_peers", type=click.IntRange(1, 30), default=3, show_default=True)
def demo(prompt, max_new_tokens, num_peers):
    """Start a local swarm serving SmolLM2 (bootstrap + 3 peers x 10 blocks) and chat through it."""
    from swarm_peer.cli.demo import run_demo

    run_demo(prompt, max_new_tokens=max_new_tokens, num_peers=num_peers)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except SwarmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
