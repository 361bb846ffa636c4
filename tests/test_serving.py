"""protocols.serving against real hivemind P2P daemons on 127.0.0.1: what any RPC of a peer inherits.

Each test serves small handlers of its own with an ``RpcServer`` on one P2P instance and calls them from another:
the limits, deadlines and typed errors are the server's, whatever the handler does.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from swarm_peer.client.health import PeerHealth, Retries, policy
from swarm_peer.errors import BusyError, InternalError, PeerError, SwarmError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2
from swarm_peer.protocols.serving import Limits, RpcServer

TYPES = swarm_pb2.PushResponse, swarm_pb2.PushResponse  # any message with an ``error`` field will do
FORWARD_TYPES = swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse


async def _echo(requests, call):
    """Answers every message; fails as the message's error kind asks (1: busy, 2: a bug)."""
    async for request in requests:
        if request.error.kind == swarm_pb2.BUSY:
            raise BusyError("no room")
        if request.error.kind == swarm_pb2.INVALID:
            raise RuntimeError("a bug")
        if request.error.kind == swarm_pb2.DEADLINE:
            call.set_deadline(0.3)
            await asyncio.sleep(5)
        call.ledger.close()
        yield swarm_pb2.PushResponse()


@contextlib.asynccontextmanager
async def _pair(limits: Limits, max_seconds: float = 30.0):
    server_p2p = await P2P.create()
    client = await P2P.create(initial_peers=await server_p2p.get_visible_maddrs())
    server = RpcServer(limits)
    await server.add(server_p2p, "test.echo", _echo, TYPES, max_seconds)
    await server.add(server_p2p, "test.unary", _echo, TYPES, max_seconds, unary=True)
    await server.add(server_p2p, "test.forward", _broken, FORWARD_TYPES, max_seconds, unary=True)
    await server.add(server_p2p, rpc.streamed("test.forward"), _broken, FORWARD_TYPES, max_seconds)
    try:
        yield server, server_p2p.peer_id, client
    finally:
        await client.shutdown()
        await server_p2p.shutdown()


def _asks(kind=swarm_pb2.ERROR_NONE) -> swarm_pb2.PushResponse:
    return swarm_pb2.PushResponse(error=swarm_pb2.Error(kind=kind))


async def _open(client, peer):
    _, reader, writer = await client.call_binary_stream_handler(peer, "test.echo")
    return reader, writer


async def _answer(reader) -> swarm_pb2.PushResponse:
    async with asyncio.timeout(10):
        answer, _ = await P2P.receive_protobuf(swarm_pb2.PushResponse, reader)
    return answer


async def _until(condition, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def test_a_bug_is_internal_and_neither_retried_nor_banned_and_busy_is_retried_without_a_ban():
    async with _pair(Limits()) as (_, peer, client):
        answers = {}
        for kind in (swarm_pb2.INVALID, swarm_pb2.BUSY):
            answers[kind] = await client.call_protobuf_handler(
                peer, "test.unary", _asks(kind), swarm_pb2.PushResponse
            )
        streamed = await client.iterate_protobuf_handler(
            peer, "test.echo", as_aiter(_asks(), _asks(swarm_pb2.INVALID)), swarm_pb2.PushResponse
        )
        answers["stream"] = [answer async for answer in streamed]
    assert answers[swarm_pb2.INVALID].error.kind == swarm_pb2.INTERNAL
    assert "RuntimeError: a bug" in answers[swarm_pb2.INVALID].error.message
    assert answers[swarm_pb2.BUSY].error.kind == swarm_pb2.BUSY
    assert [a.error.kind for a in answers["stream"]] == [swarm_pb2.ERROR_NONE, swarm_pb2.INTERNAL]

    health = PeerHealth(ban_seconds=2, max_ban_seconds=60, ping_ttl=60)
    internal = rpc.remote_failure(answers[swarm_pb2.INVALID].error, "p")
    assert type(internal) is InternalError and policy(internal) == (False, False)
    with pytest.raises(InternalError):
        Retries(health, timeout=10).failed("p", internal)
    assert not health.is_banned("p") and health.failures("p") == 0
    # control: busy is retried, the peer avoided for a while but not counted as failing; a lost peer is banned
    busy = rpc.remote_failure(answers[swarm_pb2.BUSY].error, "q")
    assert type(busy) is BusyError and policy(busy) == (True, False)
    Retries(health, timeout=10, first_backoff=0).failed("q", busy)
    assert health.is_banned("q") and health.failures("q") == 0
    Retries(health, timeout=10, first_backoff=0).failed("r", PeerError("connection lost"))
    assert health.is_banned("r") and health.failures("r") == 1


async def test_a_frame_too_large_is_refused_from_its_header():
    async with _pair(Limits(max_frame_bytes=1 << 20)) as (server, peer, client):
        reader, writer = await _open(client, peer)
        writer.write(P2P.MESSAGE_MARKER + (3 << 29).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))  # 1.5 GiB
        await writer.drain()
        answer = await _answer(reader)
        assert answer.error.kind == swarm_pb2.INVALID and "exceeds" in answer.error.message
        assert server.budget.used == 0  # nothing of it was charged, let alone read
        writer.close()


