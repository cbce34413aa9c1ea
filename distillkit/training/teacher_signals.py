"""The teacher's top-k signal over a source's fixed sequences
(``[teacher_signal] top_k``): computed once before training, cached in a
:class:`~distillkit.engine.topk_cache.TopKCache`, and attached to every
batch for :meth:`~distillkit.api.StepContext.teacher_signal`.

A cached row is named by its content (the sequence's token ids and where its
response starts), so any run on the same teacher, adapter, vocabulary and k
finds the rows it shares with earlier runs: a second student or method
computes nothing, and a killed fill resumes where it stopped.  The cache
folder is keyed by the teacher checkpoint, its spec, the adapter and its
options, the vocabulary size and k (the token ids stand for the data,
template, tokenizer and lengths).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.progress import Progress

from distillkit.api import PseudoTargetSource, TopKSignal, TrainBatch
from distillkit.engine.losses import log_rest
from distillkit.engine.topk_cache import TopKCache
from distillkit.errors import DistillkitError
from distillkit.files import cache_root, exclusive, fingerprint
from distillkit.registry import registry
from distillkit.training.batches import micro_chunks
from distillkit.training.run import Run

log = logging.getLogger(__name__)

CACHE_FORMAT = "topk-1"
ROWS_PER_SHARD = 2048  # rows computed between two shard writes: what a killed fill recomputes at most


def row_keys(batch: TrainBatch) -> list[str]:
    """The content key of each row: its token ids and where its response starts."""
    keys = []
    for ids, attention, response in zip(batch.input_ids, batch.attention_mask, batch.response_mask):
        length, start = int(attention.sum()), int(response.int().argmax())
        digest = hashlib.sha256(ids[:length].to(torch.int32).numpy().tobytes() + start.to_bytes(4, "little"))
        keys.append(digest.hexdigest()[:32])
    return keys


def cache_folder(run: Run, adapter_options: dict[str, object], k: int) -> Path:
    """Where the top-k signals of this run's teacher live."""
    method = registry().methods[run.config.method]
    key = fingerprint(run.teacher_id, run.config.recipe.teacher.identity(), method.teacher_adapter, adapter_options,
                      run.vocab_size, k, CACHE_FORMAT)
    return cache_root() / "teacher_signals" / key


class TeacherSignals:
    """Attaches the cached top-k signal of each batch row (see the module docstring)."""

    def __init__(self, cache: TopKCache, source_name: str) -> None:
        self.cache, self.source_name = cache, source_name

    def attach(self, batch: TrainBatch) -> TrainBatch:
        """``batch`` with ``teacher_signal`` set: (B, T-1, k) at its label positions."""
        rows, width = batch.input_ids.shape[0], batch.input_ids.shape[1] - 1
        k = self.cache.k
        indices = torch.zeros(rows, width, k, dtype=torch.long)
        logprobs = torch.zeros(rows, width, k)
        tail = torch.zeros(rows, width)
        for row, key in enumerate(row_keys(batch)):
            if key not in self.cache:
                raise DistillkitError(f"a batch row of source '{self.source_name}' is not in the top-k teacher "
                                      f"cache {self.cache.folder}: the source's fixed view does not match its "
                                      "batches; report this as a bug of that source")
            positions = batch.label_mask[row].nonzero().squeeze(-1)
            indices[row, positions], logprobs[row, positions], tail[row, positions] = self.cache.get(key)
        batch.teacher_signal = TopKSignal(indices, logprobs, tail)
        return batch


