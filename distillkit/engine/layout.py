"""The device layout of a run: one device, DDP, FSDP or DeepSpeed ZeRO, read
from an ``accelerate`` config file or from the environment of ``accelerate
launch``; and the few process-level settings derived from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from distillkit.config import recipe_dir_files
from distillkit.errors import DistillkitError, did_you_mean


@dataclass(frozen=True)
class Layout:
    """How training is spread: ``kind`` (single, ddp, fsdp (full shard),
    fsdp_grad_op (SHARD_GRAD_OP), zero1/2/3), ``processes`` in all over
    ``machines``, what is offloaded to CPU RAM, the device type and the
    configured mixed precision ("no", "bf16", "fp16")."""

    kind: Literal["single", "ddp", "fsdp", "fsdp_grad_op", "zero1", "zero2", "zero3"] = "single"
    processes: int = 1
    machines: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    mixed_precision: str = "no"
    device: Literal["cuda", "cpu"] = "cpu"
    source: str = "one device"

    @property
    def per_machine(self) -> int:
        return max(1, self.processes // self.machines)

    @property
    def deepspeed(self) -> bool:
        return self.kind.startswith("zero")

    @property
    def shards_weights(self) -> bool:
        return self.kind in ("fsdp", "zero3")

    @property
    def shards_gradients(self) -> bool:
        return self.kind in ("fsdp", "fsdp_grad_op", "zero2", "zero3")

    @property
    def shards_optimizer(self) -> bool:
        return self.kind in ("fsdp", "fsdp_grad_op", "zero1", "zero2", "zero3")

    def describe(self) -> str:
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params))
                   if on]
        where = f"{self.processes} x {self.device}" + (f" on {self.machines} machines" if self.machines > 1 else "")
        return (f"{self.kind}, {where}, mixed precision {self.mixed_precision}"
                + (f", {' and '.join(offload)} offloaded to CPU" if offload else "") + f" ({self.source})")


def single_layout() -> Layout:
    """One process on the first CUDA device (bf16 where supported), else the CPU."""
    if torch.cuda.is_available():
        return Layout(mixed_precision="bf16" if torch.cuda.is_bf16_supported() else "no", device="cuda")
    return Layout()


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _offloaded(device: Any) -> bool:
    return str(device or "none").strip().lower() in ("cpu", "nvme")


def _fsdp_kind(strategy: Any, reshard_after_forward: Any, version: Any) -> str:
    """``fsdp`` (weights sharded between uses) or ``fsdp_grad_op`` / ``ddp``
    from an FSDP sharding strategy (name or 1-5) or FSDP2's reshard flag."""
    if str(version) == "2" and reshard_after_forward is not None:
        return "fsdp" if _flag(reshard_after_forward) else "fsdp_grad_op"
    name = str(strategy or "FULL_SHARD").strip().upper()
    names = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]
    if name.isdigit() and 1 <= int(name) <= len(names):
        name = names[int(name) - 1]
    return {"SHARD_GRAD_OP": "fsdp_grad_op", "HYBRID_SHARD_ZERO2": "fsdp_grad_op", "NO_SHARD": "ddp"}.get(name, "fsdp")


def _zero_kind(stage: Any) -> str:
    stage = int(stage or 0)
    return "ddp" if stage == 0 else f"zero{min(stage, 3)}"


def accelerate_config_files() -> dict[str, Path]:
    """The ``accelerate/*.yaml`` launch configs of the registered recipe folders, by name."""
    return recipe_dir_files("accelerate/*.yaml")


