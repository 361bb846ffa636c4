"""A peer refuses bad requests with clear errors, keeps serving, and keeps its KV-cache budget."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client.remote import call_span
from swarm_peer.client.routing import Hop
from swarm_peer.client.session import InferenceSession
from swarm_peer.errors import BusyError, RoutingError, SessionError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2

from .conftest import client_settings, kv_cache_mb, reference_model

CACHE_TOKENS = 96


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints):
    """One peer serving all 4 blocks of the tiny Llama, with a small cache budget (half of it per client)."""
    path = tiny_checkpoints["llama"]
    with LocalSwarm(
        path,
        [(0, 4)],
        peer_args=[
            *("--cache-mb", str(kv_cache_mb(path, CACHE_TOKENS)), "--max-length", "64"),
            *("--max-batch-tokens", "10000"),
        ],
    ) as swarm:
        yield swarm


def _client(swarm):
    return DistributedModelForCausalLM.from_pretrained(
        swarm.model, settings=client_settings(swarm, route_timeout=5, retry_timeout=10)
    )


@pytest.fixture(scope="module")
def peer(swarm):
    model = _client(swarm)
    try:
        (hop,) = model.router.inference_route()
        yield model, hop, reference_model(swarm.model)
    finally:
        model.shutdown()


@pytest.fixture(scope="module")
def other(swarm):
    """A second client, with a peer id of its own."""
    model = _client(swarm)
    try:
        yield model
    finally:
        model.shutdown()


def _inputs(B=1, T=3, D=64):
    return [torch.randn(B, T, D), torch.ones(B, T, dtype=torch.long), torch.arange(T).expand(B, T)]


def _forward(model, hop, tensors, *, model_id=None, start=None, end=None):
    hop = Hop(hop.peer_id, hop.start if start is None else start, hop.end if end is None else end)
    (out,) = model.swarm.run(call_span(model.swarm, rpc.FORWARD, model_id or model.model_id, hop, tensors))
    return out


def _assert_still_serves(model, hop, ref, x=None):
    x = x or _inputs()
    out = _forward(model, hop, x)
    with torch.no_grad():
        want = x[0]
        for layer in ref.model.layers:
            want = layer(want, position_embeddings=ref.model.rotary_emb(want, x[2]), attention_mask=None)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)


BAD_REQUESTS = {
    "wrong hidden size": lambda: [
        torch.randn(1, 3, 65),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(3)[None],
    ],
    "integer hidden states": lambda: [
        torch.ones(1, 3, 64, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(3)[None],
    ],
    "2-d hidden states": lambda: [
        torch.randn(3, 64),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(3)[None],
    ],
    "mask of wrong length": lambda: [
        torch.randn(1, 3, 64),
        torch.ones(1, 5, dtype=torch.long),
        torch.arange(3)[None],
    ],
    "mask values not 0/1": lambda: [torch.randn(1, 3, 64), torch.full((1, 3), 7), torch.arange(3)[None]],
    "float mask": lambda: [torch.randn(1, 3, 64), torch.ones(1, 3), torch.arange(3)[None]],
    "negative positions": lambda: [
        torch.randn(1, 3, 64),
        torch.ones(1, 3, dtype=torch.long),
        -torch.arange(3)[None],
    ],
    "positions past the model's limit": lambda: [
        torch.randn(1, 3, 64),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(1000, 1003)[None],
    ],
    "NaN hidden states": lambda: [
        torch.full((1, 3, 64), float("nan")),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(3)[None],
    ],
    "too many tokens": lambda: [
        torch.randn(51, 200, 64),
        torch.ones(51, 200, dtype=torch.long),
        torch.arange(200).expand(51, 200),
    ],
    "missing tensors": lambda: [torch.randn(1, 3, 64)],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_tensors_are_refused_and_peer_keeps_serving(peer, case):
    model, hop, ref = peer
    with pytest.raises(ValidationError):
        _forward(model, hop, BAD_REQUESTS[case]())
    _assert_still_serves(model, hop, ref)


@pytest.mark.timeout(120)
def test_request_larger_than_one_message_is_streamed(peer):
    model, hop, ref = peer
    x = _inputs(B=48, T=200)  # 2.4 MiB of hidden states: more than one P2P message
    assert len(codec.pack(x)) > 1
    _assert_still_serves(model, hop, ref, x)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "span",
    [dict(model_id="other-model-123"), dict(start=2, end=6), dict(start=3, end=3), dict(start=5, end=7)],
)
def test_unknown_model_or_blocks_are_refused(peer, span):
    model, hop, ref = peer
    with pytest.raises(ValidationError):
        _forward(model, hop, _inputs(), **span)
    _assert_still_serves(model, hop, ref)


@pytest.mark.timeout(120)
def test_garbage_tensor_bytes_and_garbage_stream(peer):
    model, hop, ref = peer
    bogus = runtime_pb2.Tensor(buffer=b"\x01\x02garbage", size=[1, 3, 64], dtype="float32", chunks=1)
    span = swarm_pb2.Span(model_id=model.model_id, start_block=0, end_block=4)

    async def send_bogus_tensor():
        parts = codec.pack(_inputs()[1:])[0]
        request = swarm_pb2.ForwardRequest(span=span, tensors=[bogus, *parts])
        return await model.swarm.p2p.call_protobuf_handler(
            hop.peer_id, rpc.FORWARD, request, swarm_pb2.ForwardResponse
        )

    answer = model.swarm.run(send_bogus_tensor())
    assert answer.error.kind == swarm_pb2.INVALID and re.search(
        "cannot decode|does not match", answer.error.message
    )

    async def send_garbage_bytes():
        _, reader, writer = await model.swarm.p2p.call_binary_stream_handler(
            hop.peer_id, rpc.streamed(rpc.FORWARD)
        )
        await P2P.send_raw_data(b"\xff" * 100, writer)
        writer.close()

    model.swarm.run(send_garbage_bytes())
    _assert_still_serves(model, hop, ref)


@pytest.mark.timeout(120)
def test_session_errors(peer):
    model, hop, ref = peer

    async def step_without_open():
        step = swarm_pb2.InferenceRequest(
            step=swarm_pb2.InferenceStep(step_id=1, tensors=codec.pack(_inputs())[0])
        )

        async def requests():
            # Keep the stream open until the peer answers, as a session's client does. Ending it at once would race
            # the peer's close: p2pd resets a stream closed with unread input, and the reset can drop the error.
            yield step
            await asyncio.Event().wait()

        stream = await model.swarm.p2p.iterate_protobuf_handler(
            hop.peer_id, rpc.INFERENCE, requests(), swarm_pb2.InferenceResponse
        )
        return await anext(stream)

    answer = model.swarm.run(step_without_open())
    assert answer.error.kind == swarm_pb2.INVALID and "must start with an open" in answer.error.message
    # longer than the peer's --max-length
    with pytest.raises(ValidationError, match="max_length"):
        InferenceSession(model.swarm, model.router, model.model_id, max_length=65).open()
    # stepping past the session's own max_length: refused by the client before sending, and by the peer
    with InferenceSession(model.swarm, model.router, model.model_id, max_length=4) as session:
        session.step(*_inputs(T=3))
        with pytest.raises(ValidationError, match="max_length"):
            session.step(*_inputs(T=3))
    # a step whose batch differs from the session's
    with InferenceSession(model.swarm, model.router, model.model_id, max_length=8) as session:
        with pytest.raises(ValidationError, match="batch size"):
            session.step(*_inputs(B=2))
    with pytest.raises(SessionError):
        session.step(*_inputs())
    _assert_still_serves(model, hop, ref)


@pytest.mark.timeout(120)
def test_sessions_hold_the_cache_they_use_and_a_client_at_most_its_share(peer, other):
    """The cache hog: a session opened for the peer's longest length that sends nothing holds no cache, so another
    client is served meanwhile (it used to reserve its max_length at open and lock everyone out); a client that
    does fill the cache is refused past its share (half of it), and the rest stays free for others."""
    model, hop, ref = peer
    share = CACHE_TOKENS // 2
    hog = InferenceSession(model.swarm, model.router, model.model_id, max_length=64)
    hog.open()
    try:
        with InferenceSession(other.swarm, other.router, other.model_id, max_length=64) as session:
            session.step(*_inputs(T=share))
        hog.step(*_inputs(T=share))  # the hog's whole share
        with pytest.raises(BusyError, match="share"):
            InferenceSession(model.swarm, model.router, model.model_id, max_length=8).open()
        with InferenceSession(other.swarm, other.router, other.model_id, max_length=64) as session:
            session.step(*_inputs(T=CACHE_TOKENS - share))
    finally:
        hog.close()
    # the peer frees the hog's cache when its stream closes; allow it a moment (and the ban of the busy peer)
    deadline = time.monotonic() + 30
    while True:
        try:
            with InferenceSession(model.swarm, model.router, model.model_id, max_length=64) as again:
                again.step(*_inputs(T=share))
            break
        except (BusyError, RoutingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _info(model, hop) -> dict:
    answer = model.swarm.run(
        model.swarm.p2p.call_protobuf_handler(
            hop.peer_id, rpc.INFO, swarm_pb2.InfoRequest(), swarm_pb2.InfoResponse
        )
    )
    return json.loads(answer.info_json)


@pytest.mark.timeout(120)
def test_caches_are_charged_and_reported_in_bytes(peer, swarm):
    """The KV cache is charged the bytes a real transformers cache of the same tokens holds; a kept training graph
    is charged its activations' bytes until its backward takes it; the peer reports both."""
    model, hop, ref = peer
    full = _info(model, hop)
    assert full["cache_mb_left"] == kv_cache_mb(swarm.model, CACHE_TOKENS)
    T = 10
    with torch.no_grad():
        kv = ref(torch.randint(3, 100, (1, T)), use_cache=True).past_key_values
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in kv.layers)
    with InferenceSession(model.swarm, model.router, model.model_id, max_length=64) as session:
        session.step(*_inputs(T=T))
        held = full["cache_mb_left"] - _info(model, hop)["cache_mb_left"]
    assert held * 2**20 == kv_bytes

    x, graph_id = _inputs(B=2, T=5), 7
    model.swarm.run(call_span(model.swarm, rpc.FORWARD, model.model_id, hop, x, graph_id=graph_id))
    kept = (full["graph_cache_mb_left"] - _info(model, hop)["graph_cache_mb_left"]) * 2**20
    block_outputs = 4 * x[0].nbytes  # each of the 4 blocks' outputs at least is saved for backward
    assert block_outputs <= kept <= 100 * block_outputs
    model.swarm.run(
        call_span(
            model.swarm, rpc.BACKWARD, model.model_id, hop, [*x, torch.ones(2, 5, 64)], graph_id=graph_id
        )
    )
    assert _info(model, hop)["graph_cache_mb_left"] == full["graph_cache_mb_left"]
