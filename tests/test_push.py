"""Peers push each inference step straight to the next hop; the client relays only what could not be pushed."""

from __future__ import annotations

import os

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client.session import _SpanStream
from swarm_peer.errors import ValidationError
from swarm_peer.peer.metrics import scrape
from swarm_peer.protocols import codec, rpc, swarm_pb2
from swarm_peer.protocols.runtime import SwarmRuntime

from .conftest import client_settings, free_port, reference_model

SPANS = [(0, 1), (1, 3), (3, 4)]


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    # one client may hold the whole cache: a test below opens a session larger than half of it
    with LocalSwarm(path, SPANS, peer_args=["--client-cache-share", "1"]) as swarm:
        yield swarm, path, reference_model(path)


@pytest.fixture(scope="module")
def client(swarm):
    swarm, path, ref = swarm
    model = DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm))
    try:
        yield model, ref
    finally:
        model.shutdown()


def _local_blocks(ref, hidden_BTD: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Blocks [start, end) of the local model over the whole (causal) sequence."""
    positions_BT = torch.arange(hidden_BTD.shape[1])[None]
    with torch.no_grad():
        for layer in ref.model.layers[start:end]:
            embeddings = ref.model.rotary_emb(hidden_BTD, positions_BT)
            hidden_BTD = layer(hidden_BTD, position_embeddings=embeddings, attention_mask=None)
    return hidden_BTD


@pytest.mark.parametrize("push", [True, False])
def test_generation_is_exact_and_pushed(swarm, push):
    """With push the client sends each token to the first hop only; without, it relays every hop. Same tokens."""
    swarm, path, ref = swarm
    model = DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm, push=push))
    try:
        ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
        with model.inference_session(max_length=20) as session:
            got = model.generate(ids, max_new_tokens=10, do_sample=False)
            hops, steps = len(session.route), session.steps
        assert hops == len(SPANS)
        # control: without push, every hop after the first is relayed by the client on every step
        assert session.relays == (0 if push else steps * (hops - 1))
    finally:
        model.shutdown()
    want = ref.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)


def _neighbours(previous: _SpanStream | None = None, following: _SpanStream | None = None, *, sender=None):
    """What a session's client tells a hop: who pushes into it (``sender``: a peer id), and where it pushes."""
    neighbours = swarm_pb2.Neighbours()
    if previous is not None or sender is not None:
        neighbours.previous_peer_id = (sender or previous.hop.peer_id).to_base58()
    if following is not None:
        neighbours.next.CopyFrom(following.push_hop)
    return neighbours


def _open(model, route, max_length=16) -> list[_SpanStream]:
    """Sessions on ``route``, linked as an InferenceSession links them."""
    streams = [_SpanStream(model.swarm, model.model_id, hop) for hop in route]
    chain = [None, *streams, None]
    for i, stream in enumerate(streams, start=1):
        model.swarm.run(stream.open(max_length, 1, _neighbours(chain[i - 1], chain[i + 1])))
    return streams


def _step_inputs(x_BTD, past: int):
    T = x_BTD.shape[1]
    return [x_BTD, torch.ones(1, past + T, dtype=torch.long), torch.arange(past, past + T)[None]]


def _receive(model, stream):
    return model.swarm.run(stream.receive())


def test_pushed_into_hops_answer_their_inputs_and_a_second_copy_goes_on_unchanged(client):
    """A pushed chain: each pushed-into hop answers the client with its own input, the last also with its output;
    a hop whose push is refused answers its output and the client relays. A step that arrives twice is computed
    once and its saved output goes on: the next step's output is still exact, which it would not be if the copy
    had been appended to the cache again."""
    model, ref = client
    first, second, third = _open(model, model.router.inference_route())
    x_BTD = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(1))
    local = {block: _local_blocks(ref, x_BTD, 0, block) for block in (1, 3, 4)}  # inputs of hops 2, 3; output
    try:
        # step 1: pushed into an unknown session of the second peer: refused, so the first peer answers
        bogus = swarm_pb2.PushHop(peer_id=second.hop.peer_id.to_base58(), session_id=os.urandom(16))
        first.relink(swarm_pb2.Neighbours(next=bogus))
        first.send(1, _step_inputs(x_BTD[:, :3], 0), push=True)
        answer = _receive(model, first)
        assert answer.step_id == 1 and answer.carried == {}
        first.relink(_neighbours(None, second))
        # the client relays it; the second peer pushes on to the third, which answers its input and its output
        second.send(1, _step_inputs(answer.out_BTD, 0), push=True)
        answer = _receive(model, third)
        assert answer.step_id == 1 and list(answer.carried) == [3]  # by the first block of the hop
        torch.testing.assert_close(answer.carried[3], local[3][:, :3], atol=1e-4, rtol=0)
        torch.testing.assert_close(answer.out_BTD, local[4][:, :3], atol=1e-4, rtol=0)

        def pushed_through(step_id: int) -> tuple:
            """Step ``step_id``'s answers: the second hop's (its input), the third's (its input and output)."""
            middle, last = _receive(model, second), _receive(model, third)
            assert (middle.step_id, last.step_id) == (step_id, step_id)
            assert middle.out_BTD is None and list(middle.carried) == [1] and list(last.carried) == [3]
            return middle.carried[1], last.carried[3], last.out_BTD

        # step 2 goes through by push
        first.send(2, _step_inputs(x_BTD[:, 3:4], 3), push=True)
        pushed = pushed_through(2)
        for got, block in zip(pushed, (1, 3, 4), strict=True):
            torch.testing.assert_close(got, local[block][:, 3:4], atol=1e-4, rtol=0)
        # a second copy of step 2 to the first peer: it pushes its saved output, and so does the second peer
        first.send(2, _step_inputs(x_BTD[:, 3:4], 3), push=True)
        for got, want in zip(pushed_through(2), pushed, strict=True):
            assert torch.equal(got, want)
        # step 3 is exact only if step 2 entered every cache once
        first.send(3, _step_inputs(x_BTD[:, 4:5], 4), push=True)
        torch.testing.assert_close(pushed_through(3)[2], local[4][:, 4:5], atol=1e-4, rtol=0)
        # the first peer answered nothing for the pushed steps (the client sent its input): its next answer is
        # to step 4
        first.send(4, _step_inputs(x_BTD[:, 5:6], 5))
        assert _receive(model, first).step_id == 4
    finally:
        for stream in (first, second, third):
            model.swarm.loop.call_soon_threadsafe(stream.close)


