"""A trainable stage's state on the wire (``swarm.v1.stage_state``): what a peer that joins a stage of a SWARM run
downloads before it serves, and what a trainer downloads to assemble the run's model.

``StageState``: the stage's parameters by name (names within the span: ``"0.self_attn.q_proj.weight"`` is the
span's first block), AdamW's two moments of each (absent before the first step) and its step counts. A response
stream's first message carries the JSON (names, shapes, counts); the tensors follow in that order, in parts, over
that message and the next ones (``codec``). ``fetch_state`` checks every tensor's dtype and shape at its first
part against the shapes the caller expects (its own copy of the stage), so a peer cannot be made to buffer more
than its own stage's size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils.asyncio import as_aiter

from swarm_peer.errors import PeerError, ValidationError
from swarm_peer.protocols import codec, rpc, swarm_pb2

__all__ = ["StageState", "fetch_state", "state_messages"]

_MAX_JSON_BYTES = 1 << 20


@dataclass
class StageState:
    """A stage's parameters (``names`` -> ``weights``), AdamW's moments (None before its first step), its counts:
    ``steps`` (the stage's optimizer steps, as announced) and ``adam_step`` (AdamW's own step count)."""

    names: list[str]
    weights: list[torch.Tensor]
    exp_avg: list[torch.Tensor] | None
    exp_avg_sq: list[torch.Tensor] | None
    steps: int
    adam_step: float

    def tensors(self) -> list[torch.Tensor]:
        return self.weights + (self.exp_avg or []) + (self.exp_avg_sq or [])

    def header(self) -> bytes:
        return json.dumps(
            {
                "names": self.names,
                "shapes": [list(w.shape) for w in self.weights],
                "moments": self.exp_avg is not None,
                "steps": self.steps,
                "adam_step": self.adam_step,
            }
        ).encode()


def state_messages(state: StageState) -> Iterator[swarm_pb2.StateResponse]:
    """The response stream of ``state``: the header, then the tensors in parts."""
    header = state.header()
    for i, parts in enumerate(codec.pack(state.tensors())):
        yield swarm_pb2.StateResponse(state_json=header if i == 0 else b"", tensors=parts)


async def fetch_state(
    p2p: P2P, peer_id: PeerID, span: swarm_pb2.Span, shapes: dict[str, tuple[int, ...]], timeout: float
) -> StageState:
    """Downloads the state of the stage ``span`` from ``peer_id``. ``shapes``: the caller's parameters' names and
    shapes, in order; the peer's state must have exactly these. Raises ``ValidationError`` for a state that does
    not fit, ``PeerError`` for one that ended early (the peer died), the peer's typed error, or ``remote_error``'s
    for a call that failed on the way."""
    request = swarm_pb2.StateRequest(span=span, timeout_ms=int(timeout * 1000))
    header, assembler = None, None
    try:
        responses = await p2p.iterate_protobuf_handler(
            peer_id, rpc.STAGE_STATE, as_aiter(request), swarm_pb2.StateResponse
        )
        async for response in responses:
            rpc.check(response, peer_id)
            if header is None:
                header = _header(response.state_json, shapes)
                assembler = codec.TensorAssembler(
                    expected=len(shapes) * (3 if header["moments"] else 1),
                    check=_shapes(list(shapes.values())),
                )
            assembler.feed(response.tensors)
    except ValidationError:
        raise
    except Exception as e:
        raise rpc.remote_error(e, peer_id) from None
    if assembler is None or not assembler.complete:
        got = "nothing" if assembler is None else f"{len(assembler._done)} of {assembler.expected} tensors"
        raise PeerError(f"the state of {span.start_block}:{span.end_block} from {peer_id} ended early: {got}")
    tensors, n = assembler.tensors(), len(shapes)
    for name, t in zip(shapes, tensors, strict=False):
        if not t.isfinite().all():
            raise ValidationError(f"the downloaded {name} is not finite")
    moments = header["moments"]
    return StageState(
        names=list(shapes),
        weights=tensors[:n],
        exp_avg=tensors[n : 2 * n] if moments else None,
        exp_avg_sq=tensors[2 * n :] if moments else None,
        steps=header["steps"],
        adam_step=header["adam_step"],
    )


def _header(raw: bytes, shapes: dict[str, tuple[int, ...]]) -> dict:
    if not raw or len(raw) > _MAX_JSON_BYTES:
        raise ValidationError("a stage state must start with its header")
    try:
        header = json.loads(raw)
        names, declared = header["names"], [tuple(s) for s in header["shapes"]]
        moments, steps, adam_step = header["moments"], header["steps"], header["adam_step"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValidationError(f"malformed stage state header: {e}") from None
    if names != list(shapes) or declared != list(shapes.values()):
        raise ValidationError("the stage state's parameters are not this stage's (another model or span)")
    if type(moments) is not bool or type(steps) is not int or steps < 0:
        raise ValidationError("malformed stage state header: moments and steps")
    if not isinstance(adam_step, int | float) or not math.isfinite(adam_step) or adam_step < 0:
        raise ValidationError("malformed stage state header: adam_step")
    return header


def _shapes(shapes: list[tuple[int, ...]]):
    def check(index: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        want = shapes[index % len(shapes)]
        if not dtype.is_floating_point or shape != want:
            raise ValidationError(
                f"stage state tensor {index} is {dtype} {list(shape)}, not float {list(want)}"
            )

    return check
