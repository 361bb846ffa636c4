"""Tensors on the wire: hivemind-serialized, split into parts that fit one P2P message, checked on arrival.

A P2P message is capped at 4 MiB, so every tensor is split with hivemind's ``split_for_streaming`` and the parts
are grouped into messages of at most ``MAX_MESSAGE_BYTES``. ``TensorAssembler`` joins parts back, across
messages, and ``deserialize`` refuses anything that is not a well-formed floating or integer tensor of a sane
size, so garbage from the network becomes a ``ValidationError`` instead of a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarm_peer.errors import ValidationError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "serialize",
    "deserialize",
    "pack",
    "group",
    "message_bytes",
    "TensorAssembler",
    "declared",
    "NONE",
    "FLOAT16",
    "UNIFORM_8BIT",
    "BLOCKWISE_INT8",
    "Wire",
    "WIRES",
]

MAX_MESSAGE_BYTES = 2 * 1024 * 1024  # half of hivemind's 4 MiB cap, leaving room for framing
MAX_TENSOR_BYTES = 1 << 31
# a compressed tensor's buffer may exceed its raw bytes by a header (8-bit codecs add a codebook), never by more
_COMPRESSION_SLACK = 4096
NONE = runtime_pb2.CompressionType.NONE
FLOAT16 = runtime_pb2.CompressionType.FLOAT16
UNIFORM_8BIT = runtime_pb2.CompressionType.UNIFORM_8BIT  # hivemind's 8-bit codec: 256 buckets of equal width
# ours (a value outside hivemind's enum, which proto3 carries as is): int8 in blocks of _BLOCK values, each block
# scaled by its largest magnitude (a float32). Hidden states have a few huge values; per-tensor 8-bit codecs give
# them the whole range (on SmolLM2 hivemind's uniform and quantile codecs agreed with plain greedy on 2% and 8% of
# 200 tokens), blocks confine each to its own 64 values.
BLOCKWISE_INT8 = 101
_BLOCK = 64


class Wire(NamedTuple):
    """How hidden states and their gradients travel, by the name a setting gives (``WIRES``): cast to ``dtype``
    (None: as computed), then encoded with ``compression``. A peer answers, and pushes on, in the dtype and codec
    of the hidden states it was sent, so the client's choice holds along the whole chain."""

    compression: int = NONE
    dtype: torch.dtype | None = None

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.dtype is None or not tensor.is_floating_point() else tensor.to(self.dtype)


WIRES = {
    "none": Wire(),
    "float16": Wire(FLOAT16),
    "bfloat16": Wire(NONE, torch.bfloat16),
    "8bit": Wire(BLOCKWISE_INT8),
}
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def serialize(tensor: torch.Tensor, compression: int = NONE) -> runtime_pb2.Tensor:
    """One tensor -> one hivemind ``Tensor`` message (not yet split). Floating tensors may be compressed.

    Uncompressed tensors are written here, as the same message hivemind's ``NoCompression`` writes: a decode step
    sends small tensors, and hivemind's own path builds a descriptor of each tensor that costs more than the bytes.
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_floating_point():
        compression = NONE
    if compression == BLOCKWISE_INT8:
        return _blockwise_int8(tensor)
    if compression != NONE:
        return serialize_torch_tensor(tensor, compression)
    # numpy has no bfloat16: its bytes go as int16 (hivemind's own path would widen them to float32)
    raw = tensor.contiguous().view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return runtime_pb2.Tensor(
        compression=NONE,
        buffer=raw.numpy().tobytes(),
        size=tensor.shape,
        dtype=str(tensor.dtype).removeprefix("torch."),
    )


def _blockwise_int8(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """``BLOCKWISE_INT8``: the blocks' scales (float32), then one int8 per value."""
    flat = tensor.float().flatten()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % _BLOCK)).view(-1, _BLOCK)
    scales = blocks.abs().amax(dim=1) / 127
    quantized = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).to(
        torch.int8
    )
    return runtime_pb2.Tensor(
        compression=BLOCKWISE_INT8,
        buffer=scales.numpy().tobytes() + quantized.flatten()[: flat.numel()].numpy().tobytes(),
        size=tensor.shape,
        dtype=str(tensor.dtype).removeprefix("torch."),
    )


