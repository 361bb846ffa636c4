"""``swarm-peer demo``: SmolLM2 served by a local swarm of separate peer processes, and a chat through it."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from swarm_peer.cli.generation import stream_generate
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.dht import online_servers
from swarm_peer.models import DEMO_MODEL, resolve_checkpoint
from swarm_peer.settings import ClientSettings, NetworkSettings

__all__ = ["run_demo"]


def even_spans(num_blocks: int, num_peers: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / num_peers) for i in range(num_peers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def run_demo(prompt: str, *, max_new_tokens: int, num_peers: int) -> None:
    from swarm_peer.client.model import DistributedModelForCausalLM

    console = Console(stderr=True)
    console.print("[bold]Preparing the demo model[/] (SmolLM2-135M-Instruct, bundled; converted once)")
    checkpoint = resolve_checkpoint(DEMO_MODEL)
    spans = even_spans(checkpoint.num_blocks, num_peers)
    console.print(f"[bold]Starting[/] a bootstrap node and {num_peers} peers on 127.0.0.1 ...")
    with LocalSwarm(DEMO_MODEL, spans) as swarm:
        settings = ClientSettings(
            network=NetworkSettings(initial_peers=tuple(swarm.initial_peers), client_mode=True)
        )
        model = DistributedModelForCausalLM.from_pretrained(DEMO_MODEL, settings=settings)
        try:
            servers = online_servers(model.swarm.dht, model.model_id, range(checkpoint.num_blocks))
            table = Table(title=f"Who serves {model.model_id}")
            for column in ("peer", "blocks", "state", "KV cache free"):
                table.add_column(column)
            seen = {}
            for block_servers in servers:
                for peer_id, info in block_servers.items():
                    seen[peer_id] = info
            for peer_id, info in sorted(seen.items(), key=lambda item: item[1].start_block):
                table.add_row(
                    str(peer_id),
                    f"{info.start_block}:{info.end_block}",
                    info.state.name,
                    f"{info.cache_mb_left:,.0f} MiB",
                )
            console.print(table)
            console.print(f"[bold]User:[/] {prompt}\n[bold]Assistant:[/] ", end="")
            _, tokens_per_second = stream_generate(
                DEMO_MODEL, prompt, settings, max_new_tokens=max_new_tokens, chat=True, distributed=model
            )
            console.print(f"[dim]{tokens_per_second:.1f} tokens/s through {num_peers} peers[/]")
        finally:
            model.shutdown()
    click.echo("Swarm stopped.", err=True)
