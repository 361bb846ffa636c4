"""``DistributedModelForCausalLM``: a transformers causal LM whose blocks live in the swarm.

Shape legend: B batch, T new tokens, S tokens seen including the new ones, D hidden size, V vocabulary.

The client holds the embeddings, the final norm and the LM head; the blocks are a ``RemoteSequential``. The
returned object is an instance of the family's own ``*ForCausalLM`` class (``LlamaForCausalLM``, ...) with its
base model swapped for ``RemoteModel``, so ``generate()`` works unchanged: greedy, sampling, top-k/top-p,
repetition penalty, streamers, batched prompts with attention masks.

Generation runs in an inference session: ``generate()`` opens one for the call, or continues the one opened
with ``model.inference_session(...)``. A session's remote KV cache is seen by transformers as a ``RemoteCache``
of length ``session.position``; as with any transformers cache, later ``generate()`` calls in the same session pass
the whole sequence so far (the session's tokens plus new ones) and only the unseen suffix is sent.

>>> model = DistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=[maddr])
>>> out = model.generate(input_ids, max_new_tokens=40)
>>> with model.inference_session(max_length=128) as session:
...     out = model.generate(input_ids, max_new_tokens=8)
...     out = model.generate(torch.cat([out, more_ids], dim=1), max_new_tokens=8)  # continues, no recompute
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from functools import cache

import torch
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from swarm_peer.client.lora import RemoteLora, block_linears
from swarm_peer.client.prompts import PromptTuning
from swarm_peer.client.remote import CallExtras, RemoteSequential
from swarm_peer.client.routing import Router
from swarm_peer.client.session import InferenceSession
from swarm_peer.client.stages import RemoteStages
from swarm_peer.compat import CACHE
from swarm_peer.dht import run_model_id
from swarm_peer.errors import ValidationError
from swarm_peer.models import Checkpoint, resolve_checkpoint
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings, NetworkSettings
from swarm_peer.threads import cached_fastest_threads, compute_threads

__all__ = ["DistributedModelForCausalLM", "RemoteModel", "RemoteCache"]

logger = logging.getLogger(__name__)

_BLOCK_PREFIX = "model.layers."


class RemoteCache(Cache):
    """What transformers sees of a session's remote KV cache: only its length."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.prefix_tokens

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens from the session (``InferenceSession.rollback``): assisted
        generation (``generate(prompt_lookup_num_tokens=k)`` or ``assistant_model=draft``) keeps the accepted
        prefix of the tokens it proposed, and every hop drops the rest from its cache."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of tokens to remove, not {tokens_to_remove}")
        if tokens_to_remove:
            self.session.rollback(self.session.position + tokens_to_remove)

    @property
    def is_linear(self) -> list[bool]:
        # attention layers, not state-space ones: generate() (transformers >= 5.24) then sends only unseen tokens
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False