def _from_blockwise_int8(
    message: runtime_pb2.Tensor, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    numel = math.prod(shape)
    num_blocks = -(-numel // _BLOCK)
    if len(message.buffer) != 4 * num_blocks + numel:
        raise ValidationError(f"tensor buffer does not match its declared shape {list(shape)}")
    buffer = bytearray(message.buffer)
    scales = torch.frombuffer(buffer, dtype=torch.float32, count=num_blocks) if numel else torch.empty(0)
    quantized = torch.frombuffer(buffer, dtype=torch.int8, offset=4 * num_blocks) if numel else torch.empty(0)
    padded = torch.nn.functional.pad(quantized.float(), (0, num_blocks * _BLOCK - numel))
    return (padded.view(num_blocks, _BLOCK) * scales[:, None]).flatten()[:numel].view(shape).to(dtype)


def _split(message: runtime_pb2.Tensor) -> list[runtime_pb2.Tensor]:
    """A serialized tensor as parts of at most ``MAX_MESSAGE_BYTES``; one that fits is its own single part."""
    if len(message.buffer) <= MAX_MESSAGE_BYTES:
        message.chunks = 1
        return [message]
    return list(split_for_streaming(message, MAX_MESSAGE_BYTES))


def pack(
    tensors: Sequence[torch.Tensor], compression: int = NONE, *, compressed: int | None = None
) -> list[list[runtime_pb2.Tensor]]:
    """Serializes and splits ``tensors`` into groups of parts, one group per message, each under the cap. The
    floating ones among the first ``compressed`` (default: all) are encoded with ``compression``."""
    if compressed is None:
        compressed = len(tensors)
    return group(
        [
            part
            for i, tensor in enumerate(tensors)
            for part in _split(serialize(tensor, compression if i < compressed else NONE))
        ]
    )


def group(parts: Iterable[runtime_pb2.Tensor]) -> list[list[runtime_pb2.Tensor]]:
    """Serialized parts (each under the cap) in order, grouped into as few messages as fit under the cap."""
    messages: list[list[runtime_pb2.Tensor]] = [[]]
    size = 0
    for part in parts:
        part_size = message_bytes(part)
        if messages[-1] and size + part_size > MAX_MESSAGE_BYTES:
            messages.append([])
            size = 0
        messages[-1].append(part)
        size += part_size
    return messages


def message_bytes(part: runtime_pb2.Tensor) -> int:
    """About what ``part`` takes in a message: its buffer and a bound on its other fields."""
    return len(part.buffer) + 64


def deserialize(message: runtime_pb2.Tensor) -> torch.Tensor:
    """A complete (reassembled) ``Tensor`` message -> a CPU tensor that does not require grad, or
    ``ValidationError`` if it is malformed."""
    dtype, shape, nbytes = declared(message)
    if message.compression == NONE:  # the message serialize() writes
        if len(message.buffer) != nbytes:
            raise ValidationError(f"tensor buffer does not match its declared shape {list(message.size)}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(message.buffer), dtype=dtype).view(shape)
    if message.compression == BLOCKWISE_INT8:
        if not dtype.is_floating_point:
            raise ValidationError(f"a {dtype} tensor cannot be int8-quantized")
        return _from_blockwise_int8(message, dtype, shape)
    try:
        tensor = deserialize_torch_tensor(message)
    except Exception as e:  # hivemind raises whatever numpy/torch raise on a bad buffer
        raise ValidationError(f"cannot decode tensor of shape {list(message.size)}: {e}") from None
    if list(tensor.shape) != list(message.size):
        raise ValidationError(f"tensor buffer does not match its declared shape {list(message.size)}")
    return tensor.detach()  # whatever its requires_grad flag says: a peer decides what it differentiates


class TensorAssembler:
    """Collects parts of ``expected`` tensors, possibly spread over several messages, in order.

    Each tensor's dtype and shape are checked at its *first* part, before any more of it is buffered: by
    ``declared`` (the shape is sane and its parts can only add up to that shape's bytes) and by the caller's
    ``check(index, dtype, shape)``, which raises ``ValidationError`` for what the RPC does not take (a hidden size
    other than the model's, more tokens than the peer's limit...). So a request declaring gigabytes is refused at
    its first message, and no request can make the peer buffer more than what its shapes allow.

    >>> asm = TensorAssembler(expected=3, check=check_shapes)
    >>> for parts in messages: asm.feed(parts)
    >>> if asm.complete: hidden, mask, positions = asm.tensors()
    """

    def __init__(
        self, expected: int, check: Callable[[int, torch.dtype, tuple[int, ...]], None] | None = None
    ):
        self.expected, self.check = expected, check
        self._done: list[runtime_pb2.Tensor] = []
        self._current: list[runtime_pb2.Tensor] = []
        self._remaining = 0
        self._room = 0  # buffer bytes the current tensor's remaining parts may still bring

    @property
    def complete(self) -> bool:
        return len(self._done) == self.expected

    def feed(self, parts: Iterable[runtime_pb2.Tensor]) -> None:
        for part in parts:
            if self.complete:
                raise ValidationError(f"received more than the {self.expected} tensors this message expects")
            if self._remaining == 0:
                dtype, shape, nbytes = declared(part)
                if self.check is not None:
                    self.check(len(self._done), dtype, shape)
                if not 1 <= part.chunks <= nbytes // MAX_MESSAGE_BYTES + 1:
                    raise ValidationError(
                        f"a tensor of shape {list(shape)} comes in 1 to {nbytes // MAX_MESSAGE_BYTES + 1} parts, "
                        f"not {part.chunks}"
                    )
                self._remaining, self._room = part.chunks, nbytes + _COMPRESSION_SLACK
            self._room -= len(part.buffer)
            if self._room < 0:
                raise ValidationError("a tensor's parts hold more bytes than its declared shape")
            self._current.append(part)
            self._remaining -= 1
            if self._remaining == 0:
                self._done.append(_combine(self._current))
                self._current = []

    def messages(self) -> list[runtime_pb2.Tensor]:
        """The tensors as complete messages, not decoded (to pass on as they came)."""
        if not self.complete:
            raise ValidationError(f"expected {self.expected} tensors, received {len(self._done)}")
        return self._done

    def tensors(self) -> list[torch.Tensor]:
        return [deserialize(message) for message in self.messages()]

    @property
    def compression(self) -> int:
        """The codec of the first tensor (a call's hidden states), which the answer takes too (``Wire``)."""
        messages = self.messages()
        return messages[0].compression if messages else NONE


def declared(part: runtime_pb2.Tensor) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The dtype, shape and uncompressed bytes that a tensor's (first) part declares; ``ValidationError`` if they
    are not a tensor this codec takes."""
    dtype = _DTYPES.get(part.dtype)
    if dtype is None:
        raise ValidationError(f"unsupported tensor dtype {part.dtype!r}")
    shape = tuple(part.size)
    if len(shape) > 4:  # sizes are unsigned on the wire
        raise ValidationError(f"a tensor's shape must be at most 4 sizes, got {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise ValidationError(f"tensor of shape {list(shape)} is too large")
    return dtype, shape, nbytes


def _combine(parts: list[runtime_pb2.Tensor]) -> runtime_pb2.Tensor:
    if len(parts) == 1:
        return parts[0]
    combined = runtime_pb2.Tensor()
    combined.CopyFrom(parts[0])
    combined.chunks = 1
    combined.buffer = b"".join(part.buffer for part in parts)
    return combined
