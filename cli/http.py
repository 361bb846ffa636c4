"""The HTTP commands: ``swarm-peer api`` (the OpenAI-compatible server of one model, ``api.openai``, with the health
page at ``/``) and ``swarm-peer monitor`` (the health page alone, ``api.monitor``). Each serves until SIGINT or
SIGTERM, then leaves the swarm; each prints one line on stdout once it accepts requests:
``API listening on URL`` or ``Monitor listening on URL``."""

from __future__ import annotations

import click
from fastapi import FastAPI

from swarm_peer.api.monitor import SwarmMonitor, monitor_router
from swarm_peer.api.server import serve
from swarm_peer.cli.network import join_swarm
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ApiSettings, ClientSettings, NetworkSettings

__all__ = ["run_api", "run_monitor"]

JOIN_TIMEOUT = 30.0  # seconds the monitor waits to join the swarm


def run_api(settings: ApiSettings) -> None:
    """Joins the swarm with the client library, then serves the API of ``settings.model``."""
    from transformers import AutoTokenizer

    from swarm_peer.api.openai import create_app
    from swarm_peer.client.model import DistributedModelForCausalLM
    from swarm_peer.models import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(settings.model).path)
    model = DistributedModelForCausalLM.from_pretrained(settings.model, settings=settings.client)
    monitor = SwarmMonitor(model.swarm)
    try:
        monitor.start()
        app = create_app(model, tokenizer, settings, monitor=monitor)
        try:
            _serve(app, settings.host, settings.port, "API")
        finally:
            app.state.server.shutdown()
    finally:
        monitor.shutdown()
        model.shutdown()


def run_monitor(network: NetworkSettings, *, host: str, port: int, refresh: float) -> None:
    """Joins the swarm (a client-mode DHT node; ``click.ClickException`` if that takes over ``JOIN_TIMEOUT``), then
    serves the health page, looking at the swarm every ``refresh`` seconds."""
    dht = join_swarm(network, JOIN_TIMEOUT)
    runtime = monitor = None
    try:
        runtime = SwarmRuntime(ClientSettings(network=network), dht=dht)
        monitor = SwarmMonitor(runtime, refresh=refresh)
        monitor.start()
        app = FastAPI(title="swarm-peer monitor", docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(monitor_router(monitor))
        _serve(app, host, port, "Monitor")
    finally:
        if monitor is not None:
            monitor.shutdown()
        if runtime is not None:
            runtime.shutdown()
        dht.shutdown()


def _serve(app: FastAPI, host: str, port: int, what: str) -> None:
    try:
        serve(app, host, port, ready=lambda url: click.echo(f"{what} listening on {url}"))
    except OSError as e:  # the address: in use, not ours, malformed
        raise click.ClickException(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
