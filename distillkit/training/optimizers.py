"""One AdamW and LR schedule per trained parameter group (``"student"``,
``"teacher_adapter"``), prepared with ``accelerate``: clipping, stepping or
skipping an update, and what of them distillkit checkpoints itself."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from distillkit.api import Method
from distillkit.config import TrainingConfig
from distillkit.errors import DistillkitError
from distillkit.training.accelerator import is_deepspeed
from distillkit.training.run import Run

LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# training.optimizer -> the torch.optim.AdamW arguments that pick its implementation
ADAMW_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {"adamw": {}, "adamw_foreach": {"foreach": True},
                                                     "adamw_fused": {"fused": True}}


def make_optimizer(params: list[torch.nn.Parameter], training: TrainingConfig, lr: float) -> torch.optim.AdamW:
    """AdamW (the implementation ``training.optimizer`` names) without weight
    decay on biases and norm weights (1-D tensors)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(training.adam_betas),
                                 **ADAMW_IMPLEMENTATIONS[training.optimizer])
    except RuntimeError as err:  # e.g. fused kernels missing for this device or dtype
        raise DistillkitError(f"training.optimizer = '{training.optimizer}' cannot be used here "
                              f"({str(err).splitlines()[0]}); set training.optimizer = 'adamw'") from None


def trained_parameters(run: Run, group: str) -> list[torch.nn.Parameter]:
    """The parameters a stage of ``group`` trains."""
    if group == "student":
        return [p for p in run.student.parameters() if p.requires_grad]
    if group == "teacher_adapter" and run.teacher is not None:
        return run.teacher.trainable_parameters()
    raise DistillkitError(f"method '{run.config.method}': stage trains unknown parameter group '{group}'")


class GroupOptimizers:
    """The optimizer and LR schedule of every group the method's stages
    train (LR: the options' ``GROUP_lr`` if set, else ``training.lr``).
    Building them prepares the student with ``accelerate`` (sets
    ``run.student`` to the prepared model); under DeepSpeed its engine takes
    the student's optimizer, and the other groups stay plain torch."""

    def __init__(self, accelerator: Accelerator, run: Run, method: Method) -> None:
        self.accelerator, self.run = accelerator, run
        training, options = run.config.training, run.config.options
        self.groups = list(dict.fromkeys(stage.trains for stage in method.stages))
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, Any] = {}
        for group in self.groups:
            lr = getattr(options, f"{group}_lr", None) or training.lr
            optimizer = make_optimizer(self.parameters(group), training, lr)
            self.optimizers[group] = optimizer
            self.schedulers[group] = get_scheduler(LR_SCHEDULES[training.lr_schedule], optimizer,
                                                   num_warmup_steps=training.warmup_steps,
                                                   num_training_steps=run.total_steps)
        self.prepared = ["student"] if is_deepspeed(accelerator) else self.groups
        prepared = accelerator.prepare(run.student, *(self.optimizers[g] for g in self.prepared),
                                       *(self.schedulers[g] for g in self.prepared))
        run.student = prepared[0]
        self.optimizers.update(zip(self.prepared, prepared[1 : 1 + len(self.prepared)]))
        self.schedulers.update(zip(self.prepared, prepared[1 + len(self.prepared) :]))

    def parameters(self, group: str) -> list[torch.nn.Parameter]:
        return trained_parameters(self.run, group)

    def state_owners(self) -> dict[str, Any]:
        """The optimizers and schedulers that ``accelerate`` does not
        checkpoint (those of unprepared groups), by run-state name."""
        owners: dict[str, Any] = {}
        for group in self.groups:
            if group not in self.prepared:
                owners[f"optimizer/{group}"] = self.optimizers[group]
                owners[f"scheduler/{group}"] = self.schedulers[group]
        return owners

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters per group."""
        return {group: sum(p.numel() for p in self.parameters(group)) for group in self.optimizers}

    def describe(self) -> str:
        """What trains, e.g. ``teacher_adapter: 1,792 (7 x 256)`` for a soft prompt."""
        parts = []
        for group in self.optimizers:
            params = self.parameters(group)
            count = sum(p.numel() for p in params)
            shapes = " + ".join(" x ".join(map(str, p.shape)) for p in params) if len(params) <= 2 else ""
            parts.append(f"{group}: {count:,}" + (f" ({shapes})" if shapes else ""))
        return "; ".join(parts)

    def average_gradients(self, group: str) -> None:
        """Average the gradients of a group outside DDP over the processes."""
        for param in self.parameters(group):
            param.grad = self.accelerator.reduce(param.grad, "mean")

    def clipped_norm(self, group: str, max_norm: float) -> float:
        """The total gradient norm of ``group``, clipped to ``max_norm`` (if > 0)."""
        params = self.parameters(group)
        if max_norm > 0:
            clip = torch.nn.utils.clip_grad_norm_ if is_deepspeed(self.accelerator) else self.accelerator.clip_grad_norm_
            return float(clip(params, max_norm))
        grads = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    def step(self, group: str) -> float:
        """Update ``group`` and advance its schedule (under DeepSpeed the
        student's steps here are no-ops: its engine stepped); returns the LR
        of the next step."""
        self.optimizers[group].step()
        self.schedulers[group].step()
        self.optimizers[group].zero_grad(set_to_none=True)
        return self.schedulers[group].get_last_lr()[0]

    def skip(self, group: str) -> float:
        """Drop ``group``'s gradients without an update; the schedule follows
        the step count, skipped or not.  Returns the LR of the next step."""
        self.optimizers[group].zero_grad(set_to_none=True)
        self.schedulers[group].step()
        return self.schedulers[group].get_last_lr()[0]
