"""distillkit: plugin-based knowledge distillation for generative language models."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("distillkit")
"""Marker for hook implementations: decorate plugin functions with ``@distillkit.hookimpl``."""

__all__ = ["hookimpl", "__version__"]