async def test_a_half_sent_frame_and_an_idle_stream_end_in_time():
    async with _pair(Limits(frame_seconds=0.5), max_seconds=2.0) as (server, peer, client):
        reader, writer = await _open(client, peer)
        writer.write(P2P.MESSAGE_MARKER + (100).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"x" * 10)
        await writer.drain()
        answer = await _answer(reader)
        assert answer.error.kind == swarm_pb2.DEADLINE and "not complete" in answer.error.message
        # a stream that sends nothing ends at the call's deadline
        reader, writer = await _open(client, peer)
        answer = await _answer(reader)
        assert answer.error.kind == swarm_pb2.DEADLINE
        # and a handler that runs past the deadline it set itself
        reader, writer = await _open(client, peer)
        await P2P.send_protobuf(_asks(swarm_pb2.DEADLINE), writer)
        answer = await _answer(reader)
        assert answer.error.kind == swarm_pb2.DEADLINE
        # after an error a stream reads on for a moment, then is gone: it holds nothing of the peer for long
        await _until(lambda: server.open_streams == 0, timeout=5)


async def test_streams_and_inbound_bytes_are_bounded_over_all_callers():
    limits = Limits(max_streams=3, inbound_bytes=100_000, budget_wait=0.3)
    async with _pair(limits) as (server, peer, client):
        streams = [await _open(client, peer) for _ in range(3)]
        # two frames whose bodies hold most of the budget, never completed: the third stream cannot have room
        for _, writer in streams[:2]:
            writer.write(P2P.MESSAGE_MARKER + (45_000).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
            await writer.drain()
        await _until(lambda: server.budget.used == 90_000, timeout=5)
        # a fourth stream while three are open: busy at once
        reader, writer = await _open(client, peer)
        answer = await _answer(reader)
        assert answer.error.kind == swarm_pb2.BUSY and "streams" in answer.error.message
        reader, writer = streams[2]
        message = swarm_pb2.PushResponse(error=swarm_pb2.Error(message="x" * 20_000))
        await P2P.send_protobuf(message, writer)
        answer = await _answer(reader)
        assert answer.error.kind == swarm_pb2.BUSY and "inbound" in answer.error.message
        for _, writer in streams:
            writer.close()
        await _until(lambda: server.open_streams == 0 and server.budget.used == 0, timeout=5)
        # control: with the others gone, the same message is served
        reader, writer = await _open(client, peer)
        await P2P.send_protobuf(message, writer)
        assert (await _answer(reader)).error.kind == swarm_pb2.ERROR_NONE
        writer.close()


def test_kinds_map_to_one_class_each_and_back():
    for kind, name in swarm_pb2.ErrorKind.items():
        if kind == "ERROR_NONE":
            continue
        error = rpc.remote_failure(swarm_pb2.Error(kind=name, message="m"), "p")
        assert rpc.error_message(error).kind == name, kind
    assert isinstance(rpc.remote_failure(swarm_pb2.Error(kind=swarm_pb2.INVALID), "p"), ValidationError)
    assert type(rpc.remote_failure(swarm_pb2.Error(kind=99), "p")) is PeerError  # a kind from a newer peer


async def _broken(requests, call):
    """Answers a forward as a peer that breaks down would: the first message's tensor value says how."""
    received = [request async for request in requests]  # all of it: the caller is not cut off mid-request
    (how,) = codec.deserialize(received[0].tensors[0]).tolist()
    call.ledger.close()
    if how == 0:  # refuses the request: the caller's mistake
        raise ValidationError("no such blocks")
    if how == 1:  # an answer with no tensors (as a peer that died before its answer was out)
        yield swarm_pb2.ForwardResponse()
    elif how == 2:  # bytes that are no tensor
        yield swarm_pb2.ForwardResponse(tensors=[runtime_pb2.Tensor(buffer=b"xx", size=[3], dtype="int64")])
    else:  # the first of a tensor's two parts, then the stream ends
        (part,) = codec.pack([torch.zeros(600_000)])[0]
        part.chunks = 2
        yield swarm_pb2.ForwardResponse(tensors=[part])


async def test_a_broken_answer_is_the_peers_failure_and_a_refusal_the_callers():
    """A peer's answer that ends before its tensors are complete (it died mid-answer), or holds bytes that are no
    tensor, is a ``PeerError``: retried elsewhere, the peer banned. The control: a peer that refused the request
    (``ValidationError``) is not retried."""
    async with _pair(Limits()) as (_, peer, client):
        errors = {}
        for how in range(4):
            # the last one is sent as a stream: larger than one message
            tensors = [torch.tensor([how])] + ([torch.zeros(1_000_000)] if how == 3 else [])
            with pytest.raises(SwarmError) as caught:
                await rpc.call_with_tensors(client, peer, "test.forward", FORWARD_TYPES, tensors, 1)
            errors[how] = caught.value
    assert type(errors[0]) is ValidationError and policy(errors[0]) == (False, False)  # the control
    for how in (1, 2, 3):
        assert type(errors[how]) is PeerError and policy(errors[how]) == (True, True), errors[how]
        assert "broken answer" in str(errors[how])
