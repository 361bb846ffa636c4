"""The tensor codec writes the messages hivemind writes (bfloat16 narrower), reads hivemind's, and refuses malformed
ones."""

from __future__ import annotations

import math

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm_peer.errors import ValidationError
from swarm_peer.protocols import codec

TENSORS = {
    "float32": torch.randn(2, 3, 8),
    "float16": torch.randn(1, 5).half(),
    "bfloat16": torch.randn(4, 2).bfloat16(),
    "int64": torch.arange(12).reshape(3, 4),
    "int32": torch.arange(6, dtype=torch.int32),
    "bool": torch.tensor([[True, False, True]]),
    "empty": torch.ones(1, 0, 8),
    "transposed": torch.randn(3, 5).t(),
    "0-d": torch.tensor(3.5),
}


def _unpack(messages) -> list[torch.Tensor]:
    assembler = codec.TensorAssembler(expected=sum(part.chunks > 0 for parts in messages for part in parts))
    for parts in messages:
        assembler.feed(parts)
    return assembler.tensors()


@pytest.mark.parametrize("name", [name for name in TENSORS if name != "bfloat16"])
def test_messages_equal_hivemind_and_round_trip(name):
    tensor = TENSORS[name]
    ours = codec.serialize(tensor)
    theirs = serialize_torch_tensor(tensor)
    for field in ("buffer", "size", "dtype", "compression", "requires_grad"):
        assert getattr(ours, field) == getattr(theirs, field), field
    # each side reads what the other wrote
    torch.testing.assert_close(deserialize_torch_tensor(ours), tensor, rtol=0, atol=0)
    (back,) = _unpack(codec.pack([tensor]))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    torch.testing.assert_close(back, tensor, rtol=0, atol=0)
    torch.testing.assert_close(codec.deserialize(theirs), tensor, rtol=0, atol=0)


def test_bfloat16_takes_two_bytes_a_value():
    """hivemind widens bfloat16 to float32 on the wire; ours sends its own two bytes (a client's
    ``compression="bfloat16"``, a bfloat16 model's hidden states)."""
    tensor = torch.randn(8, 576).bfloat16()
    ours, theirs = codec.serialize(tensor), serialize_torch_tensor(tensor)
    assert len(ours.buffer) == tensor.numel() * 2 and ours.dtype == "bfloat16"
    (back,) = _unpack(codec.pack([tensor]))
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back, tensor, rtol=0, atol=0)
    # the control: hivemind's message holds twice the bytes its declared shape takes, which the assembler refuses
    assert len(theirs.buffer) == tensor.numel() * 4
    theirs.chunks = 1
    with pytest.raises(ValidationError, match="more bytes than its declared shape"):
        codec.TensorAssembler(expected=1).feed([theirs])


def test_large_tensor_is_split_and_joined():
    tensor = torch.randn(3, codec.MAX_MESSAGE_BYTES // 4 + 100)
    messages = codec.pack([torch.ones(1, 2), tensor])
    assert len(messages) > 1 and max(part.chunks for parts in messages for part in parts) > 1
    small, back = _unpack(messages)
    torch.testing.assert_close(back, tensor, rtol=0, atol=0)
    torch.testing.assert_close(small, torch.ones(1, 2), rtol=0, atol=0)


def test_compressed_tensor_goes_through_hivemind():
    tensor = torch.randn(4, 16)
    (parts,) = codec.pack([tensor, torch.arange(3)], compression=codec.FLOAT16)
    assert parts[0].compression == codec.FLOAT16 and parts[1].compression == codec.NONE  # integers stay exact
    back, ints = _unpack([parts])
    torch.testing.assert_close(back, tensor, rtol=1e-3, atol=1e-3)
    assert ints.tolist() == [0, 1, 2]


def test_a_received_tensor_never_requires_grad():
    for compression in (codec.NONE, codec.FLOAT16):  # whatever another sender's message says
        message = serialize_torch_tensor(torch.randn(2, 2, requires_grad=True), compression)
        assert message.requires_grad
        assert not codec.deserialize(message).requires_grad


@pytest.mark.parametrize(
    "message, match",
    [
        (runtime_pb2.Tensor(buffer=b"\x00" * 7, size=[2], dtype="float32"), "does not match"),
        (runtime_pb2.Tensor(buffer=b"\x00" * 16, size=[2], dtype="float32"), "does not match"),
        (runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1, 1, 1, 1, 2], dtype="float32"), "at most 4"),
        (runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2], dtype="complex64"), "dtype"),
        (runtime_pb2.Tensor(buffer=b"", size=[1 << 20, 1 << 20], dtype="float32"), "too large"),
        (runtime_pb2.Tensor(buffer=b"\x00" * 3, size=[2], dtype="bfloat16"), "cannot decode|does not match"),
    ],
)
def test_malformed_messages_are_refused(message, match):
    with pytest.raises(ValidationError, match=match):
        codec.deserialize(message)


def _first_part(shape, chunks=1, dtype="float32", nbytes=8):
    return runtime_pb2.Tensor(buffer=b"\x00" * nbytes, size=shape, dtype=dtype, chunks=chunks)


def test_a_tensor_is_checked_at_its_first_part_before_more_is_buffered():
    """What a tensor's first part declares is checked before any other part is taken: the caller's check (here:
    at most 1000 elements), a part count that its bytes allow, and parts that never add up to more than that."""
    seen = []

    def at_most_1000(index, dtype, shape):
        seen.append((index, dtype, shape))
        if math.prod(shape) > 1000:
            raise ValidationError(f"tensor {index} of shape {list(shape)} is too large for this RPC")

    # 1.5 GiB declared in 750 parts: refused at the first part, whose buffer is tiny
    assembler = codec.TensorAssembler(expected=1, check=at_most_1000)
    with pytest.raises(ValidationError, match="too large for this RPC"):
        assembler.feed([_first_part([1, 700_000, 576], chunks=750)])
    assert seen == [(0, torch.float32, (1, 700_000, 576))]
    # 8 bytes declared, but in 1025 parts: more parts than its bytes need
    with pytest.raises(ValidationError, match="parts"):
        codec.TensorAssembler(expected=1).feed([_first_part([2], chunks=1025)])
    # parts that bring more bytes than the declared shape holds
    assembler = codec.TensorAssembler(expected=1)
    big = codec.MAX_MESSAGE_BYTES
    with pytest.raises(ValidationError, match="more bytes than"):
        assembler.feed([_first_part([big // 4 + 1], chunks=2, nbytes=big), _first_part([], nbytes=big)])
    # control: the same assembler takes a well-formed tensor of several parts
    tensor = torch.randn(big // 4 + 10)
    assembler = codec.TensorAssembler(expected=1, check=lambda *args: None)
    for message in codec.pack([tensor]):
        assembler.feed(message)
    assert torch.equal(assembler.tensors()[0], tensor)
