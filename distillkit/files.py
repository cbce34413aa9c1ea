"""Files: the on-disk cache of prepared artefacts (tokenizers, fine-tuned
models, teacher generations), keyed by a hash of everything that determines
them; locks; and the one family of atomic writers, each of which writes
beside its target and renames into place, so a killed writer never leaves a
partial file or folder:

- :func:`write_text_atomic` / :func:`write_json_atomic`: one file;
- :func:`replace_dir` (or :func:`scratch_dir` then :func:`swap_in`, when
  several processes write parts of the folder): a folder that replaces any
  older one (checkpoints, the best model);
- :func:`publish_dir`: a cached folder, of which the first complete one
  published wins (concurrent runs preparing the same artefact)."""

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
    """:func:`write_text_atomic` of ``data`` as JSON (one trailing newline)."""
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def scratch_dir(final: Path, *, clear: bool = True) -> Path:
    """``final.tmp``: the folder a new ``final`` is written into before
    :func:`swap_in`; ``clear`` removes a leftover of a killed writer (in a
    multi-process write, only the process that will swap it in clears it)."""
    scratch = final.with_name(final.name + ".tmp")
    if clear:
        shutil.rmtree(scratch, ignore_errors=True)
    return scratch


def swap_in(scratch: Path, final: Path) -> None:
    """Put the finished folder ``scratch`` in place of ``final`` by renames:
    an older ``final`` is moved aside to ``final.old`` first and deleted
    after, so ``final`` is never a half-written folder."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        scratch.rename(final)
        shutil.rmtree(old)
    else:
        scratch.rename(final)


def replace_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder with ``write(scratch)`` into :func:`scratch_dir`, then
    :func:`swap_in` it for ``final``."""
    scratch = scratch_dir(final)
    write(scratch)
    swap_in(scratch, final)


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
