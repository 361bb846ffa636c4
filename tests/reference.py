"""Independent implementations the tests compare ours with."""

from __future__ import annotations

import sys
import types


def byzfl():
    """byzfl 0.0.11 (installed with --no-deps), imported without its benchmark module: that one alone needs
    torchvision, matplotlib and seaborn, and no aggregator or attack uses it."""
    sys.modules.setdefault("byzfl.benchmark", types.ModuleType("byzfl.benchmark"))
    import byzfl as module

    return module
