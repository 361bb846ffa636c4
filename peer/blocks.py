"""A span of a model's transformer blocks, built from the model's own transformers classes.

Shape legend: B batch, T new tokens, S tokens seen including the new ones (past + T), D hidden size.

Only the span's weights are read from the checkpoint (``model.layers.{i}.*``, the tensors the manifest counts as
block i), so memory grows with the span, not the model. They are loaded the way ``from_pretrained`` loads a whole
model: into the family's causal LM built on the meta device, through transformers' own weight conversion rules
(``get_model_conversion_mapping``), which rename tensors and fuse, e.g., a Mixtral's or Qwen2-MoE's one tensor per
expert into the 3-D expert weights its layers hold. Any family with such rules loads without code of its own here.

Nothing here is written per model family: the family's own base model (``LlamaModel``,
``Qwen2Model``, ...) is built on the meta device for a config cut down to the span, its embeddings dropped, its
final norm replaced by the identity, its layers replaced by the real blocks. Its own ``forward`` then builds the
causal / sliding-window masks and rotary embeddings exactly as the full model does, which is what makes the
swarm's outputs equal local transformers' outputs.

Blocks are constructed with their global index and the full config (so per-layer structure such as sliding
attention is right), then every ``layer_idx`` attribute is renumbered from 0 within the sub-span being run, so
that a KV cache made for that sub-span (``DynamicCache`` of the cut-down config) lines up with it. The modules that
carry a ``layer_idx`` are listed once per sub-span, so a decode step sets a few attributes instead of walking every
module. Compute runs on one thread at a time (``BlockHandlers._compute`` in peer.handlers), which keeps that renumbering
race-free.

A decode step of one sequence without padding, as in plain generation, needs no mask (every new token sees the
whole cache) and then the base model adds only Python work around its layers: building and checking a mask it
drops, output classes, decorators. Such steps call the layers directly, with the rotary embeddings of the base
model. Whether that gives the base model's output bit for bit is checked once per sub-span, on random inputs,
before it is used (a family whose base model does more falls back to it); sliding-window attention takes the
shortcut only while the sequence fits in the window.
"""

from __future__ import annotations

import copy
import logging
from functools import cached_property

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from swarm_peer.compat import CACHE, load_converted
from swarm_peer.errors import ValidationError
from swarm_peer.manifest import split_block_name
from swarm_peer.models import Checkpoint, attention_shape
from swarm_peer.peer import adapters as _adapters
from swarm_peer.protocols.extras import Lora

