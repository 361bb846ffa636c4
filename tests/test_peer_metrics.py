"""A peer's /metrics (``join --metrics-port``): Prometheus text that counts what a client makes the peer do."""

from __future__ import annotations

import pytest
import torch

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.peer.metrics import scrape

from .conftest import client_settings, free_port

PROMPT_TOKENS, NEW_TOKENS = 5, 4


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    return scrape(f"http://127.0.0.1:{port}/metrics")


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get(("swarm_peer_peer_" + name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.timeout(120)
def test_metrics_count_forwards_and_generation_steps(tiny_checkpoints):
    path, port = tiny_checkpoints["llama"], free_port()
    with LocalSwarm(path, [(0, 4)], peer_args=["--throughput", "100", "--metrics-port", str(port)]) as swarm:
        before = _scrape(port)
        # the control: nothing counted before the client calls, so a peer that counts nothing fails below
        assert _value(before, "requests_total", rpc="forward") == 0
        assert _value(before, "requests_total", rpc="inference_step") == 0
        assert _value(before, "kv_cache_bytes_total") > 0 and _value(before, "kv_cache_tokens_total") > 0
        assert _value(before, "inference_sessions") == 0 and _value(before, "compute_queue_length") == 0

        model = DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm))
        try:
            ids_BT = torch.randint(3, 100, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                model(input_ids=ids_BT)
            model.generate(ids_BT, max_new_tokens=NEW_TOKENS, do_sample=False)
        finally:
            model.shutdown()
        after = _scrape(port)

    assert _value(after, "requests_total", rpc="forward") == 1
    assert _value(after, "tokens_total", rpc="forward") == PROMPT_TOKENS
    assert _value(after, "request_seconds_count", rpc="forward") == 1
    # the prompt in one step, then one step per new token but the last (whose output is not fed back)
    assert _value(after, "requests_total", rpc="inference_step") == NEW_TOKENS
    assert _value(after, "tokens_total", rpc="inference_step") == PROMPT_TOKENS + NEW_TOKENS - 1
    assert _value(after, "request_seconds_count", rpc="inference_step") == NEW_TOKENS
    assert _value(after, "requests_total", rpc="backward") == 0
    assert sum(value for (name, _), value in after.items() if name == "swarm_peer_peer_errors_total") == 0
    # no peer ids, session ids or prompts as labels: only the RPC, the error kind, where bytes went (and the
    # histograms' buckets)
    label_names = {label for _, labels in after for label, _value in labels}
    assert label_names <= {"rpc", "kind", "to", "le"}, label_names
