"""distillkit: plugin-based knowledge distillation for generative language models."""

import pluggy

__version__ = "0.3.0"  # 0.3: the layered package and its plugin API, distillkit.api (issue 14)
ARTEFACTS_VERSION = "0.2.0"
"""Part of the cache keys of prepared models: bump it when a change alters what preparation produces
(0.2: reference-faithful tokenization and sampling, issue 12)."""

hookimpl = pluggy.HookimplMarker("distillkit")
"""Marker for hook implementations: decorate plugin functions with ``@distillkit.hookimpl``."""

__all__ = ["ARTEFACTS_VERSION", "__version__", "hookimpl"]