__all__ = ["BlockSpan", "DTYPES"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BlockSpan:
    """Blocks ``[start, end)`` of a checkpoint, runnable as any sub-span ``[a, b)`` inside them."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        start: int,
        end: int,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        reuse: BlockSpan | None = None,
        adapters: tuple[str, ...] = (),
        progress: bool = False,
    ):
        """Loads blocks [start, end); those that ``reuse`` (a span of the same weights) holds are shared, not read.

        ``adapters`` are PEFT LoRA folders (``PATH`` or ``NAME=PATH``) served with the blocks: their weights for
        this span are kept in ``self.adapters[name]`` (None when an adapter has none for these blocks). ``progress``:
        a progress bar of the blocks loaded, on stderr (while it is a terminal).
        """
        num_blocks = checkpoint.num_blocks
        if not 0 <= start < end <= num_blocks:
            raise ValidationError(f"blocks {start}:{end} are not inside the model's 0:{num_blocks}")
        if dtype not in DTYPES:
            raise ValidationError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.checkpoint, self.start, self.end = checkpoint, start, end
        self.dtype_name, self.dtype, self.device = dtype, DTYPES[dtype], torch.device(device)
        self.config = copy.deepcopy(checkpoint.config)
        self.config._attn_implementation = "sdpa"
        reused = {
            i: reuse.layers[i - reuse.start]
            for i in range(start, end)
            if reuse and reuse.start <= i < reuse.end
        }
        loaded = self._load_layers([i for i in range(start, end) if i not in reused], progress)
        self.layers = nn.ModuleList({**reused, **loaded}[i] for i in range(start, end)).requires_grad_(False)
        self._runners: dict[tuple[int, int], nn.Module] = {}
        # per sub-span: (module, its layer_idx within the sub-span) for every module that has a layer_idx
        self._numbering: dict[tuple[int, int], list[tuple[nn.Module, int]]] = {}
        # per sub-span: whether its layers alone decode exactly as its base model (``_layers_suffice``)
        self._layers_alone: dict[tuple[int, int], bool] = {}
        self.adapters: dict[str, Lora | None] = {}
        for spec in adapters:
            name, path = _adapters.adapter_name(spec)
            if name in self.adapters:
                raise ValidationError(f"two adapters are named {name!r}")
            self.adapters[name] = _adapters.load_served(path, self.layers_of(start, end), self.dtype)

    def layers_of(self, a: int, b: int) -> dict[int, nn.Module]:
        """Global block index -> layer, for blocks [a, b) of this span."""
        return {i: self.layers[i - self.start] for i in range(a, b)}

    @cached_property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @cached_property
    def max_positions(self) -> int:
        """Position ids must lie below this (the model's ``max_position_embeddings``, else 2**20)."""
        return int(getattr(self.config, "max_position_embeddings", None) or 2**20)

    def _load_layers(self, indices: list[int], progress: bool = False) -> dict[int, nn.Module]:
        """Blocks ``indices`` (global), loaded as ``from_pretrained`` loads the whole model, from their tensors only.

        The family's causal LM is built on the meta device (which also settles the config's attention and experts
        implementations, as for a local model), and the blocks' checkpoint tensors go through transformers' weight
        conversion into it; its other parts stay on meta and are dropped. Raises ``ValidationError`` for a block
        whose weights are missing, unexpected, of the wrong shape, or fail to convert.
        """
        if not indices:
            return {}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        layers = getattr(model, model.base_model_prefix).layers
        names: dict[int, list[str]] = {i: [] for i in indices}
        for name in self.checkpoint.tensor_index:
            if (split := split_block_name(name)) is not None and split[0] in names:
                names[split[0]].append(name)
        where = f"checkpoint {self.checkpoint.path}"
        absent = [i for i in indices if not names[i]]
        if absent:
            raise ValidationError(f"{where} has no weights for blocks {absent}")
        # block by block, so that a progress bar can count them (the conversion rules never span two blocks)
        bar = tqdm(
            indices,
            desc=f"loading blocks {self.start}:{self.end}",
            unit="block",
            disable=None if progress else True,
        )
        for i in bar:
            self._load_block(model, layers, i, names[i], where)
        return {i: layers[i].eval() for i in indices}

    def _load_block(self, model, layers: nn.ModuleList, i: int, names: list[str], where: str) -> None:
        """Loads block ``i``'s checkpoint tensors ``names`` into ``model``; ``ValidationError`` if they do not fit."""
        with self.checkpoint.open_tensors(names) as state:
            info = load_converted(model, state, self.dtype, self.device)
        if info.conversion_errors:
            name, error = next(iter(sorted(info.conversion_errors.items())))
            raise ValidationError(
                f"{where}: the tensors of {name} do not convert: {' '.join(error.strip().splitlines()[-2:])}"
            )
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys)[0]
            raise ValidationError(f"{where}: {name} has shape {list(got)}, the model wants {list(want)}")
        if info.unexpected_keys:
            raise ValidationError(f"{where}: unexpected weights {sorted(info.unexpected_keys)[:4]}")
        # Whatever the checkpoint did not fill (weights, or buffers it does not store) would stay on meta.
        missing = [
            f"{model.base_model_prefix}.layers.{i}.{name}"
            for name, t in [*layers[i].named_parameters(), *layers[i].named_buffers()]
            if t.is_meta
        ]
        if missing:
            raise ValidationError(f"{where}: missing weights {missing[:4]}")

    def span_config(self, a: int, b: int):
        """The config cut down to global blocks ``[a, b)``: what a session's ``DynamicCache`` is built from."""
        return _span_config(self.config, a, b)

    def new_cache(self, a: int, b: int) -> DynamicCache:
        return DynamicCache(config=self.span_config(a, b))

    def cache_bytes_per_token(self, a: int, b: int) -> int:
        """Bytes that one token of one sequence adds to a ``new_cache(a, b)``: a key and a value per block."""
        _, kv_heads, head_dim = attention_shape(self.config)
        return (b - a) * 2 * kv_heads * head_dim * self.dtype.itemsize

    def _runner(self, a: int, b: int) -> nn.Module:
        """The family's base model for global blocks ``[a, b)``, wrapping the shared real layers."""
        if (a, b) not in self._runners:
            config = self.span_config(a, b)
            with torch.device("meta"):
                base = AutoModel.from_config(config)
            base.embed_tokens = None
            base.norm = nn.Identity()
            with self.device:
                base.rotary_emb = type(base.rotary_emb)(config=config)
            base.layers = nn.ModuleList(self.layers[a - self.start : b - self.start])
            leftovers = [n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta]
            assert not leftovers, f"tensors left on the meta device: {leftovers}"
            self._runners[(a, b)] = base.eval()
            self._numbering[(a, b)] = [
                (module, local)
                for local, layer in enumerate(base.layers)
                for module in layer.modules()
                if hasattr(module, "layer_idx")
            ]
        return self._runners[(a, b)]

    def forward(
        self,
        hidden_BTD: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        position_ids_BT: torch.Tensor,
        a: int,
        b: int,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Runs global blocks ``[a, b)``. With a cache, appends this step's keys/values to it."""
        runner = self._runner(a, b)
        # the layers may be shared with other sub-spans (and with another span, after a move)
        for module, local in self._numbering[(a, b)]:
            module.layer_idx = local
        if hidden_BTD.device != self.device or hidden_BTD.dtype != self.dtype:
            hidden_BTD = hidden_BTD.to(self.device, self.dtype)
        if position_ids_BT.device != self.device:
            position_ids_BT = position_ids_BT.to(self.device)
        if (
            cache is not None
            and self._needs_no_mask(hidden_BTD, attention_mask_BS)
            and self._layers_suffice(a, b)
        ):
            return _run_layers(runner, hidden_BTD, position_ids_BT, cache)
        out = runner(
            inputs_embeds=hidden_BTD,
            attention_mask=attention_mask_BS.to(self.device),
            position_ids=position_ids_BT,
            use_cache=cache is not None,
            **{CACHE: cache},
        )
        return out.last_hidden_state

    @staticmethod
    def batchable(cache: DynamicCache) -> bool:
        """Whether a session's cache can join a batched decode step (``decode_batch``): plain growing layers, past
        its first token."""
        return cache.get_seq_length() > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)

    def decode_batch(
        self,
        hiddens: list[torch.Tensor],
        masks: list[torch.Tensor],
        positions: list[torch.Tensor],
        caches: list[DynamicCache],
        a: int,
        b: int,
    ) -> list[torch.Tensor]:
        """One single-token step of several sessions (each ``hidden_1TD`` with T = 1, its ``mask_1S`` and
        ``positions_1T``, its own ``batchable`` cache) as one forward of blocks ``[a, b)``: the weights are read once
        for all. Their caches are left-padded to the longest into one batch (the padding masked out), and each
        session's cache then gets its step's keys and values, as its own step would have added them."""
        N = len(hiddens)
        lengths = [cache.get_seq_length() for cache in caches]
        S = max(lengths)
        batch = self.new_cache(a, b)
        for index in range(b - a):
            layers = [cache.layers[index] for cache in caches]
            keys = torch.cat([_left_pad(layer.keys, S) for layer in layers])
            batch.update(keys, torch.cat([_left_pad(layer.values, S) for layer in layers]), index)
        mask_NS = torch.zeros(N, S + 1, dtype=torch.long)
        for i, (mask, length) in enumerate(zip(masks, lengths, strict=True)):
            mask_NS[i, S - length :] = mask[0].to(torch.long)
        out_NTD = self.forward(torch.cat(hiddens), mask_NS, torch.cat(positions), a, b, batch)
        for index in range(b - a):
            layer = batch.layers[index]
            for i, cache in enumerate(caches):
                cache.update(layer.keys[i : i + 1, :, -1:], layer.values[i : i + 1, :, -1:], index)
        return list(out_NTD.split(1))

    def _needs_no_mask(self, hidden_BTD: torch.Tensor, attention_mask_BS: torch.Tensor) -> bool:
        """True for one new token of one unpadded sequence that fits the sliding window (if any; a window of 0, as
        Qwen2-MoE configs have without one, is none): it attends to every cached token, so the base model would pass
        no mask to the layers."""
        B, T, _ = hidden_BTD.shape
        S = attention_mask_BS.shape[1]
        window = getattr(self.config, "sliding_window", None)
        return B == 1 and T == 1 and (not window or S < window) and bool(attention_mask_BS.all())

    def _layers_suffice(self, a: int, b: int) -> bool:
        """Whether blocks ``[a, b)`` run alone (``_run_layers``) decode exactly as their base model does: checked once,
        bit for bit, on a 1-token step after a random 2-token prefill."""
        if (a, b) not in self._layers_alone:
            try:
                with torch.inference_mode():
                    by_base, alone = self._probe_step(a, b, alone=False), self._probe_step(a, b, alone=True)
                same = isinstance(alone, torch.Tensor) and torch.equal(by_base, alone)
            except Exception:  # a layer that cannot run without its base model
                logger.debug("Blocks %d:%d cannot run alone", a, b, exc_info=True)
                same = False
            if not same:
                logger.info(
                    "Blocks %d:%d decode through their base model: run alone, they differ from it", a, b
                )
            self._layers_alone[(a, b)] = same
        return self._layers_alone[(a, b)]

    def _probe_step(self, a: int, b: int, alone: bool) -> torch.Tensor:
        """A 1-token step after a random 2-token prefill, in a fresh cache: by the base model, or by the layers alone."""
        runner, cache = self._runners[(a, b)], self.new_cache(a, b)
        hidden_BTD = torch.randn(1, 3, self.hidden_size, generator=torch.Generator().manual_seed(0))
        hidden_BTD = hidden_BTD.to(self.device, self.dtype)
        positions_BT = torch.arange(3, device=self.device)[None]

        def by_base(start: int, end: int) -> torch.Tensor:
            mask_BS = torch.ones(1, end, dtype=torch.long, device=self.device)
            kwargs = dict(inputs_embeds=hidden_BTD[:, start:end], position_ids=positions_BT[:, start:end])
            return runner(
                **kwargs, attention_mask=mask_BS, use_cache=True, **{CACHE: cache}
            ).last_hidden_state

        by_base(0, 2)
        return _run_layers(runner, hidden_BTD[:, 2:], positions_BT[:, 2:], cache) if alone else by_base(2, 3)


def _run_layers(runner: nn.Module, hidden_BTD, position_ids_BT, cache: DynamicCache) -> torch.Tensor:
    """The runner's layers on a step that needs no attention mask, with the runner's rotary embeddings."""
    embeddings = runner.rotary_emb(hidden_BTD, position_ids=position_ids_BT)
    for layer in runner.layers:
        hidden_BTD = layer(
            hidden_BTD,
            attention_mask=None,
            position_embeddings=embeddings,
            position_ids=position_ids_BT,
            use_cache=True,
            **{CACHE: cache},
        )
    return hidden_BTD


def _left_pad(t_1HSD: torch.Tensor, S: int) -> torch.Tensor:
    """Keys or values of one sequence, zeros before them up to ``S`` positions."""
    return torch.nn.functional.pad(t_1HSD, (0, 0, S - t_1HSD.shape[-2], 0))


def _span_config(config, a: int, b: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = b - a
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[a:b])
    return config
