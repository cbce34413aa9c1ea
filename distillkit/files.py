"""Files: the on-disk cache of prepared artefacts (tokenizers, fine-tuned
models, teacher generations), keyed by a hash of everything that determines
them; the one atomic writer; locks; publishing a finished folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "DISTILLKIT_CACHE_DIR"


def cache_root() -> Path:
    """``$DISTILLKIT_CACHE_DIR``, default ``~/.cache/distillkit``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "distillkit")).expanduser()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def keyed_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by :func:`fingerprint` of ``parts``: the same
    stream in every process, independent of the global RNG."""
    return torch.Generator().manual_seed(int(fingerprint(*parts), 16))


def files_fingerprint(paths: list[Path]) -> str:
    """A short sha256 of the files' names and contents, streamed in 1 MiB
    blocks (it reads every byte: about a second per GB)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into
    place, so a killed writer never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None) -> None:
    """:func:`write_text_atomic` of ``data`` as JSON."""
    write_text_atomic(path, json.dumps(data, indent=indent))


@contextlib.contextmanager
def exclusive(path: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``.NAME.lock`` beside ``path`` (``flock``,
    released when the holder exits or dies), so that two runs never prepare
    the same cached artefact at once; the second waits, then finds it done."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_dir(scratch: Path, target: Path, complete: Callable[[Path], bool] = Path.is_dir) -> None:
    """Move the finished folder ``scratch`` to ``target`` in one rename; an
    incomplete leftover ``target`` is replaced, and when another process
    published a complete one first, theirs is kept."""
    try:
        if target.exists() and not complete(target):
            shutil.rmtree(target)
        scratch.rename(target)
    except OSError:
        if not complete(target):
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