def find_accelerate_config(name_or_path: str) -> Path:
    """A path to an accelerate config file, or a shipped config's name (``fsdp``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    files = accelerate_config_files()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in files and path.parent == Path("."):
        return files[name]
    if path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        raise DistillkitError(f"accelerate config file {path} does not exist")
    raise DistillkitError(f"unknown accelerate config '{name_or_path}'{did_you_mean(name, files)}; shipped: "
                          f"{', '.join(sorted(files)) or 'none'} (or pass a path to a .yaml file)")


def layout_from_config(name_or_path: str) -> Layout:
    """The layout an ``accelerate launch --config_file`` config describes."""
    import yaml

    path = find_accelerate_config(name_or_path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DistillkitError(f"accelerate config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise DistillkitError(f"accelerate config {path} must be a mapping of settings")
    kind_of = {"NO": "single", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "MULTI_NPU": "ddp", "MULTI_XPU": "ddp",
               "FSDP": "fsdp", "DEEPSPEED": "zero"}
    distributed = str(config.get("distributed_type", "NO")).upper()
    if distributed not in kind_of:
        raise DistillkitError(f"accelerate config {path}: distributed_type {distributed} is not one the planner "
                              f"knows ({', '.join(kind_of)})")
    kind, offload_optimizer, offload_params = kind_of[distributed], False, False
    if kind == "fsdp":
        fsdp = config.get("fsdp_config") or {}
        kind = _fsdp_kind(fsdp.get("fsdp_sharding_strategy"), fsdp.get("fsdp_reshard_after_forward"),
                          fsdp.get("fsdp_version"))
        offload_optimizer = offload_params = _flag(fsdp.get("fsdp_offload_params", False))
    elif kind == "zero":
        deepspeed = config.get("deepspeed_config") or {}
        kind = _zero_kind(deepspeed.get("zero_stage", 2))
        offload_optimizer = _offloaded(deepspeed.get("offload_optimizer_device"))
        offload_params = _offloaded(deepspeed.get("offload_param_device")) and kind == "zero3"
    # DDP-style configs run on CPU processes on a machine without CUDA (distillkit switches accelerate to CPU)
    cpu = (_flag(config.get("use_cpu", False)) or distributed == "MULTI_CPU"
           or (distributed in ("NO", "MULTI_GPU") and not torch.cuda.is_available()))
    processes = int(config.get("num_processes", 1) or 1)
    return Layout(kind if processes > 1 or kind != "ddp" else "single", processes,
                  int(config.get("num_machines", 1) or 1), offload_optimizer, offload_params,
                  str(config.get("mixed_precision", "no")).lower(), "cpu" if cpu else "cuda", shown_path(path))


def layout_from_environment(environ: dict[str, str] | None = None) -> Layout | None:
    """The layout of a process started by ``accelerate launch`` (its
    ``ACCELERATE_*``, ``FSDP_*`` and torchrun variables), or None."""
    env = os.environ if environ is None else environ
    if "ACCELERATE_MIXED_PRECISION" not in env and "WORLD_SIZE" not in env:
        return None
    processes = int(env.get("WORLD_SIZE", "1"))
    per_machine = int(env.get("LOCAL_WORLD_SIZE", processes))
    kind, offload_optimizer, offload_params = ("ddp" if processes > 1 else "single"), False, False
    if _flag(env.get("ACCELERATE_USE_FSDP", "false")):
        kind = _fsdp_kind(env.get("FSDP_SHARDING_STRATEGY"), env.get("FSDP_RESHARD_AFTER_FORWARD"),
                          env.get("FSDP_VERSION", "1"))
        offload_optimizer = offload_params = _flag(env.get("FSDP_OFFLOAD_PARAMS", "false"))
    elif _flag(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        kind = _zero_kind(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        offload_optimizer = _offloaded(env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"))
        offload_params = _offloaded(env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")) and kind == "zero3"
    cpu = _flag(env.get("ACCELERATE_USE_CPU", "false")) or not torch.cuda.is_available()
    return Layout(kind, processes, max(1, processes // max(per_machine, 1)), offload_optimizer, offload_params,
                  env.get("ACCELERATE_MIXED_PRECISION", "no").lower(), "cpu" if cpu else "cuda",
                  "accelerate launch environment")


def resolve_layout(accelerate_config: str | None = None) -> Layout:
    """``--accelerate-config``, else the launch environment, else one device."""
    if accelerate_config:
        return layout_from_config(accelerate_config)
    return layout_from_environment() or single_layout()



def shown_path(path: Path) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def check_launch_layout() -> None:
    """Refuse, before any model is loaded, a layout the trainer cannot run."""
    layout = layout_from_environment()
    if layout is not None and layout.kind == "zero3":
        raise NotImplementedError(
            "DeepSpeed ZeRO-3: transformers then loads every model partitioned (zero.Init), and distillkit's frozen "
            "teacher and vocabulary checks need whole weights; use ZeRO-2 (recipes/accelerate/zero2.yaml) or FSDP "
            "(recipes/accelerate/fsdp.yaml, which can also shard the teacher)")


def cpu_processes() -> bool:
    """True when several processes start on a machine without CUDA (e.g.
    ``accelerate launch --multi_gpu --num_processes 2`` on CPU): accelerate
    then needs ``cpu=True`` to join them over gloo."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


