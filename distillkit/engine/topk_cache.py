"""An append-only on-disk store of the teacher's sparse (top-k) next-token
signal per training sequence, so a KD-style method can read the teacher's
distribution instead of running the teacher.

Storage, in one folder: shards ``shard-NNNNN.safetensors``, each with three
flat tensors over all its rows' positions (N of them):

- ``indices`` (N, k) token ids in the narrowest integer dtype that holds
  ``vocab_size - 1``: torch.uint8 (V <= 256), torch.uint16 (V <= 65536;
  safetensors stores it natively as U16) or torch.int32;
- ``logprobs`` (N, k) float16, clamped to the fp16 range (-inf kept);
- ``tail`` (N,) float32 (it can be tiny, and a KL reads it as a log).

``manifest.json`` ``{"format": 1, "k": k, "vocab_size": V, "shards":
[{"file": "shard-00000.safetensors", "rows": {key: [start, n], ...}}, ...]}``
says which rows each shard holds.  :meth:`TopKCache.add` writes a shard
beside its final name and renames it into place, then rewrites the manifest
atomically, so a killed writer leaves the store as before or after the call;
a shard without a manifest entry is ignored (and overwritten by a later
``add``).  One writer at a time; reads are memory-mapped row slices.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distillkit.errors import DistillkitError
from distillkit.files import write_json_atomic

FORMAT = 1
MANIFEST = "manifest.json"
FP16_MAX = torch.finfo(torch.float16).max

Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def index_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest stored dtype for token ids in ``[0, vocab_size)``."""
    for dtype in (torch.uint8, torch.uint16):
        if vocab_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def to_fp16_range(logprobs: torch.Tensor) -> torch.Tensor:
    """``logprobs`` as float16, finite values clamped to +-65504 (-inf stays -inf, NaN stays NaN)."""
    values = logprobs.float()
    return torch.where(values == -math.inf, values, values.clamp(-FP16_MAX, FP16_MAX)).half()


class TopKCache:
    """A folder of safetensors shards holding, per row key (a str naming one
    training sequence), the teacher's top-k signal at that sequence's scored
    positions: ``indices`` (n, k) token ids, ``logprobs`` (n, k) and ``tail``
    (n,) log-probabilities (see :class:`distillkit.api.TopKSignal`), n the
    number of scored positions of that row (n may be 0)."""

    def __init__(self, folder: Path, *, k: int, vocab_size: int) -> None:
        """Open (create) ``folder``; DistillkitError when its manifest was written for another k or vocab_size."""
        self.folder, self.k, self.vocab_size = Path(folder), k, vocab_size
        self.index_dtype = index_dtype(vocab_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._shards: list[dict] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # key -> (shard number, start, n)
        self._handles: dict[int, safe_open] = {}
        manifest_path = self.folder / MANIFEST
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            stored = (manifest.get("format"), manifest.get("k"), manifest.get("vocab_size"))
            if stored != (FORMAT, k, vocab_size):
                raise DistillkitError(
                    f"top-k cache {self.folder} holds format={stored[0]}, k={stored[1]}, vocab_size={stored[2]}, "
                    f"not format={FORMAT}, k={k}, vocab_size={vocab_size}: use another folder or delete this one"
                )
            for shard in manifest["shards"]:
                self._append_shard(shard)

    def _append_shard(self, shard: dict) -> None:
        number = len(self._shards)
        self._shards.append(shard)
        self._where.update({key: (number, start, n) for key, (start, n) in shard["rows"].items()})

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        """The number of rows stored."""
        return len(self._where)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not stored, in order, without duplicates."""
        return list(dict.fromkeys(key for key in keys if key not in self._where))

    def _check(self, key: str, indices: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor) -> None:
        n = indices.shape[0] if indices.dim() == 2 else -1
        if indices.dim() != 2 or logprobs.shape != indices.shape or tail.shape != (n,):
            raise ValueError(f"top-k row {key!r}: indices {tuple(indices.shape)}, logprobs "
                             f"{tuple(logprobs.shape)} and tail {tuple(tail.shape)} must be (n, k), (n, k) and (n,)")
        if indices.shape[1] != self.k:
            raise ValueError(f"top-k row {key!r} has k={indices.shape[1]}, the cache k={self.k}")
        if indices.is_floating_point():
            raise ValueError(f"top-k row {key!r}: indices must be integers, got {indices.dtype}")
        if indices.numel():
            low, high = int(indices.long().min()), int(indices.long().max())  # min/max lack uint16 kernels
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"top-k row {key!r}: token ids must be in [0, {self.vocab_size}), got [{low}, {high}]")

    def add(self, rows: dict[str, Row]) -> None:
        """Store ``rows`` (key -> (indices (n, k) integer, logprobs (n, k), tail (n,))) not yet stored, in one
        new shard; ValueError naming the row for a bad shape, k or token id.  Writes nothing when all are stored."""
        new = {key: row for key, row in rows.items() if key not in self._where}
        if not new:
            return
        for key, row in new.items():
            self._check(key, *row)
        offsets, start = {}, 0
        for key, (indices, _, _) in new.items():
            offsets[key] = [start, indices.shape[0]]
            start += indices.shape[0]
        tensors = {
            "indices": torch.cat([indices.to(torch.int64) for indices, _, _ in new.values()]).to(self.index_dtype),
            "logprobs": to_fp16_range(torch.cat([logprobs.float() for _, logprobs, _ in new.values()])),
            "tail": torch.cat([tail.float() for _, _, tail in new.values()]),
        }
        shard = {"file": f"shard-{len(self._shards):05d}.safetensors", "rows": offsets}
        path = self.folder / shard["file"]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        manifest = {"format": FORMAT, "k": self.k, "vocab_size": self.vocab_size, "shards": [*self._shards, shard]}
        write_json_atomic(self.folder / MANIFEST, manifest)
        self._append_shard(shard)

    def get(self, key: str) -> Row:
        """(indices int64 (n, k), logprobs float32 (n, k), tail float32 (n,)) of row ``key``, read from a
        memory-mapped shard (only the row's slice); KeyError for an unknown key."""
        if key not in self._where:
            raise KeyError(f"top-k row {key!r} is not in the cache {self.folder}")
        number, start, n = self._where[key]
        if number not in self._handles:
            self._handles[number] = safe_open(str(self.folder / self._shards[number]["file"]), framework="pt")
        handle = self._handles[number]
        indices, logprobs, tail = (handle.get_slice(name)[start : start + n] for name in ("indices", "logprobs", "tail"))
        return indices.to(torch.int64), logprobs.to(torch.float32), tail.to(torch.float32)

    @property
    def bytes_per_position(self) -> int:
        """Stored bytes per scored position: k token ids, k fp16 log-probs and one fp32 tail."""
        return self.k * (self.index_dtype.itemsize + torch.float16.itemsize) + torch.float32.itemsize

    def size_bytes(self) -> int:
        """Bytes of all shards in the manifest, on disk."""
        return sum((self.folder / shard["file"]).stat().st_size for shard in self._shards)
