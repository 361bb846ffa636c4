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
import logging
from functools import cache

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from swarm_peer.client.remote import RemoteSequential
from swarm_peer.client.routing import Router
from swarm_peer.client.runtime import SwarmRuntime
from swarm_peer.client.session import InferenceSession
from swarm_peer.errors import ValidationError
from swarm_peer.models import Checkpoint, resolve_checkpoint
from swarm_peer.settings import ClientSettings, NetworkSettings

__all__ = ["DistributedModelForCausalLM", "RemoteModel", "RemoteCache"]

logger = logging.getLogger(__name__)

_BLOCK_PREFIX = "model.layers."


class RemoteCache(Cache):
    """What transformers sees of a session's remote KV cache: only its length."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    @property
    def is_compileable(self) -> bool:
        return False


class RemoteModel(nn.Module):
    """Stands in for the family's base model: embeddings -> remote blocks -> final norm."""

    def __init__(self, config, embed_tokens: nn.Module, norm: nn.Module, blocks: RemoteSequential):
        super().__init__()
        self.config = config
        self.embed_tokens, self.norm, self.blocks = embed_tokens, norm, blocks

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = hidden_BTD.shape
        session = past_key_values.session if isinstance(past_key_values, RemoteCache) else None
        if past_key_values is not None and session is None:
            raise ValidationError(
                "a distributed model keeps its cache remotely: use model.inference_session()"
            )
        past = session.position if session is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long)
        elif attention_mask.ndim != 2 or attention_mask.shape != (B, past + T):
            raise ValidationError(
                f"attention_mask must be 2D (batch, past + tokens) = ({B}, {past + T}), got {list(attention_mask.shape)}"
            )
        if position_ids is None:  # as the local base models do
            position_ids = torch.arange(past, past + T).unsqueeze(0)
        attention_mask_BS = attention_mask.long()
        if session is not None:
            hidden_BTD = session.step(hidden_BTD, attention_mask_BS, position_ids)
        else:
            hidden_BTD = self.blocks(hidden_BTD, attention_mask_BS, position_ids)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_BTD), past_key_values=past_key_values
        )


class DistributedModelForCausalLM:
    """Mixin in front of the family's ``*ForCausalLM``; build instances with ``from_pretrained``."""

    swarm: SwarmRuntime
    router: Router
    checkpoint: Checkpoint
    _active_session: InferenceSession | None

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers=(),
        *,
        settings: ClientSettings | None = None,
        runtime: SwarmRuntime | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        """Loads the local parts of ``model`` (a checkpoint dir or ``smollm2``) and connects to the swarm."""
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
        self.router = Router(self.swarm, checkpoint.model_id, checkpoint.num_blocks, self.swarm.settings)
        self._active_session = None
        base = getattr(self, self.base_model_prefix)
        blocks = RemoteSequential(self.swarm, self.router, checkpoint.model_id)
        setattr(self, self.base_model_prefix, RemoteModel(config, base.embed_tokens, base.norm, blocks))
        names = [name for name in checkpoint.tensor_index if not name.startswith(_BLOCK_PREFIX)]
        state = {name: t.to(dtype) for name, t in checkpoint.load_tensors(names).items()}
        self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()
        leftovers = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftovers:
            raise ValidationError(f"checkpoint {checkpoint.path} lacks the client's weights {leftovers[:4]}")
        return self.eval()

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1):
        """Opens a session that ``generate()`` and forward calls inside the ``with`` block continue."""
        session = InferenceSession(
            self.swarm, self.router, self.model_id, max_length=max_length, batch_size=batch_size
        )
        previous, self._active_session = self._active_session, session
        try:
            with session:
                yield session
        finally:
            self._active_session = previous

    def generate(
        self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs
    ):
        session = session or self._active_session
        if kwargs.get("past_key_values") is not None:
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
        if session.position > 0 and session.token_ids is not None:
            seen = session.token_ids
            if input_ids.shape[1] <= seen.shape[1] or not torch.equal(input_ids[:, : seen.shape[1]], seen):
                raise ValidationError(
                    "in a continued session, generate() takes the whole sequence so far: the session's "
                    f"{seen.shape[1]} tokens followed by at least one new token"
                )
        kwargs["past_key_values"] = RemoteCache(session)
        out = super().generate(inputs, *args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        session.token_ids = sequences[:, : session.position].clone()
        return out

    def _max_length(self, prompt_length: int, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            return prompt_length + max_new_tokens
        return max(kwargs.get("max_length") or config.max_length or 0, prompt_length + 1)

    def shutdown(self) -> None:
        """Closes the connection to the swarm (the DHT node and its event loop)."""
        self.swarm.shutdown()


def _causal_lm_class(config_class) -> type[PreTrainedModel]:
    try:
        return AutoModelForCausalLM._model_mapping[config_class]
    except KeyError:
        raise ValidationError(f"transformers has no causal LM for {config_class.__name__}") from None


@cache
def _distributed_class(family: type[PreTrainedModel]) -> type:
    return type(f"Distributed{family.__name__}", (DistributedModelForCausalLM, family), {})