def test_a_prompt_of_nearly_a_message_per_hop_goes_through_by_push(client):
    """A prompt whose hidden states fill most of a message: each hop pushes its output alone (it fits), and the
    pushed-into hops answer their inputs on their own. Every hop's input reaches the session's history, as local
    transformers computes it, and the client relays nothing."""
    model, ref = client
    B, T = 20, 256  # T: the tiny model's longest sequence
    hidden_bytes = B * T * 64 * 4
    assert hidden_bytes < codec.MAX_MESSAGE_BYTES < 2 * hidden_bytes  # an output fits a push, but not two
    x_BTD = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(2))
    with model.inference_session(max_length=T, batch_size=B) as session:
        out = session.step(x_BTD, torch.ones(B, T, dtype=torch.long), torch.arange(T)[None])
        assert [(hop.start, hop.end) for hop in session.route] == SPANS and session.relays == 0
        history = {block: session._history[block] for block in (1, 3)}
    for block, (got,) in history.items():
        torch.testing.assert_close(got, _local_blocks(ref, x_BTD, 0, block), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, _local_blocks(ref, x_BTD, 0, 4), atol=1e-4, rtol=0)


def _push(runtime, peer_id, requests: list[swarm_pb2.InferencePush]) -> list[int]:
    """Pushes ``requests`` from ``runtime``'s peer; the kind of error each got (ERROR_NONE: queued)."""

    async def call():
        answers = await runtime.p2p.iterate_protobuf_handler(
            peer_id, rpc.PUSH, as_aiter(*requests), swarm_pb2.PushResponse
        )
        return [answer.error.kind async for answer in answers]

    return runtime.run(call())


