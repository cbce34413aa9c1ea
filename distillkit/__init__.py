"""distillkit: plugin-based knowledge distillation for generative language models."""

import pluggy

__version__ = "0.2.0"  # 0.2: reference-faithful tokenization and sampling (issue 12); part of cache keys

hookimpl = pluggy.HookimplMarker("distillkit")
"""Marker for hook implementations: decorate plugin functions with ``@distillkit.hookimpl``."""

__all__ = ["hookimpl", "__version__"]
