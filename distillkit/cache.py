"""The on-disk cache of prepared artefacts (tokenizers, fine-tuned models,
teacher generations), keyed by a hash of everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "DISTILLKIT_CACHE_DIR"


def cache_root() -> Path:
    """``$DISTILLKIT_CACHE_DIR``, default ``~/.cache/distillkit``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "distillkit")).expanduser()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
