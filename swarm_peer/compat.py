"""What differs between the transformers 5 releases we support, and the transformers internals we call.

transformers 5.24 renamed the KV cache argument and output field ``past_key_values`` to ``cache``; the old name
still works with a deprecation warning until 5.40. ``CACHE`` is the name the installed release takes, so calls
and outputs use it without warnings on either side of the rename.

``load_converted`` runs transformers' own weight loading (what ``from_pretrained`` runs once it has built the model)
on a part of a checkpoint. That API is internal to transformers and has changed within 5.x (checked against 5.25):
this is the one place that calls it.
"""

from __future__ import annotations

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import LoadStateDictConfig, PreTrainedModel
from transformers.utils.loading_report import LoadStateDictInfo

__all__ = ["CACHE", "load_converted"]

CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def load_converted(
    model: PreTrainedModel, state: dict, dtype: torch.dtype, device: torch.device
) -> LoadStateDictInfo:
    """Loads checkpoint tensors ``state`` (checkpoint names -> tensors or lazy safetensors slices) into ``model``
    (built on the meta device), through the model's weight conversion rules, as ``from_pretrained`` does: renamed,
    and fused where the rules say (e.g. one tensor per expert into 3-D expert weights). Parameters that ``state``
    does not cover stay as they were. Returns what did not fit: missing, unexpected, misshapen, unconvertible."""
    load_config = LoadStateDictConfig(
        device_map={"": str(device)}, dtype=dtype, weight_mapping=get_model_conversion_mapping(model)
    )
    info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    return info
