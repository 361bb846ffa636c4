"""What a peer measures, served at ``/metrics`` in Prometheus' text format (``swarm-peer join --metrics-port``).

Every metric is named ``swarm_peer_peer_*``. Labels come from small fixed sets only (the RPC, the error kind on
the wire): never a peer id, a session id or anything a client sent, so a scrape stays small however many clients
come and go.

- ``requests_total{rpc}``: calls served (``forward``, ``backward``, ``inference_step``, ``expert_forward``,
  ``expert_backward``, ``stage_state``), failed ones included; an inference session counts its steps (those
  pushed by the hop before included), not its stream;
- ``tokens_total{rpc}``: tokens (batch x new tokens; rows of expert calls) computed;
- ``request_seconds{rpc}``: how long a call took, from its first message to its answer (a step: its compute);
- ``errors_total{kind}``: refusals and failures, by their kind on the wire (``busy``, ``invalid``, ``deadline``,
  ...; ``protocols.rpc``);
- ``kv_cache_{bytes,tokens}_{used,total}``: the KV-cache budget (``peer.cache``), held by sessions and in all;
- ``compute_queue_length``: calls handed to the compute thread and not finished (the one running included);
- ``inference_sessions``: inference sessions open;
- ``batched_steps``, ``step_batches``: single-token steps computed in a batch with other sessions' (``peer.compute``),
  and the batched forwards they took: their ratio is the mean batch;
- ``sent_bytes_total{to}``: bytes of the messages that carry tensors out, to ``client`` (answers) and to the
  ``next_hop`` (pushes): what ``ClientSettings.compression`` saves.

Gauges are read when scraped (``set_function``), from the HTTP server's thread: plain ints of the peer's state.
Each ``PeerMetrics`` has a registry of its own, so several peers (or tests) in one process never share counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from swarm_peer.protocols import rpc, swarm_pb2

__all__ = ["PeerMetrics", "RPCS", "scrape"]

logger = logging.getLogger(__name__)

_PREFIX = "swarm_peer_peer_"
RPCS = (
    "forward",
    "backward",
    "inference_step",
    "expert_forward",
    "expert_backward",
    "stage_state",
)
# a decode step takes ~1 ms on loopback; a long prompt or a backward of a big span, seconds
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PeerMetrics:
    """A peer's counters, gauges and latency histograms (see the module's docstring), in ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter(_PREFIX + "requests", "RPC calls served", ["rpc"], registry=registry)
        self._tokens = Counter(
            _PREFIX + "tokens", "tokens computed (batch x new tokens)", ["rpc"], registry=registry
        )
        self._seconds = Histogram(
            _PREFIX + "request_seconds", "time to serve a call", ["rpc"], buckets=_BUCKETS, registry=registry
        )
        self._errors = Counter(
            _PREFIX + "errors", "calls refused or failed, by kind", ["kind"], registry=registry
        )
        self._sent = Counter(
            _PREFIX + "sent_bytes", "bytes of answers and pushes sent, by where", ["to"], registry=registry
        )
        # children made once: a label lookup per decode step would cost more than the increment
        self.sent = {to: self._sent.labels(to) for to in ("client", "next_hop")}
        self.requests = {name: self._requests.labels(name) for name in RPCS}
        self.tokens = {name: self._tokens.labels(name) for name in RPCS}
        self.seconds = {name: self._seconds.labels(name) for name in RPCS}
        kinds = [name for name in swarm_pb2.ErrorKind.keys() if name != "ERROR_NONE"]
        self.errors = {swarm_pb2.ErrorKind.Value(name): self._errors.labels(name.lower()) for name in kinds}
        self._server = None

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge ``swarm_peer_peer_{name}`` whose value is ``read()`` at each scrape."""
        Gauge(_PREFIX + name, documentation, registry=self.registry).set_function(read)

    def served(self, name: str, seconds: float, tokens: int = 0) -> None:
        """One call of RPC ``name`` served in ``seconds``, computing ``tokens`` tokens."""
        self.requests[name].inc()
        self.seconds[name].observe(seconds)
        if tokens:
            self.tokens[name].inc(tokens)

    def failed(self, error: BaseException) -> None:
        """A call failed with ``error``: counted by the kind it is sent as (``protocols.rpc.error_message``)."""
        self.errors[rpc.error_message(error).kind].inc()

    def timed(self, name: str | None, handler):
        """``handler`` (an RPC handler: ``handler(requests, call)`` yields its answers) with its errors counted and,
        with a ``name``, its calls and their duration. A handler closed early is closed in turn (``aclosing``),
        so what it holds (a session's cache) is freed at once."""

        async def measured(requests, call):
            t0 = time.perf_counter()
            try:
                async with contextlib.aclosing(handler(requests, call)) as answers:
                    async for answer in answers:
                        yield answer
            except Exception as e:
                self.failed(e)
                raise
            except asyncio.CancelledError:  # the call's deadline (or the peer's shutdown) cancelled it
                if call._timeout is not None and call._timeout.expired():
                    self.errors[swarm_pb2.DEADLINE].inc()
                raise
            finally:
                if name is not None:
                    self.requests[name].inc()
                    self.seconds[name].observe(time.perf_counter() - t0)

        return measured

    def start_server(self, host: str, port: int) -> str:
        """Serves ``/metrics`` on ``host:port`` (0: any free port) from a thread; returns its URL."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        url = f"http://{host}:{self._server.server_port}/metrics"
        logger.info("Serving metrics at %s", url)
        return url

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def scrape(url: str, timeout: float = 10.0) -> dict[tuple[str, tuple], float]:
    """Every sample at a Prometheus endpoint (``http://HOST:PORT/metrics``): (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
