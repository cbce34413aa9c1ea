"""The one training loop, on ``accelerate`` (CPU, one GPU, DDP, FSDP and
DeepSpeed ZeRO-1/2 through ``accelerate launch``).

Per optimizer step k: draw ``batch_size`` examples (the global batch; with
N processes each takes a contiguous 1/N of it), let the method's source turn
each micro-batch into ``[x ‖ y]``, then for each stage run all micro-batches
(losses weighted so that the step averages over all response tokens of the
global batch, whatever the layout), clip and step that stage's optimizer and
LR schedule.  N processes therefore compute the same update as one.  A
non-finite loss or gradient norm stops the run (or skips the update) before
any parameter changes.  Evaluation every ``eval_every`` steps (split over the
processes, with per-prompt sampling noise, so its result does not depend on
the layout either) keeps the best student by validation ROUGE-L (or loss).
Checkpoints (safetensors weights; optimizer, scheduler and RNG state read back
with ``weights_only=True``; distillkit's own run state as safetensors + JSON)
are written atomically, the last ``keep_checkpoints`` are kept, and ``resume``
continues from the latest one that loads, after checking that the folder
holds a run of the same method and recipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError
from transformers import get_scheduler

from distillkit.api import Method, TokenizedExample, TrainBatch, collate
from distillkit.config import RunConfig, TrainingConfig, to_dict
from distillkit.engine.layout import cpu_processes, mixed_precision
from distillkit.engine.models import save_model
from distillkit.engine.sampling import settings_from
from distillkit.errors import DistillkitError
from distillkit.evaluation.protocol import evaluate
from distillkit.files import write_text_atomic
from distillkit.registry import registry
from distillkit.training.checkpoints import load_state, save_state
from distillkit.training.run import Run

log = logging.getLogger(__name__)

LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
STATE_FILE = "trainer_state.json"
RUN_STATE = "run_state"  # distillkit's own state per process: run_state_RANK.{safetensors,json}
# recipe and manifest keys that may change when a run is resumed (they change no update done so far)
RESUMABLE = ("training.max_steps", "training.epochs", "training.eval_every", "training.save_every",
             "training.log_every", "training.keep_checkpoints", "training.on_nonfinite", "generation.batch_size")


@dataclass
class TrainerState:
    """Progress saved with every checkpoint."""

    step: int = 0
    best_metric: float | None = None
    best_step: int = -1
    tokens: int = 0  # tokens through the student (attention-mask positions)
    elapsed_s: float = 0.0  # seconds in training steps (no setup, evaluation or checkpointing)
    generated_tokens: int = 0  # tokens sampled by the run (pseudo-targets, all processes), see Run.sample
    peak_memory_mb: float = 0.0  # CUDA: peak allocated; CPU: peak resident set of the (main) process
    skipped_updates: int = 0  # stage updates skipped for a non-finite loss or gradient (on_nonfinite = "skip")


def _differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The dotted keys at which two JSON values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            found.update(_differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return found
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The method, resolved recipe, options and training settings of a run, as ``run.json`` stores them."""
    settings = {"method": config.method, "recipe": to_dict(config.recipe), "options": to_dict(config.options),
                "training": to_dict(config.training)}
    return json.loads(json.dumps(settings))  # as read back (tuples become lists)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The run's complete checkpoints (``step-NNNNNNN`` folders with a trainer
    state), oldest first; never a leftover ``step-N.tmp``."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file())


