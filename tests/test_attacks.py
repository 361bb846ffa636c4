"""A live peer under attack: huge declared sizes, fuzzed and mutated messages, garbage frames.

One peer serves all 4 blocks of the tiny Llama; the attacks come from a client's P2P handle, as any other peer's
would. What must hold: every request gets a typed error or a correct answer, nothing is buffered before it is
checked (the peer's RSS, read from /proc, barely moves), and the peer serves exact outputs afterwards.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client.remote import call_span
from swarm_peer.protocols import codec, rpc, swarm_pb2

from .conftest import client_settings, reference_model

MiB = 1 << 20


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    with LocalSwarm(path, [(0, 4)]) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm))
        try:
            (hop,) = model.router.inference_route()
            ref = reference_model(path)
            _assert_exact(model, hop, ref)  # the peer's first requests allocate what any request needs
            _assert_exact(model, hop, ref)
            yield model, hop, swarm.peers[0].process.pid, ref
        finally:
            model.shutdown()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _inputs(T=3, D=64):
    return [torch.randn(1, T, D), torch.ones(1, T, dtype=torch.long), torch.arange(T)[None]]


def _assert_exact(model, hop, ref) -> None:
    x = _inputs()
    (out,) = model.swarm.run(call_span(model.swarm, rpc.FORWARD, model.model_id, hop, x))
    with torch.no_grad():
        want = x[0]
        for layer in ref.model.layers:
            want = layer(want, position_embeddings=ref.model.rotary_emb(want, x[2]), attention_mask=None)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)


async def _first_answer(reader, response_type):
    async with asyncio.timeout(10):
        answer, _ = await P2P.receive_protobuf(response_type, reader)
    return answer


def test_a_push_frame_declaring_1_5_gib_is_refused_from_its_header(target):
    model, hop, pid, ref = target

    async def attack():
        _, reader, writer = await model.swarm.p2p.call_binary_stream_handler(hop.peer_id, rpc.PUSH)
        writer.write(P2P.MESSAGE_MARKER + (3 << 29).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        await writer.drain()
        answer = await _first_answer(reader, swarm_pb2.PushResponse)
        try:  # 16 MiB of the body after all: the peer no longer reads it
            for _ in range(16):
                writer.write(bytes(MiB))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()
        return answer

    model.swarm.run(attack())  # a first refusal allocates what every refusal needs (buffers, log handlers)
    before = _rss(pid)
    answer = model.swarm.run(attack())
    assert answer.error.kind == swarm_pb2.INVALID and "exceeds" in answer.error.message
    assert _rss(pid) - before < 8 * MiB
    _assert_exact(model, hop, ref)


def test_a_forward_declaring_1_5_gib_in_1025_parts_is_refused_at_its_first_part(target):
    model, hop, pid, ref = target
    part = runtime_pb2.Tensor(buffer=bytes(codec.MAX_MESSAGE_BYTES))
    head = runtime_pb2.Tensor(buffer=part.buffer, size=[1, 6_300_000, 64], dtype="float32", chunks=1025)
    span = swarm_pb2.Span(model_id=model.model_id, start_block=0, end_block=4)
    first = swarm_pb2.ForwardRequest(span=span, tensors=[head])
    rest = [swarm_pb2.ForwardRequest(tensors=[part]) for _ in range(8)]  # 16 MiB more, if it were read

    async def attack():
        answers = await model.swarm.p2p.iterate_protobuf_handler(
            hop.peer_id, rpc.streamed(rpc.FORWARD), as_aiter(first, *rest), swarm_pb2.ForwardResponse
        )
        async with asyncio.timeout(10):
            return await anext(answers)

    model.swarm.run(attack())  # a first refusal allocates what every refusal needs (buffers, log handlers)
    before = _rss(pid)
    answer = model.swarm.run(attack())
    assert answer.error.kind == swarm_pb2.INVALID and "exceed this peer's limit" in answer.error.message
    assert _rss(pid) - before < 8 * MiB
    _assert_exact(model, hop, ref)


# ---- fuzzing: random and mutated messages, and raw frames, to every RPC ----

_DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "complex64", "", "float32\x00"]
_tensors = st.builds(
    runtime_pb2.Tensor,
    buffer=st.binary(max_size=256),
    size=st.lists(st.sampled_from([0, 1, 2, 3, 64, 65, 1 << 20, (1 << 32) - 1]), max_size=5),
    dtype=st.sampled_from(_DTYPES),
    chunks=st.sampled_from([-1, 0, 1, 2, 1025, (1 << 31) - 1]),
    compression=st.integers(0, 8),
)


def _valid_tensors(T: int) -> list[runtime_pb2.Tensor]:
    return codec.pack(_inputs(T))[0]


@st.composite
def _mutated(draw) -> list[runtime_pb2.Tensor]:
    """Valid step tensors with one thing wrong: a size, the dtype, the buffer, a NaN, a part count."""
    tensors = [
        runtime_pb2.Tensor.FromString(t.SerializeToString()) for t in _valid_tensors(draw(st.integers(1, 4)))
    ]
    victim = tensors[draw(st.integers(0, len(tensors) - 1))]
    mutation = draw(st.sampled_from(["size", "dtype", "truncate", "nan", "chunks", "drop"]))
    if mutation == "size":
        victim.size[draw(st.integers(0, len(victim.size) - 1))] = draw(
            st.sampled_from([0, 63, 10**6, (1 << 32) - 1])
        )
    elif mutation == "dtype":
        victim.dtype = draw(st.sampled_from(_DTYPES))
    elif mutation == "truncate":
        victim.buffer = victim.buffer[: draw(st.integers(0, max(0, len(victim.buffer) - 1)))]
    elif mutation == "nan":
        values = torch.frombuffer(bytearray(victim.buffer), dtype=torch.uint8).clone()
        victim.buffer = (
            torch.full((len(victim.buffer) // 4,), float(draw(st.sampled_from(["nan", "inf", "-inf"]))))
            .numpy()
            .tobytes()
            if victim.dtype == "float32"
            else values.numpy().tobytes()
        )
    elif mutation == "chunks":
        victim.chunks = draw(st.sampled_from([0, 2, 1025]))
    else:
        tensors.remove(victim)
    return tensors


_tensor_lists = st.one_of(st.lists(_tensors, max_size=5), _mutated())


@st.composite
def _forward(draw, model_id: str) -> swarm_pb2.ForwardRequest:
    span = swarm_pb2.Span(
        model_id=draw(st.sampled_from([model_id, "other-model", ""])),
        start_block=draw(st.integers(0, 5)),
        end_block=draw(st.integers(0, 5)),
    )
    return swarm_pb2.ForwardRequest(
        span=span,
        tensors=draw(_tensor_lists),
        graph_id=draw(st.sampled_from([0, 1, (1 << 64) - 1])),
        timeout_ms=draw(st.sampled_from([0, 1, 1000, (1 << 32) - 1])),
    )


@st.composite
def _session(draw, model_id: str) -> list[swarm_pb2.InferenceRequest]:
    opening = swarm_pb2.InferenceOpen(
        span=swarm_pb2.Span(model_id=model_id, start_block=0, end_block=draw(st.integers(0, 5))),
        max_length=draw(st.sampled_from([0, 1, 16, (1 << 32) - 1])),
        batch_size=draw(st.sampled_from([0, 1, 2, (1 << 32) - 1])),
        session_id=draw(st.sampled_from([b"", b"short", bytes(16)])),
        idle_timeout=draw(st.sampled_from([0, 1, (1 << 32) - 1])),
    )
    if draw(st.booleans()):
        opening.neighbours.next.peer_id = draw(st.sampled_from(["", "garbage", "Qm" + "1" * 44]))
        opening.neighbours.next.session_id = draw(st.binary(max_size=20))
    requests = [swarm_pb2.InferenceRequest(open=opening)]
    for step_id in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["step", "parts", "open", "neighbours"]))
        tensors = draw(_tensor_lists)
        if kind == "step":
            step = swarm_pb2.InferenceStep(step_id=step_id, tensors=tensors, push=draw(st.booleans()))
            requests.append(swarm_pb2.InferenceRequest(step=step))
        elif kind == "parts":
            requests.append(swarm_pb2.InferenceRequest(parts=swarm_pb2.TensorParts(tensors=tensors)))
        elif kind == "open":
            requests.append(swarm_pb2.InferenceRequest(open=opening))
        else:
            requests.append(swarm_pb2.InferenceRequest(neighbours=swarm_pb2.Neighbours(previous_peer_id="x")))
    return requests


_FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _check_answer(answer, valid_forward: bool) -> None:
    """A typed error, or (for a request that happens to be valid) the right number of well-formed tensors."""
    if answer.HasField("error"):
        assert answer.error.kind != swarm_pb2.INTERNAL, answer.error.message
        assert answer.error.kind in swarm_pb2.ErrorKind.values() and answer.error.message
    else:
        assert valid_forward, answer


@pytest.mark.timeout(600)
def test_fuzzed_requests_get_typed_errors_and_the_peer_keeps_its_memory_and_serves(target):
    model, hop, pid, ref = target
    p2p, peer = model.swarm.p2p, hop.peer_id
    before = _rss(pid)

    @_FUZZ
    @given(request=_forward(model.model_id), unary=st.booleans(), backward=st.booleans())
    def forward(request, unary, backward):
        name = rpc.BACKWARD if backward else rpc.FORWARD

        async def call():
            async with asyncio.timeout(20):
                if unary:
                    return await p2p.call_protobuf_handler(peer, name, request, swarm_pb2.ForwardResponse)
                answers = await p2p.iterate_protobuf_handler(
                    peer, rpc.streamed(name), as_aiter(request), swarm_pb2.ForwardResponse
                )
                return await anext(answers)

        _check_answer(model.swarm.run(call(), timeout=30), valid_forward=True)

    @_FUZZ
    @given(requests=_session(model.model_id))
    def inference(requests):
        async def call():
            answers = await p2p.iterate_protobuf_handler(
                peer, rpc.INFERENCE, as_aiter(*requests), swarm_pb2.InferenceResponse
            )
            async with asyncio.timeout(20):
                return [answer async for answer in answers]

        answers = model.swarm.run(call(), timeout=30)
        # every answer but an error is the open's or a step's; a stream that is not answered at all ended cleanly
        for answer in answers:
            if answer.HasField("error"):
                _check_answer(answer, valid_forward=False)

    @_FUZZ
    @given(
        session_id=st.sampled_from([b"", bytes(16), b"\x01" * 16]),
        tensors=_tensor_lists,
        carried=st.lists(st.integers(0, 10), max_size=3),
    )
    def pushes(session_id, tensors, carried):
        push = swarm_pb2.InferencePush(session_id=session_id, tensors=tensors, carried_blocks=carried)

        async def call():
            answers = await p2p.iterate_protobuf_handler(
                peer, rpc.PUSH, as_aiter(push), swarm_pb2.PushResponse
            )
            async with asyncio.timeout(20):
                return [answer async for answer in answers]

        (answer,) = model.swarm.run(call(), timeout=30)
        assert answer.error.kind == swarm_pb2.UNKNOWN_SESSION  # nobody's session, or not from this sender

    @_FUZZ
    @given(
        name=st.sampled_from(
            [rpc.INFERENCE, rpc.PUSH, rpc.streamed(rpc.FORWARD), rpc.streamed(rpc.BACKWARD)]
        ),
        frame=st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda marker, length, body: marker + length.to_bytes(8, "big") + body,
                st.sampled_from([P2P.MESSAGE_MARKER, P2P.ERROR_MARKER, b"\x07"]),
                st.sampled_from([0, 5, 64, 1 << 30, (1 << 64) - 1]),
                st.binary(max_size=64),
            ),
        ),
    )
    def frames(name, frame):
        async def call():
            _, reader, writer = await p2p.call_binary_stream_handler(peer, name)
            writer.write(frame)
            await writer.drain()
            writer.close()  # truncated: whatever the frame said, nothing more comes

        model.swarm.run(call(), timeout=30)

    for fuzz in (forward, inference, pushes, frames):
        fuzz()
    _assert_exact(model, hop, ref)
    assert _rss(pid) - before < 64 * MiB, f"peer RSS grew by {(_rss(pid) - before) / MiB:.0f} MiB"
