"""``swarm-peer train``: one volunteer of a collaborative training run (``client.diloco``), from the command line;
with ``--swarm``, a trainer of a SWARM run whose blocks train on stage peers (``client.swarm_trainer``).

    swarm-peer train MODEL --data shard.txt --run-id my-run --initial-peers MADDR [--inner-steps 50]
        [--aggregator centered_clip] [--min-peers K] [--group-size G] [--steps N] [--checkpoint-dir ckpt/]
    swarm-peer train MODEL --swarm --data shard.txt --run-id my-run --initial-peers MADDR [--micro-batches 4]

MODEL is a Hugging Face folder with its tokenizer (with weights; or only a config, for random weights: every
volunteer then draws the same ones, seeded by the run id) or ``smollm2``. With ``--checkpoint-dir``, the global
weights are saved there at every round (a folder ``from_pretrained`` loads, with the tokenizer) with the state to
resume from; a volunteer started again on the same folder resumes, then takes the run's newer state if a member
has one.
"""

from __future__ import annotations

import hashlib
import math
import signal
from pathlib import Path

import click
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swarm_peer.client.diloco import DiLoCoTrainer, latest_checkpoint
from swarm_peer.client.model import DistributedModelForCausalLM
from swarm_peer.client.swarm_trainer import SwarmTrainer
from swarm_peer.client.text_data import TokenStream
from swarm_peer.dht import RunInfo
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings, TrainSettings

__all__ = ["load_model", "run_train"]

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def load_model(path: Path, run_id: str):
    """The causal LM in ``path`` (float32), or a random one from its config, the same for every volunteer of
    ``run_id``."""
    if any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seed = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "little")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_train(settings: TrainSettings) -> None:
    from tqdm.auto import tqdm

    from swarm_peer.cli.main import progress_bars

    # Ctrl-C and SIGTERM stop the volunteer, as they stop `join` and `dht`, even when it was started with SIGINT
    # ignored (as shells start background jobs: Python would then keep ignoring it)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)

    from swarm_peer.dht import RunAnnouncer, create_dht

    path = (
        resolve_checkpoint(DEMO_MODEL, progress_bars()).path
        if settings.model == DEMO_MODEL
        else Path(settings.model)
    )
    if not (path / "config.json").is_file():
        raise click.BadParameter(f"{path} holds no config.json", param_hint="MODEL")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    stream = TokenStream.from_file(settings.data, tokenizer)
    resume = latest_checkpoint(settings.checkpoint_dir) if settings.checkpoint_dir else None
    if settings.swarm:
        dht = create_dht(**settings.network.model_dump())
        runtime = SwarmRuntime(ClientSettings(network=settings.network), dht=dht)
        model = DistributedModelForCausalLM.from_pretrained(
            str(resume or path), runtime=runtime, run_id=settings.run_id, compression=settings.compression
        )
        trainer = SwarmTrainer(model, stream, settings, dht)
    else:
        model = load_model(resume or path, settings.run_id)
        dht = create_dht(**settings.network.model_dump())
        trainer = DiLoCoTrainer(model, stream, settings, dht)
    announcer = RunAnnouncer(
        dht,
        lambda: _run_info(trainer, settings.model if settings.model == DEMO_MODEL else path.name),
        # a verified run's volunteers declare whom they ban, so that those that missed the round ban them too
        bans=(lambda: dict(trainer.banned)) if settings.verify else None,
    )
    announcer.start()
    finished = False
    try:
        if resume is not None:
            trainer.restore(resume)
        if trainer.join():
            click.echo(f"Took the run's state at step {trainer.step} from a member", err=True)
        rounds = 0
        with tqdm(
            total=settings.steps,
            initial=trainer.step,
            desc=f"train {settings.run_id}",
            unit="step",
            disable=not progress_bars(),
        ) as bar:
            for record in trainer.train(settings.steps):
                bar.update()
                if record.peers is not None:
                    rounds += 1
                    announcer.update()
                    bar.set_postfix(loss=f"{record.loss:.4f}", peers=record.peers)
                    if settings.checkpoint_dir and not settings.swarm:  # a SWARM trainer assembles it at exit
                        trainer.save(settings.checkpoint_dir, tokenizer)
                else:
                    bar.set_postfix(loss=f"{record.loss:.4f}")
        # a volunteer whose last round failed on its side takes the state of those that finished it: stay for it
        trainer.linger()
        if settings.checkpoint_dir and settings.swarm:
            trainer.save(settings.checkpoint_dir, tokenizer)
        last = trainer.history[-1].loss if trainer.history else float("nan")
        where = f"; global weights in {settings.checkpoint_dir}" if settings.checkpoint_dir else ""
        retried = f"; {model.remote.blocks.retries} stage calls retried" if settings.swarm else ""
        click.echo(f"Trained to step {trainer.step} ({rounds} rounds), last loss {last:.4f}{where}{retried}")
        finished = True
    finally:
        # interrupted (Ctrl-C, an error): leave at once; the DHT may be slow to store a last record (it tries
        # every peer it knows, dead ones included), and the record lapses by itself
        announcer.stop(final=finished, timeout=None if finished else 1.0)
        trainer.shutdown()
        if settings.swarm:
            model.shutdown()
        dht.shutdown()


def _run_info(trainer: DiLoCoTrainer, model_name: str) -> RunInfo:
    """What ``swarm-peer status`` shows of this volunteer."""
    history, settings = trainer.history, trainer.settings
    last_round = next((record.peers for record in reversed(history) if record.peers is not None), 1)
    return RunInfo(
        run_id=settings.run_id,
        model_name=model_name[:64] or "model",
        step=trainer.global_step,  # the last round's end: a volunteer waiting in a round is not past it
        loss=history[-1].loss if history and math.isfinite(history[-1].loss) else None,
        peers=last_round,
        inner_steps=settings.inner_steps,
        aggregator=settings.aggregator,
    )
