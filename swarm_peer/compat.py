"""What differs between the transformers 5 releases we support.

transformers 5.24 renamed the KV cache argument and output field ``past_key_values`` to ``cache``; the old name
still works with a deprecation warning until 5.40. ``CACHE`` is the name the installed release takes, so calls
and outputs use it without warnings on either side of the rename.
"""

from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = ["CACHE"]

CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