def check_run_folder(output_dir: Path, config: RunConfig, *, resume: bool) -> Path | None:
    """Before any model is loaded: refuse a folder that holds a run unless
    ``resume``, and a run made by another method or recipe (the keys of
    :data:`RESUMABLE` may change).  Returns the latest complete checkpoint."""
    done = complete_checkpoints(output_dir)
    leftovers = [p.name for p in (output_dir / "run.json", output_dir / "metrics.jsonl") if p.exists()]
    if not resume and (done or leftovers):
        held = f"checkpoint {done[-1].name}" if done else f"{', '.join(leftovers)} of a run without a checkpoint"
        raise DistillkitError(f"{output_dir} already holds a run ({held}); pass --resume to continue it or choose "
                              "another --output")
    manifest = output_dir / "run.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        recorded = {key: recorded.get(key) for key in ("method", "recipe", "options", "training")}
        differences = _differences(recorded, run_settings(config))
        changed = [key for key in differences
                   if not any(key == allowed or key.endswith("." + allowed) for allowed in RESUMABLE)]
        if changed:
            old, new = differences[changed[0]]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise DistillkitError(
                f"{output_dir} holds another run: {changed[0]} is {old!r} there, {new!r} now{more}; resume with "
                f"its settings or choose another --output (may change on resume: {', '.join(RESUMABLE)})")
    return done[-1] if done else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def total_steps(training: TrainingConfig, num_examples: int) -> int:
    """K: ``max_steps`` if set, else ``epochs`` passes over the data."""
    if training.max_steps > 0:
        return training.max_steps
    return max(1, math.ceil(training.epochs * math.ceil(num_examples / training.batch_size)))


def make_optimizer(params: list[torch.nn.Parameter], training: TrainingConfig, lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norm weights (1-D tensors)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(training.adam_betas))


