"""A span's blocks equal the local transformers model's, mixtures of experts included (loaded from one tensor per
expert, as checkpoints keep them); its decode steps run on its layers alone when that is exact, through the
family's base model otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm_peer.compat import CACHE
from swarm_peer.errors import ValidationError
from swarm_peer.models import Checkpoint, resolve_checkpoint
from swarm_peer.peer.blocks import BlockSpan

from .conftest import MOE_FAMILIES, TINY_CONFIGS, reference_model

PREFILL, STEPS = 3, 8  # past the tiny Mistral's and Qwen2's sliding window of 6 tokens


def decode(span: BlockSpan, a: int, b: int, hidden_BTD, mask_BS, by_base: bool) -> torch.Tensor:
    """Outputs of a prefill then single-token steps: through ``span.forward``, or through the base model alone."""
    cache = span.new_cache(a, b)
    outputs, start = [], 0
    with torch.inference_mode():
        # a stateless call numbers the layers for [a, b), as every forward does
        span.forward(hidden_BTD[:, :1], mask_BS[:, :1], torch.zeros(1, 1, dtype=torch.long), a, b)
        runner = span._runner(a, b)
        for end in range(PREFILL, PREFILL + STEPS + 1):
            args = hidden_BTD[:, start:end], mask_BS[:, :end], torch.arange(start, end)[None]
            if by_base:
                kwargs = dict(inputs_embeds=args[0], attention_mask=args[1], position_ids=args[2])
                outputs.append(runner(**kwargs, use_cache=True, **{CACHE: cache}).last_hidden_state)
            else:
                outputs.append(span.forward(*args, a, b, cache))
            start = end
    return torch.cat(outputs, dim=1)


def layer_outputs(path: str, hidden_BTD, mask_BS, position_ids_BT) -> list[torch.Tensor]:
    """Each decoder layer's output in the local transformers model, fed ``hidden_BTD`` as its input embeddings."""
    model, outputs = reference_model(path).model, []
    hooks = [layer.register_forward_hook(lambda m, args, out: outputs.append(out)) for layer in model.layers]
    with torch.no_grad():
        model(inputs_embeds=hidden_BTD, attention_mask=mask_BS, position_ids=position_ids_BT)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_a_span_equals_the_local_models_layers(tiny_checkpoints, family):
    checkpoint = resolve_checkpoint(tiny_checkpoints[family])
    n = checkpoint.num_blocks
    span = BlockSpan(checkpoint, 1, n)
    hidden_BTD = torch.randn(2, 9, span.hidden_size, generator=torch.Generator().manual_seed(0))
    mask_BS = torch.ones(2, 9, dtype=torch.long)
    mask_BS[1, :4] = 0  # a left-padded row
    positions_BT = torch.arange(9).expand(2, -1)
    outputs = layer_outputs(tiny_checkpoints[family], hidden_BTD, mask_BS, positions_BT)
    for a, b in [(1, n), (1, n - 1), (n - 1, n)]:
        with torch.no_grad():
            got_BTD = span.forward(outputs[a - 1], mask_BS, positions_BT, a, b)
        torch.testing.assert_close(got_BTD[mask_BS.bool()], outputs[b - 1][mask_BS.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_moe_span_loads_from_its_own_blocks_tensors(tiny_checkpoints, tmp_path, family):
    """A folder with blocks 2:4 only: their experts are fused from their own tensors, nothing else is read."""
    original = Path(tiny_checkpoints[family])
    tensors = load_file(original / "model.safetensors")
    some = {name: t for name, t in tensors.items() if name.startswith(("model.layers.2.", "model.layers.3."))}
    assert any(".experts.3." in name for name in some)  # one tensor per expert, as transformers saves them
    shutil.copyfile(original / "config.json", tmp_path / "config.json")
    save_file(some, tmp_path / "blocks.safetensors", metadata={"format": "pt"})
    alone = BlockSpan(Checkpoint(tmp_path), 2, 4)
    full = BlockSpan(resolve_checkpoint(original), 2, 4)
    want = full.layers.state_dict()
    assert any(t.ndim == 3 for t in want.values())  # experts fused into 3-D weights
    got = alone.layers.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    # a peer that moves to blocks 1:3 keeps its block 2 and loads block 1 alone
    moved = BlockSpan(resolve_checkpoint(original), 1, 3, reuse=full)
    assert moved.layers[1] is full.layers[0]
    one = BlockSpan(resolve_checkpoint(original), 1, 2).layers[0].state_dict()
    assert all(torch.equal(t, one[name]) for name, t in moved.layers[0].state_dict().items())
    # a block that lacks one expert's tensor is refused with its name, not loaded with a hole
    lacking = next(name for name in some if ".experts.1." in name and name.startswith("model.layers.3."))
    save_file({n: t for n, t in some.items() if n != lacking}, tmp_path / "blocks.safetensors")
    with pytest.raises(ValidationError, match="model.layers.3"):
        BlockSpan(Checkpoint(tmp_path), 2, 4)


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_decode_steps_equal_the_base_model_bit_for_bit(tiny_checkpoints, family):
    span = BlockSpan(resolve_checkpoint(tiny_checkpoints[family]), 0, 3)
    hidden_BTD = torch.randn(1, PREFILL + STEPS, span.hidden_size)
    mask_BS = torch.ones(1, PREFILL + STEPS, dtype=torch.long)
    by_base = decode(span, 1, 3, hidden_BTD, mask_BS, by_base=True)
    torch.testing.assert_close(
        decode(span, 1, 3, hidden_BTD, mask_BS, by_base=False), by_base, atol=0, rtol=0
    )
    assert span._layers_alone == {(1, 3): True}  # these families' steps do take the shortcut
    # a padded sequence needs its mask: it goes through the base model, and is still exact
    mask_BS[0, 1] = 0
    padded = decode(span, 1, 3, hidden_BTD, mask_BS, by_base=True)
    assert not torch.equal(padded, by_base)
    torch.testing.assert_close(decode(span, 1, 3, hidden_BTD, mask_BS, by_base=False), padded, atol=0, rtol=0)


def test_steps_past_the_sliding_window_keep_its_mask(tiny_checkpoints, monkeypatch):
    span = BlockSpan(resolve_checkpoint(tiny_checkpoints["mistral"]), 0, 3)
    hidden_BTD = torch.randn(1, PREFILL + STEPS, span.hidden_size)
    mask_BS = torch.ones(1, PREFILL + STEPS, dtype=torch.long)
    by_base = decode(span, 0, 3, hidden_BTD, mask_BS, by_base=True)
    torch.testing.assert_close(
        decode(span, 0, 3, hidden_BTD, mask_BS, by_base=False), by_base, atol=0, rtol=0
    )
    # control: steps that ignore the window see tokens the window hides, from the first step past it on
    monkeypatch.setattr(span.config, "sliding_window", None)
    ignoring = decode(span, 0, 3, hidden_BTD, mask_BS, by_base=False)
    window = (
        6  # the step at S == window sees what no mask would, but the base model's explicit mask rounds apart
    )
    torch.testing.assert_close(ignoring[:, : window - 1], by_base[:, : window - 1], atol=0, rtol=0)
    assert not torch.allclose(ignoring[:, window:], by_base[:, window:])


def test_a_base_model_that_does_more_than_its_layers_is_kept(tiny_checkpoints):
    span = BlockSpan(resolve_checkpoint(tiny_checkpoints["llama"]), 0, 2)
    # a family whose base model changes its inputs before the layers (as Gemma scales its embeddings)
    span._runner(0, 2).register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] * 2}),
        with_kwargs=True,
    )
    hidden_BTD = torch.randn(1, PREFILL + STEPS, span.hidden_size)
    mask_BS = torch.ones(1, PREFILL + STEPS, dtype=torch.long)
    by_base = decode(span, 0, 2, hidden_BTD, mask_BS, by_base=True)
    torch.testing.assert_close(
        decode(span, 0, 2, hidden_BTD, mask_BS, by_base=False), by_base, atol=0, rtol=0
    )
    assert span._layers_alone == {(0, 2): False}
    # control: without the check, its layers alone would give other outputs
    span._layers_alone[(0, 2)] = True
    assert not torch.allclose(decode(span, 0, 2, hidden_BTD, mask_BS, by_base=False), by_base)


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_a_batched_decode_step_of_several_sessions_equals_their_own_steps(tiny_checkpoints, family):
    """``decode_batch``: sessions of different lengths step together as each would alone (outputs, and the caches
    they go on with); caches with sliding-window layers do not batch (their windows would need masks per layer)."""
    span = BlockSpan(resolve_checkpoint(tiny_checkpoints[family]), 0, 3)
    generator = torch.Generator().manual_seed(0)
    caches, alone = [], []
    with torch.inference_mode():
        for length in (2, 5, 3):
            for copies in (caches, alone):
                copies.append(span.new_cache(1, 3))
            prompt_BTD = torch.randn(1, length, span.hidden_size, generator=generator)
            for cache in (caches[-1], alone[-1]):
                span.forward(
                    prompt_BTD,
                    torch.ones(1, length, dtype=torch.long),
                    torch.arange(length)[None],
                    1,
                    3,
                    cache,
                )
        if not all(BlockSpan.batchable(cache) for cache in caches):
            assert any(getattr(span.config, key, None) for key in ("sliding_window", "use_sliding_window"))
            return
        for _ in range(2):  # a second step goes on from the caches the first left
            lengths = [cache.get_seq_length() for cache in alone]
            hiddens = [torch.randn(1, 1, span.hidden_size, generator=generator) for _ in lengths]
            masks = [torch.ones(1, n + 1, dtype=torch.long) for n in lengths]
            positions = [torch.tensor([[n]]) for n in lengths]
            batched = span.decode_batch(hiddens, masks, positions, caches, 1, 3)
            for i in range(len(lengths)):
                own = span.forward(hiddens[i], masks[i], positions[i], 1, 3, alone[i])
                torch.testing.assert_close(batched[i], own, atol=1e-5, rtol=0)
        for cache, own in zip(caches, alone, strict=True):
            assert cache.get_seq_length() == own.get_seq_length()
            torch.testing.assert_close(cache.layers[-1].keys, own.layers[-1].keys, atol=1e-5, rtol=0)
