"""What the API server measures, in Prometheus text format at ``/metrics`` (prometheus-client).

Each server keeps its own registry (several servers may live in one process, as in the tests). Label values come
from small fixed sets (route templates, status codes, error kinds): never peer ids, prompts or request ids.

    swarm_peer_api_requests_total{endpoint,status}          HTTP requests answered
    swarm_peer_api_errors_total{kind}                       errors, by OpenAI error code or type
    swarm_peer_api_prompt_tokens_total                      prompt tokens of generations
    swarm_peer_api_generated_tokens_total                   tokens generated
    swarm_peer_api_time_to_first_token_seconds              histogram: request received -> first token
    swarm_peer_api_token_latency_seconds                    histogram: between two tokens of one completion
    swarm_peer_api_generations_in_flight                    completions generating now (each holds a session)
    swarm_peer_api_kv_cache_tokens                          tokens the in-flight sessions keep in the peers' caches
"""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ApiMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swarm_peer_api_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "swarm_peer_api_errors", "errors, by OpenAI error code or type", ["kind"], registry=r
        )
        self.prompt_tokens = Counter(
            "swarm_peer_api_prompt_tokens", "prompt tokens of generations", registry=r
        )
        self.generated_tokens = Counter("swarm_peer_api_generated_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "swarm_peer_api_time_to_first_token_seconds",
            "seconds from a request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "swarm_peer_api_token_latency_seconds",
            "seconds between two consecutive tokens of one completion",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "swarm_peer_api_generations_in_flight", "completions generating now", registry=r
        )
        self.kv_cache_tokens = Gauge(
            "swarm_peer_api_kv_cache_tokens",
            "tokens the in-flight sessions keep in the peers' attention caches",
            registry=r,
        )

    def observe_completion(self, received: float, prompt_tokens: int, token_times: list[float]) -> None:
        """Counts a finished generation: ``received`` and ``token_times`` are ``time.perf_counter()`` readings."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(len(token_times))
        if token_times:
            self.time_to_first_token.observe(token_times[0] - received)
        for before, after in itertools.pairwise(token_times):
            self.token_latency.observe(after - before)

    def render(self) -> bytes:
        return generate_latest(self.registry)