class RemoteModel(nn.Module):
    """Stands in for the family's base model: [prompts +] embeddings -> remote blocks -> final norm.

    It returns the base model's own output class (``output_class``): a mixture of experts' causal LM reads its
    ``router_logits`` field, which stays None here (the routers run on the peers).

    With prompt tuning (``self.prompts``), the P trained prompt embeddings go before the sequence (on the first
    step of a session), the attention mask and positions grow by P, and the outputs of the prompt tokens are cut
    off again, so callers see hidden states for their own tokens only.
    """

    def __init__(
        self,
        config,
        embed_tokens: nn.Module,
        norm: nn.Module,
        blocks: RemoteSequential,
        output_class: type[ModelOutput] = BaseModelOutputWithPast,
    ):
        super().__init__()
        self.config = config
        self.embed_tokens, self.norm, self.blocks = embed_tokens, norm, blocks
        self.output_class = output_class
        self.prompts: PromptTuning | None = None

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def deep_prompts(self, batch_size: int = 1) -> torch.Tensor | None:
        """The deep prompts as the blocks take them: (N, batch, P, D), or None."""
        if self.prompts is None or self.prompts.deep_NPD is None:
            return None
        deep_NPD = self.prompts.deep_NPD
        return deep_NPD.unsqueeze(1).expand(-1, batch_size, -1, -1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ModelOutput:
        past_key_values: Cache | None = kwargs.get(CACHE)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = hidden_BTD.shape
        session = past_key_values.session if isinstance(past_key_values, RemoteCache) else None
        if past_key_values is not None and session is None:
            raise ValidationError(
                "a distributed model keeps its cache remotely: use model.inference_session()"
            )
        P = 0 if self.prompts is None else self.prompts.num_tokens
        past = session.position if session is not None else 0
        if session is not None and past > 0 and session.prefix_tokens != P:
            raise ValidationError("prompts cannot be added to or removed from a session that has started")
        seen = past - P if past else 0  # the caller's own tokens already in the session
        if attention_mask is None:
            attention_mask = torch.ones(B, seen + T, dtype=torch.long)
        elif attention_mask.ndim != 2 or attention_mask.shape != (B, seen + T):
            raise ValidationError(
                f"attention_mask must be 2D (batch, past + tokens) = ({B}, {seen + T}), got {list(attention_mask.shape)}"
            )
        if position_ids is None:  # as the local base models do
            position_ids = torch.arange(seen, seen + T).unsqueeze(0)
        attention_mask_BS = attention_mask.long()
        prepend = P > 0 and past == 0
        if P:
            attention_mask_BS = torch.cat([torch.ones(B, P, dtype=torch.long), attention_mask_BS], dim=1)
            position_ids = position_ids + P
        if prepend:
            prompts_BPD = self.prompts.prompts_PD.to(hidden_BTD.dtype).expand(B, -1, -1)
            hidden_BTD = torch.cat([prompts_BPD, hidden_BTD], dim=1)
            position_ids = torch.cat([torch.arange(P).expand(position_ids.shape[0], P), position_ids], dim=1)
        if session is not None:
            session.prefix_tokens = P
            hidden_BTD = session.step(hidden_BTD, attention_mask_BS, position_ids)
        else:
            hidden_BTD = self.blocks(hidden_BTD, attention_mask_BS, position_ids, self.deep_prompts(B))
        if prepend:
            hidden_BTD = hidden_BTD[:, P:]
        return self.output_class(last_hidden_state=self.norm(hidden_BTD), **{CACHE: past_key_values})


class DistributedModelForCausalLM:
    """Mixin in front of the family's ``*ForCausalLM``; build instances with ``from_pretrained``."""

    swarm: SwarmRuntime
    router: Router
    checkpoint: Checkpoint
    _sessions: threading.local  # .active: the session that generate() continues in this thread
    _decode_threads: int

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers=(),
        *,
        settings: ClientSettings | None = None,
        runtime: SwarmRuntime | None = None,
        dtype: torch.dtype = torch.float32,
        adapter: str = "",
        run_id: str | None = None,
        compression: str = "none",
    ):
        """Loads the local parts of ``model`` and connects to the swarm of its model id (its manifest's fingerprint).

        ``model``: a checkpoint dir, a folder written by ``swarm-peer export-client`` (manifest, config, tokenizer,
        embeddings and head: no block), or ``smollm2``. Raises ``ValidationError`` if the folder's files do not
        match its manifest or lack a part the client needs.

        ``adapter``: the name of a LoRA adapter that peers serve (``swarm-peer join --adapters``); routes then go
        only through peers that serve it, and they apply it.

        ``run_id``: a SWARM training run instead: the blocks are the run's trainable stages (``RemoteStages``; the
        peers of ``swarm-peer join --train``), this model's own parameters the embeddings, final norm and head
        that its trainer trains; ``compression``: the codec of the hidden states and gradients sent to them.
        """
        checkpoint = resolve_checkpoint(model)
        config = checkpoint.config
        config._attn_implementation = "sdpa"
        family = _causal_lm_class(type(config))
        with torch.device("meta"):
            self = _distributed_class(family)(config)
        if settings is None:
            settings = ClientSettings(
                network=NetworkSettings(initial_peers=tuple(initial_peers), client_mode=True)
            )
        self.swarm = runtime or SwarmRuntime(settings)
        self.checkpoint = checkpoint
        model_id = checkpoint.model_id if run_id is None else run_model_id(run_id)
        self.router = Router(
            self.swarm, model_id, checkpoint.num_blocks, self.swarm.settings, adapter=adapter
        )
        self._sessions = threading.local()
        base = getattr(self, self.base_model_prefix)
        self._block_linears = block_linears(base.layers)
        if run_id is None:
            blocks = RemoteSequential(self.swarm, self.router, model_id)
        else:
            blocks = RemoteStages(self.swarm, model_id, checkpoint.num_blocks, compression=compression)
        remote = RemoteModel(config, base.embed_tokens, base.norm, blocks, _output_class(type(base)))
        setattr(self, self.base_model_prefix, remote)
        names = [name for name in checkpoint.tensor_index if not name.startswith(_BLOCK_PREFIX)]
        state = {name: t.to(dtype) for name, t in checkpoint.load_tensors(names).items()}
        self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()
        leftovers = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftovers:
            raise ValidationError(f"checkpoint {checkpoint.path} lacks the client's weights {leftovers[:4]}")
        self.eval()
        self._decode_threads = self._measure_decode_threads()
        return self

    def _measure_decode_threads(self) -> int:
        """CPU threads for the client's share of a decode step (final norm and LM head of one token):
        ``ClientSettings.compute_threads``, or the fastest, cached per model and dtype (``swarm_peer.threads``)."""
        head = self.get_output_embeddings()
        if head.weight.device.type != "cpu":
            return torch.get_num_threads()
        if self.swarm.settings.compute_threads:
            return self.swarm.settings.compute_threads
        x_BTD = torch.randn(1, 1, self.config.hidden_size, dtype=head.weight.dtype)
        name = f"head|{self.checkpoint.model_id}|{str(head.weight.dtype).removeprefix('torch.')}"
        return cached_fastest_threads(name, lambda: head(self.remote.norm(x_BTD)))

    @property
    def _active_session(self) -> InferenceSession | None:
        """The session opened by ``inference_session`` in this thread: each thread generates in its own."""
        return getattr(self._sessions, "active", None)

    @property
    def model_id(self) -> str:
        """The id the blocks' records are keyed by: the checkpoint's fingerprint, or the run's (``run_id``)."""
        return self.router.model_id

    @property
    def remote(self) -> RemoteModel:
        return getattr(self, self.base_model_prefix)

    @property
    def lora(self) -> RemoteLora | None:
        """The client's own LoRA weights for the remote blocks (``add_lora`` / ``load_lora``), or None."""
        return self.remote.blocks.lora

    @property
    def prompts(self) -> PromptTuning | None:
        """The trainable prompts (``add_prompts`` / ``load_prompts``), or None."""
        return self.remote.prompts

    def add_lora(self, config: LoraConfig) -> RemoteLora:
        """Gives the remote blocks trainable LoRA weights held by this client (PEFT's initialization)."""
        self.remote.blocks.lora = RemoteLora(config, self._block_linears)
        return self.lora

    def load_lora(self, path: str) -> RemoteLora:
        """Loads a PEFT LoRA folder as this client's own (trainable) LoRA weights."""
        self.remote.blocks.lora = RemoteLora.from_pretrained(path, self._block_linears)
        return self.lora

    def add_prompts(self, num_tokens: int, deep: bool = False) -> PromptTuning:
        """Trainable prompt embeddings (and, with ``deep``, per-block deep prompts added inside the peers)."""
        self.remote.prompts = PromptTuning(
            num_tokens,
            self.config.hidden_size,
            self.checkpoint.num_blocks,
            deep=deep,
            init_std=getattr(self.config, "initializer_range", 0.02),
        )
        return self.prompts

    def load_prompts(self, path: str) -> PromptTuning:
        self.remote.prompts = PromptTuning.from_pretrained(
            path, self.config.hidden_size, self.checkpoint.num_blocks
        )
        return self.prompts

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1):
        """Opens a session that ``generate()`` and forward calls inside the ``with`` block continue (in this thread;
        other threads generating with the same model use sessions of their own)."""
        P = 0 if self.prompts is None else self.prompts.num_tokens
        deep = self.remote.deep_prompts()
        session = InferenceSession(
            self.swarm,
            self.router,
            self.model_id,
            max_length=max_length + P,
            batch_size=batch_size,
            extras_for=_session_extras(self.remote.blocks, None if deep is None else deep.detach()),
        )
        previous = self._active_session
        self._sessions.active = session
        try:
            with session:
                yield session
        finally:
            self._sessions.active = previous

    def generate(
        self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs
    ):
        session = session or self._active_session
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            raise ValidationError(
                "a distributed model keeps its cache remotely: use model.inference_session()"
            )
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValidationError("generate() needs input_ids")
        if session is None:
            max_length = self._max_length(input_ids.shape[1], kwargs)
            with self.inference_session(max_length=max_length, batch_size=input_ids.shape[0]) as session:
                return self.generate(inputs, *args, session=session, **kwargs)
        if session.position > session.prefix_tokens and session.token_ids is not None:
            seen = session.token_ids
            if input_ids.shape[1] <= seen.shape[1] or not torch.equal(input_ids[:, : seen.shape[1]], seen):
                raise ValidationError(
                    "in a continued session, generate() takes the whole sequence so far: the session's "
                    f"{seen.shape[1]} tokens followed by at least one new token"
                )
        kwargs[CACHE] = RemoteCache(session)
        # generate() computes logits for the last token only: matrix-vector sized, like a peer's decode step
        with compute_threads(self._decode_threads):
            out = super().generate(inputs, *args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        session.token_ids = sequences[:, : session.position - session.prefix_tokens].clone()
        return out

    def _max_length(self, prompt_length: int, kwargs: dict) -> int:
        """The session's length for ``generate(**kwargs)``: the prompt and the new tokens, and room for the last
        draft that assisted generation verifies past them (then rolls back)."""
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            length = prompt_length + max_new_tokens
        else:
            length = max(kwargs.get("max_length") or config.max_length or 0, prompt_length + 1)
        if kwargs.get("prompt_lookup_num_tokens"):
            length += kwargs["prompt_lookup_num_tokens"] + 1
        elif kwargs.get("assistant_model") is not None:
            length += int(kwargs.get("num_assistant_tokens") or config.num_assistant_tokens or 0) + 1
        return length

    def shutdown(self) -> None:
        """Closes the connection to the swarm (the DHT node and its event loop)."""
        self.swarm.shutdown()


def _session_extras(blocks: RemoteSequential, deep_prompts_NBPD: torch.Tensor | None):
    """What each hop of a session applies: a snapshot of the adapter, the LoRA and the deep prompts now."""
    call = CallExtras(blocks, deep_prompts_NBPD)
    return call.extras


def _causal_lm_class(config_class) -> type[PreTrainedModel]:
    try:
        return AutoModelForCausalLM._model_mapping[config_class]
    except KeyError:
        raise ValidationError(f"transformers has no causal LM for {config_class.__name__}") from None


def _output_class(base_class: type[PreTrainedModel]) -> type[ModelOutput]:
    """The output class that the family's base model declares (``MoeModelOutputWithPast`` for Mixtral, ...)."""
    declared = inspect.signature(base_class.forward).return_annotation
    is_output = isinstance(declared, type) and issubclass(declared, ModelOutput)
    return declared if is_output else BaseModelOutputWithPast


@cache
def _distributed_class(family: type[PreTrainedModel]) -> type:
    return type(f"Distributed{family.__name__}", (DistributedModelForCausalLM, family), {})