def top_k_rows(run: Run, batch: TrainBatch, k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The teacher's top-k signal of each row at its label positions, on the CPU."""
    with torch.no_grad():
        logp = torch.log_softmax(run.teacher_response_logits(batch).materialize().float(), dim=-1)
        values, indices = logp.topk(k, dim=-1)
        tail = log_rest(logp, indices).squeeze(-1)
    counts = batch.label_mask.sum(-1).tolist()
    return list(zip(indices.cpu().split(counts), values.cpu().split(counts), tail.cpu().split(counts)))


def prepare_teacher_signals(run: Run, accelerator: Accelerator, progress: Progress) -> TeacherSignals | None:
    """The run's teacher signals (None: ``top_k = 0``, or an alignment, whose
    signal is computed online), filling the cache
    first with the rows of the source's fixed view that it lacks; each
    process computes its share and the main process writes them.  The run
    assembly has checked the method and its source
    (:func:`~distillkit.config.assembly.check_teacher_signal`)."""
    k = run.config.recipe.teacher_signal.top_k
    method = registry().methods[run.config.method]
    if k == 0 or not method.reads_teacher_signal or run.aligner is not None:  # e.g. the SFT preparation of a model
        return None
    if k > run.vocab_size:
        raise DistillkitError(f"teacher_signal.top_k is {k}, more than the vocabulary ({run.vocab_size} tokens)")
    if run.teacher.trainable_parameters():
        raise DistillkitError(f"the teacher adapter '{method.teacher_adapter}' trains, so its signal cannot be "
                              "cached; set teacher_signal.top_k = 0")
    adapter_options = method.teacher_adapter_options(run.options)
    folder = cache_folder(run, adapter_options, k)
    factory = registry().sources[method.source]
    view: PseudoTargetSource = factory.fixed_view(run, **method.source_options(run.options))
    micro = run.config.training.micro_batch_size
    ordered = sorted(run.train_examples, key=lambda e: len(e.prompt_ids) + len(e.response_ids))
    chunks = list(micro_chunks(ordered, micro))
    with exclusive(folder, enabled=accelerator.is_main_process):
        accelerator.wait_for_everyone()
        cache = TopKCache(folder, k=k, vocab_size=run.vocab_size)
        keyed = [(batch, row_keys(batch)) for batch in map(view, chunks)]
        todo = [(batch, keys) for batch, keys in keyed if cache.missing(keys)]
        if todo:
            _fill(run, cache, todo, k, accelerator, progress)
        accelerator.wait_for_everyone()
    cache = TopKCache(folder, k=k, vocab_size=run.vocab_size)  # the rows every process wrote
    log.info("teacher signal: top-%d of %d sequences from %s (%d bytes per position, %.1f MB)", k,
             len(run.train_examples), folder, cache.bytes_per_position, cache.size_bytes() / 1e6)
    return TeacherSignals(cache, method.source)


def _fill(run: Run, cache: TopKCache, todo: list[tuple[TrainBatch, list[str]]], k: int, accelerator: Accelerator,
          progress: Progress) -> None:
    """Compute the missing rows of the batches in ``todo`` (each with its row
    keys; the same list in every process), a shard every
    :data:`ROWS_PER_SHARD` rows."""
    rank, processes = accelerator.process_index, accelerator.num_processes
    mine = todo[rank::processes]
    calls = math.ceil(len(todo) / processes)  # the same number in every process (a sharded teacher needs all)
    calls_per_shard = max(1, ROWS_PER_SHARD // (todo[0][0].input_ids.shape[0] * processes))
    task = progress.add_task("teacher top-k signal", total=len(todo), status=f"k={k} -> {cache.folder.name}")
    pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for call in range(calls):
        batch, keys = mine[call] if call < len(mine) else todo[0]  # a process with no share left repeats one, unused
        rows = top_k_rows(run, batch.to(accelerator.device), k)
        if call < len(mine):
            pending.update((key, row) for key, row in zip(keys, rows) if key not in cache)
        if (call + 1) % calls_per_shard == 0 or call == calls - 1:  # the same calls in every process
            if processes > 1:
                from accelerate.utils import gather_object

                pending = dict(gather_object(list(pending.items())))
            if accelerator.is_main_process and pending:
                cache.add(pending)
            pending = {}
        progress.advance(task, min(processes, len(todo) - call * processes))
