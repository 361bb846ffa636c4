"""The OpenAI-compatible API (``swarm-peer api``) as its users meet it: the official ``openai`` client against a real
server in front of a real swarm of SmolLM2 (two peers), checked against the client library's own generation."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from swarm_peer.cli.generation import encode_prompt
from swarm_peer.cli.local_swarm import LocalSwarm

SPANS = [(0, 15), (15, 30)]
MAX_TOKENS = 64  # the server's --max-tokens
PROMPT = "The capital of France is"
QUESTION = "What is 2 + 2? Answer in one word."
READY = "API listening on "


@pytest.fixture(scope="module")
def served(smollm2_path):
    """A swarm of SmolLM2, the API in front of it, and the client library's model of the same swarm."""
    with LocalSwarm(smollm2_path, SPANS) as swarm:
        api = swarm._spawn(
            "api",
            ["api", smollm2_path, "--name", "smollm2", "--initial-peers", swarm.initial_peers[0], "--port", "0",
             "--max-tokens", str(MAX_TOKENS), "--max-prompt-tokens", "256", "--max-concurrent", "24"],
        )  # fmt: skip
        url = api.wait_line(lambda line: line.startswith(READY), 120)[len(READY) :].strip()
        with swarm.client() as model:
            tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            yield swarm, api, url, model, tokenizer, client


def _library(model, tokenizer, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """What the client library generates, greedy: the oracle of every API answer."""
    input_ids = encode_prompt(tokenizer, prompt, chat)
    out = model.generate(input_ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_completions_and_chat_equal_the_client_library_streamed_or_not(served):
    swarm, api, url, model, tokenizer, client = served
    assert [m.id for m in client.models.list().data] == ["smollm2"]

    expected = _library(model, tokenizer, PROMPT, 12)
    whole = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 12)
    chunks = list(
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    )
    assert len(chunks) > 2, "streamed in pieces, not at once"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12

    expected_chat = _library(model, tokenizer, QUESTION, 20, chat=True)
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == expected_chat
    assert answer.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_chat


def test_stop_strings_seed_and_sampling(served):
    swarm, api, url, model, tokenizer, client = served
    expected = _library(model, tokenizer, PROMPT, 12)
    cut = expected.strip().split()[1]  # a word in the middle of the greedy completion
    stopped = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].text == expected[: expected.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0, stop=cut, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected[: expected.index(cut)]

    def sample(seed):
        return (
            client.completions.create(
                model="smollm2", prompt=PROMPT, max_tokens=10, temperature=1.5, top_p=0.95, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(1) == sample(1), "a seed reproduces a sampled completion"
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1, "sampling draws different completions"


def test_twenty_concurrent_streams_all_finish_with_the_right_text(served):
    swarm, api, url, model, tokenizer, client = served
    prompts = [f"{PROMPT} {word}" for word in "a b c d e f g h i j k l m n o p q r s t".split()]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the oracle, a few at a time
        expected = list(pool.map(lambda prompt: _library(model, tokenizer, prompt, 6), prompts))

    def stream(prompt):
        chunks = client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(stream, prompts)) == expected


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "gpt-4", "prompt": PROMPT}, 404, "model_not_found"),
        ({"model": "smollm2", "prompt": PROMPT, "max_tokens": -1}, 400, None),
        ({"model": "smollm2", "prompt": PROMPT, "max_tokens": MAX_TOKENS + 1}, 400, None),
        ({"model": "smollm2", "prompt": "word " * 400}, 400, "context_length_exceeded"),
        ({"model": "smollm2", "prompt": PROMPT, "n": 2}, 400, None),
        ({"model": "smollm2"}, 400, None),
        ("{not json", 400, None),
        ({"model": "smollm2", "prompt": "x" * 2_000_000}, 413, "request_too_large"),
    ],
)
def test_bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving(served, body, status, code):
    swarm, api, url, model, tokenizer, client = served
    raw = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        url + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code
    if isinstance(body, dict) and "prompt" in body and len(raw) < 10_000:  # what the official client raises
        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(**body)
        assert raised.value.status_code == status
    assert (
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
    )


def _metrics(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def _value(families: dict, family: str, suffix: str = "", **labels) -> float:
    return sum(
        s.value
        for s in families[family].samples
        if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_requests_and_tokens(served):
    swarm, api, url, model, tokenizer, client = served

    def sample(families):
        return (
            _value(families, "swarm_peer_api_requests", "_total", endpoint="/v1/completions", status="200"),
            _value(families, "swarm_peer_api_generated_tokens", "_total"),
            _value(families, "swarm_peer_api_time_to_first_token_seconds", "_count"),
        )

    before = sample(_metrics(url))
    client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0)
    assert sample(_metrics(url)) == (before[0] + 1, before[1] + 3, before[2] + 1)


def test_the_health_page_is_served_at_the_root(served):
    swarm, api, url, model, tokenizer, client = served
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "monitor.js" in page.text
    deadline = time.monotonic() + 30
    while not (state := httpx.get(url + "/api/v1/state").json())["models"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the monitor's first look at the swarm
    (listed,) = [m for m in state["models"] if m["model_id"] == model.model_id]
    assert listed["healthy"] and len(listed["peers"]) == len(SPANS)


def test_a_client_that_leaves_mid_stream_stops_its_generation(served):
    swarm, api, url, model, tokenizer, client = served
    tokens_before = _value(_metrics(url), "swarm_peer_api_generated_tokens", "_total")
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first token came; then the client goes away
    deadline = time.monotonic() + 30
    while _value(_metrics(url), "swarm_peer_api_generations_in_flight") and time.monotonic() < deadline:
        time.sleep(0.1)
    families = _metrics(url)
    assert _value(families, "swarm_peer_api_generations_in_flight") == 0
    generated = _value(families, "swarm_peer_api_generated_tokens", "_total") - tokens_before
    assert generated < MAX_TOKENS / 2, f"the left stream's generation went on: {generated} tokens"


def test_concurrency_limit_429_and_request_timeout_504(served):
    """A second server with room for one completion of at most 1 s."""
    swarm, api, url, model, tokenizer, client = served
    strict = swarm._spawn(
        "api-strict",
        ["api", str(model.checkpoint.path), "--name", "smollm2", "--initial-peers", swarm.initial_peers[0],
         "--port", "0", "--max-concurrent", "1", "--request-timeout", "1"],
    )  # fmt: skip
    try:
        strict_url = strict.wait_line(lambda line: line.startswith(READY), 120)[len(READY) :].strip()
        body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        with httpx.stream(
            "POST", strict_url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as long:
            lines = long.iter_lines()
            assert next(lines).startswith("data: ")  # generating: the server is full
            refused = httpx.post(strict_url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout", (
            "a stream past --request-timeout ends with an error event"
        )
        late = httpx.post(strict_url + "/v1/completions", json=body, timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    finally:
        strict.terminate(timeout=15)


def test_health_and_503_when_a_span_has_no_peer(served):
    """Last in the module: it stops a peer."""
    swarm, api, url, model, tokenizer, client = served
    assert httpx.get(url + "/health").json()["status"] == "ok"
    swarm.peers[1].terminate(timeout=20)  # leaves gracefully: its records say OFFLINE at once
    missing = [list(SPANS[1])]
    deadline = time.monotonic() + 30
    # Its OFFLINE records reach the DHT block by block: a lookup in between sees a part of them gone.
    while (health := httpx.get(url + "/health")).json().get("missing") != missing:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert health.status_code == 503
    assert health.json()["missing"] == missing
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, temperature=0)
    assert raised.value.status_code == 503
    assert "15:30" in raised.value.message