def test_bad_pushes_get_errors_and_the_peer_keeps_serving(client):
    model, ref = client
    (hop,) = model.router.inference_route(0, 1)
    first = _SpanStream(model.swarm, model.model_id, hop)
    # this client itself is the session's previous hop, so that its malformed pushes are read at all
    model.swarm.run(first.open(16, 1, _neighbours(sender=model.swarm.p2p.peer_id)))
    good = codec.pack(_step_inputs(torch.randn(1, 2, 64), 0))[0]
    garbage = [runtime_pb2.Tensor(buffer=b"\x00" * 7, size=[1, 2, 64], dtype="float32", chunks=1)]
    requests = [
        swarm_pb2.InferencePush(session_id=os.urandom(16), step_id=1, tensors=good),  # nobody's session
        swarm_pb2.InferencePush(session_id=b"", step_id=1, tensors=good),  # no session id
        swarm_pb2.InferencePush(session_id=first.session_id, step_id=1, tensors=garbage + good[1:]),
        swarm_pb2.InferencePush(session_id=first.session_id, step_id=1, tensors=good[:1]),  # too few tensors
    ]
    unknown, invalid = swarm_pb2.UNKNOWN_SESSION, swarm_pb2.INVALID
    try:
        assert _push(model.swarm, hop.peer_id, requests) == [unknown, unknown, invalid, invalid]

        async def send_garbage():
            _, _, writer = await model.swarm.p2p.call_binary_stream_handler(hop.peer_id, rpc.PUSH)
            writer.write(b"\x07" + b"\xff" * 64)
            writer.close()

        model.swarm.run(send_garbage())
        assert _push(model.swarm, hop.peer_id, requests[:1]) == [unknown]  # pushes are still served
        # the session itself is unharmed and serves its client
        x = _step_inputs(torch.randn(1, 2, 64), 0)
        out = model.swarm.run(first.step(5, x))
        torch.testing.assert_close(out, _local_blocks(ref, x[0], 0, 1), atol=1e-4, rtol=0)
    finally:
        model.swarm.loop.call_soon_threadsafe(first.close)


def test_session_ids_are_checked(client):
    model, _ = client
    (hop,) = model.router.inference_route(0, 1)
    for session_id in (b"short",):
        stream = _SpanStream(model.swarm, model.model_id, hop)
        stream.session_id = session_id
        with pytest.raises(ValidationError, match="session id"):
            model.swarm.run(stream.open(16, 1))
    # one id cannot be opened twice (an id is a session's capability; a second owner could take its steps)
    stream = _SpanStream(model.swarm, model.model_id, hop)
    model.swarm.run(stream.open(16, 1))
    twin = _SpanStream(model.swarm, model.model_id, hop)
    twin.session_id = stream.session_id
    try:
        with pytest.raises(ValidationError, match="already in use"):
            model.swarm.run(twin.open(16, 1))
    finally:
        model.swarm.loop.call_soon_threadsafe(stream.close)