class Trainer:
    """Trains ``student`` with a registered method; writes into ``output_dir``."""

    def __init__(
        self,
        config: RunConfig,
        student: torch.nn.Module,
        tokenizer: Any,
        train_examples: list[TokenizedExample],
        validation_examples: list[TokenizedExample],
        output_dir: Path,
        *,
        teacher: torch.nn.Module | None = None,
        teacher_id: str = "",
        resume: bool = False,
        console: Console | None = None,
    ) -> None:
        self.config = config
        self.training = config.training
        self.method: Method = registry().methods[config.method]
        self.tokenizer = tokenizer
        self.train_examples = train_examples
        self.validation_examples = validation_examples[: self.training.eval_limit or None]
        self.output_dir = output_dir
        self.console = console or Console(stderr=True)
        if not train_examples:
            raise DistillkitError("no training examples left after filtering; check data.max_prompt_length")
        self.accelerator = Accelerator(mixed_precision=mixed_precision(self.training.mixed_precision),
                                       step_scheduler_with_optimizer=False, cpu=cpu_processes())
        processes = self.accelerator.num_processes
        if self.training.batch_size % (processes * self.training.micro_batch_size):
            raise DistillkitError(
                f"training.batch_size ({self.training.batch_size}, the global batch) must be a multiple of "
                f"{processes} process(es) x training.micro_batch_size ({self.training.micro_batch_size}); "
                "change one of them with --set"
            )
        if self.deepspeed:
            self._configure_deepspeed(processes)
        set_seed(self.training.seed)
        self.state = TrainerState()
        self.steps_per_epoch = math.ceil(len(train_examples) / self.training.batch_size)
        self._order: list[int] = []
        self._order_epoch: int | None = None
        if self.sharded and self.training.select_by == "rougeL" and validation_examples:
            raise DistillkitError(
                "FSDP: validation by ROUGE-L would generate from the sharded student outside the training loop, "
                "which is not supported yet; set training.select_by = 'loss' (--set training.select_by=loss)")
        self.run = Run(config, student, tokenizer, total_steps=total_steps(self.training, len(train_examples)),
                       train_examples=train_examples, teacher_id=teacher_id,
                       process_index=self.accelerator.process_index, num_processes=processes,
                       keep_going=self._any_process if self.sharded else bool, global_sum=self._global_tensor_sum)
        if self.method.teacher_adapter is not None:
            if teacher is None:
                raise DistillkitError(f"method '{self.method.name}' needs a teacher; set [teacher] in the recipe")
            teacher = self._place_teacher(teacher)
            adapter = registry().teacher_adapters[self.method.teacher_adapter]
            self.run.teacher = adapter.build(teacher, self.run, **self.method.teacher_adapter_options(config.options))
        self.source = registry().sources[self.method.source].build(self.run, **self.method.source_options(config.options))
        self._setup_optimizers(student)
        self._report_parameters()
        self._resume_or_start(resume)
        self.accelerator.wait_for_everyone()  # every process has checked the folder before any writes to it

    # --- setup -------------------------------------------------------------

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def sharded(self) -> bool:
        """Whether the student's weights are split over the processes (FSDP):
        every forward pass is then collective."""
        return self.accelerator.distributed_type == DistributedType.FSDP

    def _configure_deepspeed(self, processes: int) -> None:
        """DeepSpeed's engine owns the student's accumulation, clipping and
        step: tell it the per-process micro-batch, how many of them make one
        optimizer step and the recipe's clipping norm."""
        if self.training.on_nonfinite == "skip":
            raise DistillkitError("training.on_nonfinite = 'skip' is not supported under DeepSpeed, whose engine "
                                  "steps inside the backward pass; use 'stop'")
        micro_batches = self.training.batch_size // (processes * self.training.micro_batch_size)
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config.update(train_micro_batch_size_per_gpu=self.training.micro_batch_size,
                      gradient_accumulation_steps=micro_batches, gradient_clipping=self.training.max_grad_norm)


    def _place_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher on this process per ``teacher.placement``:
        a whole copy, sharded like the student (FSDP), or offloaded to CPU
        memory with each layer moved to the device for its forward pass."""
        teacher.requires_grad_(False)
        placement, device = self.config.recipe.teacher.placement, self.accelerator.device
        if placement == "shard":
            if self.accelerator.distributed_type != DistributedType.FSDP:
                raise DistillkitError(
                    "teacher.placement = 'shard' needs an FSDP accelerate config (accelerate launch --config_file "
                    "recipes/accelerate/fsdp.yaml ...); with this layout use 'replicate' or 'offload'")
            sharded = self.accelerator.prepare_model(teacher)
            self.accelerator._models.remove(sharded)  # frozen: no part of the checkpoints
            return sharded
        if placement == "offload" and device.type != "cpu":
            from accelerate import cpu_offload

            return cpu_offload(teacher, execution_device=device)
        return teacher.to(device)

    def _parameters(self, group: str) -> list[torch.nn.Parameter]:
        if group == "student":
            return [p for p in self.run.student.parameters() if p.requires_grad]
        if group == "teacher_adapter" and self.run.teacher is not None:
            return self.run.teacher.trainable_parameters()
        raise DistillkitError(f"method '{self.method.name}': stage trains unknown parameter group '{group}'")

    def _setup_optimizers(self, student: torch.nn.Module) -> None:
        groups = list(dict.fromkeys(stage.trains for stage in self.method.stages))
        self.optimizers, self.schedulers = {}, {}
        for group in groups:
            lr = getattr(self.config.options, f"{group}_lr", None) or self.training.lr
            optimizer = make_optimizer(self._parameters(group), self.training, lr)
            scheduler = get_scheduler(LR_SCHEDULES[self.training.lr_schedule], optimizer,
                                      num_warmup_steps=self.training.warmup_steps,
                                      num_training_steps=self.run.total_steps)
            self.optimizers[group], self.schedulers[group] = optimizer, scheduler
        # DeepSpeed builds one engine from the student and its optimizer; other groups stay plain torch
        prepared_groups = ["student"] if self.deepspeed else groups
        prepared = self.accelerator.prepare(student, *(self.optimizers[g] for g in prepared_groups),
                                            *(self.schedulers[g] for g in prepared_groups))
        self.run.student = prepared[0]
        self.optimizers.update(zip(prepared_groups, prepared[1 : 1 + len(prepared_groups)]))
        self.schedulers.update(zip(prepared_groups, prepared[1 + len(prepared_groups) :]))
        # what accelerate does not checkpoint, saved by distillkit as safetensors + JSON (no pickle)
        self.state_owners: dict[str, Any] = {}
        for group in groups:
            if group not in prepared_groups:
                self.state_owners[f"optimizer/{group}"] = self.optimizers[group]
                self.state_owners[f"scheduler/{group}"] = self.schedulers[group]
        for index, module in enumerate(getattr(self.run.teacher, "checkpoint_modules", lambda: [])()):
            self.state_owners[f"teacher_adapter/{index}"] = module
        if hasattr(self.source, "state_dict"):
            self.state_owners["source"] = self.source

    def _report_parameters(self) -> None:
        """Log what trains, e.g. ``teacher_adapter: 1,792 (7 x 256)`` for a soft prompt."""
        parts = []
        for group in self.optimizers:
            params = self._parameters(group)
            count = sum(p.numel() for p in params)
            shapes = " + ".join(" x ".join(map(str, p.shape)) for p in params) if len(params) <= 2 else ""
            parts.append(f"{group}: {count:,}" + (f" ({shapes})" if shapes else ""))
        log.info("method %s, trainable parameters: %s", self.method.name, "; ".join(parts))

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.output_dir)

    def latest_checkpoint(self) -> Path | None:
        done = self.checkpoints()
        return done[-1] if done else None

    def _resume_or_start(self, resume: bool) -> None:
        latest = check_run_folder(self.output_dir, self.config, resume=resume)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if latest is None:
            if resume:
                log.info("no checkpoint in %s: starting from step 0", self.output_dir)
            self._truncate_metrics(0)
            return
        for checkpoint in reversed(self.checkpoints()):
            try:
                self._load_checkpoint(checkpoint)
                break
            except (DistillkitError, OSError, ValueError, RuntimeError, KeyError, TypeError,
                    pickle.UnpicklingError, SafetensorError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                log.warning("checkpoint %s cannot be loaded (%s); trying the one before", checkpoint.name, reason)
        else:
            raise DistillkitError(f"no checkpoint in {self.checkpoint_dir} can be loaded (see the warnings); "
                                  "start a new run with another --output")
        self._truncate_metrics(self.state.step)
        log.info("resumed from %s (step %d)", checkpoint, self.state.step)

    def _load_checkpoint(self, checkpoint: Path) -> None:
        """Restore weights, optimizers, schedulers and RNG states (accelerate,
        which unpickles only with ``weights_only=True``), distillkit's own run
        state (safetensors + JSON) and the trainer state from ``checkpoint``."""
        self.accelerator.load_state(str(checkpoint))
        extra = load_state(checkpoint / f"{RUN_STATE}_{self.accelerator.process_index}")
        for name, owner in self.state_owners.items():
            owner.load_state_dict(extra[name])
        self.state = TrainerState(**json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))
        self.run.step = self.state.step
        if self.accelerator.is_main_process:  # the state holds the sum over processes
            self.run.generated_tokens = self.state.generated_tokens

    def manifest(self) -> dict[str, Any]:
        """What ``run.json`` records: :func:`run_settings` plus K and the trainable parameter counts."""
        trainable = {g: sum(p.numel() for p in self._parameters(g)) for g in self.optimizers}
        return {**run_settings(self.config), "total_steps": self.run.total_steps, "trainable_parameters": trainable}

    # --- data --------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[int]:
        """A fixed permutation per epoch (seeded by training seed and epoch), so
        resume is exact.  With ``group_by_length``, windows of 64 batches are
        sorted by length and their batches shuffled, which cuts padding."""
        generator = torch.Generator().manual_seed(self.training.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_examples), generator=generator).tolist()
        if not self.training.group_by_length:
            return order
        size, window = self.training.batch_size, self.training.batch_size * 64
        grouped = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(self.train_examples[i].prompt_ids)
                           + len(self.train_examples[i].response_ids))
            batches = [chunk[i : i + size] for i in range(0, len(chunk), size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped.extend(batches[b])
        return grouped

    def examples_for_step(self, step: int) -> list[TokenizedExample]:
        """This process's share of the global batch of optimizer step ``step``
        (a contiguous slice; the last batch of an epoch may be short)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        size = self.training.batch_size
        batch = self._order[index * size : (index + 1) * size]
        share = math.ceil(len(batch) / self.accelerator.num_processes)
        start = self.accelerator.process_index * share
        return [self.train_examples[i] for i in batch[start : start + share]]

    def micro_batches(self, examples: list[TokenizedExample]) -> list[TrainBatch]:
        size = self.training.micro_batch_size
        device = self.accelerator.device
        return [self.source(examples[i : i + size]).to(device) for i in range(0, len(examples), size)]

    # --- training ----------------------------------------------------------

    def _global_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over all processes (unchanged with one)."""
        if self.accelerator.num_processes == 1:
            return values
        return self._global_tensor_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def _global_tensor_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (unchanged with one)."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum").to(tensor.device)

    def _any_process(self, flag: bool) -> bool:
        """``flag`` or-ed over all processes."""
        return self._global_sum([float(flag)])[0] > 0

    def _gradient_norm(self, group: str) -> float:
        """The total gradient norm of ``group``, clipped to ``training.max_grad_norm`` (if > 0)."""
        params = self._parameters(group)
        if self.training.max_grad_norm > 0:
            clip = torch.nn.utils.clip_grad_norm_ if self.deepspeed else self.accelerator.clip_grad_norm_
            return float(clip(params, self.training.max_grad_norm))
        grads = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    def _all_finite(self, *values: float) -> bool:
        """Whether ``values`` are finite in every process."""
        (bad,) = self._global_sum([float(not all(math.isfinite(v) for v in values))])
        return bad == 0

    def _non_finite(self, group: str, what: str) -> int:
        """Stop the run at a non-finite loss or gradient of ``group`` (before
        any parameter changed), or, with ``training.on_nonfinite = "skip"``,
        count the skipped update and return 1."""
        step = self.state.step + 1
        if self.training.on_nonfinite == "skip":
            self.state.skipped_updates += 1
            log.warning("step %d: non-finite %s of %s, update skipped (%d so far)", step, what, group,
                        self.state.skipped_updates)
            return 1
        latest = self.latest_checkpoint()
        kept = f"the last checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
        raise DistillkitError(
            f"step {step}: the {what} of {group} is not finite (NaN or inf), so the run stopped before updating; "
            f"{kept}; lower training.lr (now {self.training.lr:g}), check the method options, or set "
            "training.on_nonfinite = \"skip\" to skip such steps")

    def _backward(self, loss: torch.Tensor, group: str, *, last: bool) -> None:
        """Backward of one micro-batch's weighted loss.  Under DeepSpeed the
        student's engine accumulates: it steps after the ``last`` micro-batch
        and divides every loss by its accumulation steps; other parameter
        groups there are plain torch."""
        if not self.deepspeed:
            self.accelerator.backward(loss)
        elif group == "student":
            self.accelerator.gradient_state._set_sync_gradients(last)
            self.accelerator.backward(loss * self.run.student.gradient_accumulation_steps())
        else:
            loss.backward()

    def train_step(self) -> dict[str, float]:
        """One optimizer step of every stage; returns logged values (averages
        over the global batch's response tokens)."""
        batches = self.micro_batches(self.examples_for_step(self.state.step))
        local_tokens = sum(b.num_response_tokens for b in batches)
        (global_tokens,) = self._global_sum([local_tokens])
        processes = self.accelerator.num_processes
        terms_by_key: dict[str, float] = {}
        logs: dict[str, float] = {}
        for stage in self.method.stages:
            self.run.student.train(stage.student_mode_for(self.config.options) == "train")
            engine = self.deepspeed and stage.trains == "student"  # the DeepSpeed engine clips and steps
            loss_sum = 0.0  # this process's share of the stage's loss
            for index, batch in enumerate(batches):
                weight = batch.num_response_tokens / max(global_tokens, 1)
                last = index == len(batches) - 1
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.run.student)
                with sync:
                    terms = stage.loss(self.run, batch)
                    loss_sum += float(terms["loss"].detach()) * weight
                    if engine and last and not self._all_finite(loss_sum):  # the engine steps in this backward
                        self._non_finite(stage.trains, "loss")
                    # gradients are averaged over processes, so scale by N to get the global token average
                    self._backward(terms["loss"] * (weight * processes), stage.trains, last=last)
                for name, value in terms.items():
                    key = name if len(self.method.stages) == 1 else f"{stage.trains}/{name}"
                    terms_by_key[key] = terms_by_key.get(key, 0.0) + float(value.detach()) * weight
            optimizer = self.optimizers[stage.trains]
            if stage.trains != "student" and processes > 1:
                for param in self._parameters(stage.trains):  # not DDP-wrapped: average by hand
                    param.grad = self.accelerator.reduce(param.grad, "mean")
            if engine:
                logs["grad_norm/student"] = float(self.run.student.get_global_grad_norm() or 0.0)
            else:
                norm = self._gradient_norm(stage.trains)
                logs[f"grad_norm/{stage.trains}"] = norm
                if not self._all_finite(loss_sum, norm):
                    skipped = self._non_finite(stage.trains, "loss" if not math.isfinite(loss_sum) else "gradient")
                    optimizer.zero_grad(set_to_none=True)
                    logs[f"skipped/{stage.trains}"] = skipped
                    self.schedulers[stage.trains].step()  # the schedule follows k, skipped or not
                    logs[f"lr/{stage.trains}"] = self.schedulers[stage.trains].get_last_lr()[0]
                    continue
            optimizer.step()  # under DeepSpeed the student's optimizer and scheduler steps are no-ops
            self.schedulers[stage.trains].step()
            optimizer.zero_grad(set_to_none=True)
            logs[f"lr/{stage.trains}"] = self.schedulers[stage.trains].get_last_lr()[0]
        local_positions = sum(int(b.attention_mask.sum()) for b in batches)
        *term_values, positions, generated = self._global_sum(
            [*terms_by_key.values(), local_positions, self.run.generated_tokens])
        self.state.tokens += int(positions)
        self.state.generated_tokens = int(generated)
        return {**dict(zip(terms_by_key, term_values)), **logs}

    def fit(self) -> Path:
        """Train to K steps (or continue a resumed run); returns the best checkpoint."""
        total = self.run.total_steps
        eval_every = self.training.eval_every or self.steps_per_epoch
        save_every = self.training.save_every or eval_every
        self._write_manifest()
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        is_main = self.accelerator.is_main_process
        with Progress(*columns, console=self.console, disable=not is_main) as progress:
            task = progress.add_task(f"{self.method.name}", total=total, completed=self.state.step, status="")
            while self.state.step < total:
                started, tokens_before = time.perf_counter(), self.state.tokens
                logs = self.train_step()
                seconds = time.perf_counter() - started
                self.state.step += 1
                self.run.step = self.state.step
                self.state.elapsed_s += seconds
                self.state.peak_memory_mb = max(self.state.peak_memory_mb, peak_memory_mb(self.accelerator.device))
                logs["tokens_per_s"] = (self.state.tokens - tokens_before) / max(seconds, 1e-9)
                lr = next(v for k, v in logs.items() if k.startswith("lr/"))
                progress.update(task, advance=1, status=(
                    f"loss {logs.get('loss', logs.get('student/loss', 0.0)):.3f}  lr {lr:.2e}  "
                    f"{logs['tokens_per_s']:,.0f} tok/s"))
                if self.state.step % self.training.log_every == 0 or self.state.step == total:
                    self._log({"step": self.state.step, **logs})
                if self.state.step % eval_every == 0 or self.state.step == total:
                    self._evaluate_and_select(progress)
                if self.state.step % save_every == 0 or self.state.step == total:
                    self.save_checkpoint()
        return self.output_dir / "best"

    # --- evaluation --------------------------------------------------------

    def validation_share(self) -> list[TokenizedExample]:
        """This process's share of the validation examples (every N-th), or
        all of them when models are sharded (then every process must run the
        same forward passes)."""
        if self.sharded:
            return self.validation_examples
        return self.validation_examples[self.accelerator.process_index :: self.accelerator.num_processes]

    @torch.no_grad()
    def validation_loss_sum(self, examples: list[TokenizedExample]) -> tuple[float, int]:
        """(sum of the response tokens' losses in nats, number of those tokens)."""
        student = self.run.student
        student.eval()
        pad_id = self.tokenizer.pad_token_id
        total, tokens = 0.0, 0
        size = self.training.micro_batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = collate([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], pad_id)
            batch = batch.to(self.accelerator.device)
            total += float(self.run.cross_entropy(self.run.student_logits(batch), batch)) * batch.num_response_tokens
            tokens += batch.num_response_tokens
        return total, tokens

    def _evaluate_and_select(self, progress: Progress) -> None:
        if not self.validation_examples:
            return
        generation = self.config.recipe.generation
        share = self.validation_share()
        task = progress.add_task("validation", total=len(share), status="")
        result = evaluate(self.accelerator.unwrap_model(self.run.student), self.tokenizer, share,
                          settings_from(generation, max_new_tokens=self.config.recipe.eval.max_new_tokens),
                          seeds=[self.training.seed], batch_size=generation.batch_size,
                          max_length=self.config.recipe.data.max_length, progress=lambda n: progress.advance(task, n),
                          row_keyed=True)
        progress.remove_task(task)
        sums = [result.mean * len(share), len(share), *self.validation_loss_sum(share)]
        rouge_sum, count, loss_sum, tokens = sums if self.sharded else self._global_sum(sums)
        metrics = {"rougeL": rouge_sum / max(count, 1), "loss": loss_sum / max(tokens, 1)}
        metric = metrics[self.training.select_by]
        best = self.state.best_metric
        if not math.isfinite(metric):  # a NaN score never becomes the best
            improved = False
        else:
            improved = best is None or (metric > best if self.training.select_by == "rougeL" else metric < best)
        if improved:
            self.state.best_metric, self.state.best_step = metric, self.state.step
            self._save_best(metrics)
        self._log({"step": self.state.step, "val/rougeL": metrics["rougeL"], "val/loss": metrics["loss"],
                   "best": improved})
        progress.console.log(
            f"step {self.state.step}: validation ROUGE-L {metrics['rougeL']:.2f}, loss {metrics['loss']:.3f}"
            + (" (best)" if improved else "")
        )

    # --- files -------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric records written after the checkpoint we resume from (atomically)."""
        path = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _write_manifest(self) -> None:
        if self.accelerator.is_main_process:
            write_text_atomic(self.output_dir / "run.json", json.dumps(self.manifest(), indent=2) + "\n")

    def _atomic_dir(self, final: Path, write: Any) -> None:
        """Write into ``final.tmp`` then swap it in, so a killed run never
        leaves a half-written folder in place of a good one."""
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)

    def _save_best(self, metrics: dict[str, float]) -> None:
        """The student (full weights, gathered from every process when it is
        sharded), the teacher adapter and the metrics, into ``best``."""
        # gathered (collectively) only when sharded: a copied state dict would store tied weights twice
        state = self.accelerator.get_state_dict(self.run.student) if self.sharded else None
        if not self.accelerator.is_main_process:
            return

        def write(folder: Path) -> None:
            save_model(self.accelerator.unwrap_model(self.run.student), self.tokenizer, folder, state_dict=state)
            save_adapter = getattr(self.run.teacher, "save", None)
            if save_adapter is not None:
                save_adapter(folder / "teacher_adapter")
            (folder / "best.json").write_text(json.dumps({"step": self.state.step, **metrics}, indent=2) + "\n")

        self._atomic_dir(self.output_dir / "best", write)

    def save_checkpoint(self) -> None:
        """Every process writes its part into ``step-K.tmp``; the main process
        then adds the trainer state (which marks it complete), renames it and
        removes older checkpoints."""
        final = self.checkpoint_dir / f"step-{self.state.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        save_state({name: owner.state_dict() for name, owner in self.state_owners.items()},
                   tmp / f"{RUN_STATE}_{self.accelerator.process_index}")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(self.state.__dict__, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[: -max(self.training.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
