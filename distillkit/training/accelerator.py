"""The ``accelerate`` side of a run: the Accelerator of the launch layout
(DeepSpeed told the recipe's micro-batching) and its experiment trackers, the frozen teacher's
placement, the backward pass, sums over the processes and peak memory."""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from distillkit.config import TrainingConfig
from distillkit.engine.layout import cpu_processes, mixed_precision
from distillkit.errors import DistillkitError


def make_accelerator(training: TrainingConfig, trackers: list[str] | None = None,
                     tracker_dir: Path | None = None) -> Accelerator:
    """The Accelerator of this launch, logging with the experiment
    ``trackers`` (their files in ``tracker_dir``), after checking that the
    global batch splits into whole micro-batches on every process."""
    accelerator = Accelerator(mixed_precision=mixed_precision(training.mixed_precision),
                              step_scheduler_with_optimizer=False, cpu=cpu_processes(), log_with=trackers or None,
                              project_dir=tracker_dir)
    processes = accelerator.num_processes
    if training.batch_size % (processes * training.micro_batch_size):
        raise DistillkitError(
            f"training.batch_size ({training.batch_size}, the global batch) must be a multiple of "
            f"{processes} process(es) x training.micro_batch_size ({training.micro_batch_size}); "
            "change one of them with --set"
        )
    if is_deepspeed(accelerator):
        _configure_deepspeed(accelerator, training)
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    """Whether a DeepSpeed engine owns the student's accumulation, clipping and step."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the student's weights are split over the processes (FSDP):
    every forward pass is then collective."""
    return accelerator.distributed_type == DistributedType.FSDP


def _configure_deepspeed(accelerator: Accelerator, training: TrainingConfig) -> None:
    """Tell DeepSpeed's engine the per-process micro-batch, how many of them
    make one optimizer step and the recipe's clipping norm."""
    if training.on_nonfinite == "skip":
        raise DistillkitError("training.on_nonfinite = 'skip' is not supported under DeepSpeed, whose engine "
                              "steps inside the backward pass; use 'stop'")
    micro_batches = training.batch_size // (accelerator.num_processes * training.micro_batch_size)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(train_micro_batch_size_per_gpu=training.micro_batch_size,
                  gradient_accumulation_steps=micro_batches, gradient_clipping=training.max_grad_norm)


def place_teacher(accelerator: Accelerator, teacher: torch.nn.Module, placement: str) -> torch.nn.Module:
    """The frozen teacher on this process per ``teacher.placement``: a whole
    copy (``replicate``), sharded like the student (``shard``, FSDP), or
    offloaded to CPU memory with each layer moved to the device for its
    forward pass (``offload``)."""
    teacher.requires_grad_(False)
    device = accelerator.device
    if placement == "shard":
        if not is_sharded(accelerator):
            raise DistillkitError(
                "teacher.placement = 'shard' needs an FSDP accelerate config (accelerate launch --config_file "
                "recipes/accelerate/fsdp.yaml ...); with this layout use 'replicate' or 'offload'")
        sharded = accelerator.prepare_model(teacher)
        accelerator._models.remove(sharded)  # frozen: no part of the checkpoints
        return sharded
    if placement == "offload" and device.type != "cpu":
        from accelerate import cpu_offload

        return cpu_offload(teacher, execution_device=device)
    return teacher.to(device)


def backward(accelerator: Accelerator, loss: torch.Tensor, group: str, student: torch.nn.Module, *,
             last: bool) -> None:
    """Backward of one micro-batch's weighted loss.  Under DeepSpeed the
    student's engine accumulates: it steps after the ``last`` micro-batch
    and divides every loss by its accumulation steps; other parameter
    groups there are plain torch."""
    if not is_deepspeed(accelerator):
        accelerator.backward(loss)
    elif group == "student":
        accelerator.gradient_state._set_sync_gradients(last)
        accelerator.backward(loss * student.gradient_accumulation_steps())
    else:
        loss.backward()


@dataclass(frozen=True)
class GlobalSums:
    """Reductions over all processes of the run (unchanged values with one
    process); every process must make the same calls in the same order."""

    accelerator: Accelerator

    def of(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (as float64)."""
        if self.accelerator.num_processes == 1:
            return values
        return self.of_tensor(torch.tensor(values, dtype=torch.float64)).tolist()

    def of_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, on its own device."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum").to(tensor.device)

    def any(self, flag: bool) -> bool:
        """``flag`` or-ed over the processes."""
        return self.of([float(flag)])[0] > 0

    def all_finite(self, *values: float) -> bool:
        """Whether ``values`` are finite in every process."""
        (bad,) = self.of([float(not all(math.isfinite(v) for v in values))])
        return bad == 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