def test_a_third_party_that_knows_the_session_ids_can_neither_push_nor_read(swarm, client):
    """The attack: another client learned every session id of a victim's chain. It pushes a repeat of the victim's
    step (to have its saved output sent on) and a new step of its own (to run it in the victim's context, moving
    its position). Every push is refused as if the session did not exist, and the victim's next step is exact.
    Control: once the victim names that client as a session's previous hop, the same kind of push is taken."""
    model, ref = client
    local_swarm, _, _ = swarm
    attacker = SwarmRuntime(client_settings(local_swarm))
    streams = _open(model, model.router.inference_route())
    x_BTD = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3))
    local = {block: _local_blocks(ref, x_BTD, 0, block) for block in (3, 4)}
    try:
        streams[0].send(1, _step_inputs(x_BTD[:, :3], 0), push=True)
        answer = _receive(model, streams[2])
        torch.testing.assert_close(answer.out_BTD, local[4][:, :3], atol=1e-4, rtol=0)

        unknown = swarm_pb2.UNKNOWN_SESSION
        for stream in streams[1:]:
            repeat = codec.pack(_step_inputs(torch.zeros(1, 3, 64), 0))[0]
            new = codec.pack(_step_inputs(torch.randn(1, 1, 64), 3))[0]
            pushes = [
                swarm_pb2.InferencePush(session_id=stream.session_id, step_id=1, tensors=repeat),
                swarm_pb2.InferencePush(session_id=stream.session_id, step_id=2, tensors=new),
            ]
            assert _push(attacker, stream.hop.peer_id, pushes) == [unknown, unknown]
        # nothing reached the victim's caches: its step 2 is exact, and answered by the last hop alone
        streams[0].send(2, _step_inputs(x_BTD[:, 3:4], 3), push=True)
        answer = _receive(model, streams[2])
        assert answer.step_id == 2
        torch.testing.assert_close(answer.out_BTD, local[4][:, 3:4], atol=1e-4, rtol=0)

        # control: the victim names the attacker as its last session's previous hop (a step on the same stream
        # afterwards makes sure the peer has read that); the attacker's push is then taken and computed
        streams[2].relink(_neighbours(sender=attacker.p2p.peer_id))
        streams[2].send(3, _step_inputs(local[3][:, 4:5], 4))
        assert _receive(model, streams[2]).step_id == 3
        step = swarm_pb2.InferencePush(
            session_id=streams[2].session_id,
            step_id=4,
            tensors=codec.pack(_step_inputs(local[3][:, 5:6], 5))[0],
        )
        assert _push(attacker, streams[2].hop.peer_id, [step]) == [swarm_pb2.ERROR_NONE]
        answer = _receive(model, streams[2])
        assert answer.step_id == 4
        torch.testing.assert_close(answer.out_BTD, local[4][:, 5:6], atol=1e-4, rtol=0)
    finally:
        for stream in streams:
            model.swarm.loop.call_soon_threadsafe(stream.close)
        attacker.shutdown()


@pytest.mark.timeout(180)
def test_push_bytes_per_hop_do_not_grow_along_the_chain(tiny_checkpoints):
    """4 peers of one block each, counted on their /metrics (``sent_bytes_total``): every hop pushes the same
    bytes per token wherever it stands, and the pushed-into hops but the last answer the client the same bytes (their
    input). Carrying the earlier hops' inputs along made the fourth hop's pushes three times the first's."""
    path, ports = tiny_checkpoints["llama"], [free_port() for _ in range(4)]
    with LocalSwarm(path, spans=[], peer_args=["--throughput", "100", "--rebalance-period", "0"]) as swarm:
        for block, port in enumerate(ports):
            swarm.add_peer(block, block + 1, extra_args=["--metrics-port", str(port)], wait=False)
        for peer in swarm.peers:
            peer.wait_ready(swarm.start_timeout)
        model = DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm))
        try:
            ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
            with model.inference_session(max_length=30) as session:
                model.generate(ids, max_new_tokens=16, do_sample=False)
                assert len(session.route) == 4 and session.relays == 0
        finally:
            model.shutdown()
        sent = [scrape(f"http://127.0.0.1:{port}/metrics") for port in ports]
    key = "swarm_peer_peer_sent_bytes_total"
    pushes = [s.get((key, (("to", "next_hop"),)), 0) for s in sent[:3]]
    answers = [s.get((key, (("to", "client"),)), 0) for s in sent[1:3]]
    assert min(pushes) > 0 and max(pushes) <= 1.05 * min(pushes), pushes
    assert min(answers) > 0 and max(answers) <= 1.05 * min(answers), answers
