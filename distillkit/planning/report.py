"""The planner's report: the plan table, the verdict against the memory
available, the layout and placement changes that would fit, and
``distillkit train --dry-run``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from distillkit.config import Recipe, load_recipe, resolve_run
from distillkit.engine.layout import Layout, accelerate_config_files, layout_from_config, resolve_layout, shown_path
from distillkit.planning.plan import FORWARD_BACKWARD, MiB, Plan, estimate


def available_memory(layout: Layout) -> tuple[str, float]:
    """(what, free MiB): the first CUDA device's free memory, else available CPU RAM."""
    if layout.device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return f"{torch.cuda.get_device_name(0)} free memory", free / MiB
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        what = "available CPU RAM" + (" (no CUDA device here; pass --device-memory for yours)"
                                      if layout.device == "cuda" else "")
        return what, int(fields["MemAvailable"].split()[0]) / 1024
    return "available CPU RAM", float("nan")


def verdict(plan: Plan, available: float) -> tuple[bool, str]:
    """(fits, "fits in X GiB with Y GiB to spare" or "does NOT fit: ...") against ``available`` MiB."""
    needed = plan.needed()
    if needed <= available:
        return True, f"fits in {available / 1024:.1f} GiB with {(available - needed) / 1024:.1f} GiB to spare"
    return False, f"does NOT fit: needs {needed / 1024:.1f} GiB, have {available / 1024:.1f} GiB"


def suggestions(recipe: Recipe, plan: Plan, available: float) -> tuple[list[str], list[str]]:
    """(changes that fit, changes tried): a sharded teacher, the shipped FSDP
    config, an offloaded teacher (not ZeRO-3: the trainer does not run it yet)."""
    shapes = {"student": plan.student, **({"teacher": plan.teacher} if plan.teacher is not None else {})}

    def placed(placement: str) -> Recipe:
        return dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, placement=placement))

    replicated = plan.teacher is not None and plan.placement == "replicate"
    candidates: list[tuple[str, Recipe, Layout]] = []
    if replicated and plan.layout.kind.startswith("fsdp"):
        candidates.append(('teacher.placement = "shard"', placed("shard"), plan.layout))
    shipped = accelerate_config_files()
    for name in ("fsdp",):
        if name not in shipped:
            continue
        layout = layout_from_config(str(shipped[name]))
        if (layout.kind, layout.offload_optimizer) != (plan.layout.kind, plan.layout.offload_optimizer):
            candidates.append((shown_path(shipped[name]), recipe, layout))
            if replicated and layout.kind.startswith("fsdp"):
                label = f'{shown_path(shipped[name])} with teacher.placement = "shard"'
                candidates.append((label, placed("shard"), layout))
    if plan.teacher is not None and plan.placement != "offload" and plan.layout.device == "cuda":
        candidates.append(('teacher.placement = "offload"', placed("offload"), plan.layout))
    fitting = [label for label, changed, layout in candidates
               if estimate(changed, plan.method, layout, shapes=shapes).needed() <= available]
    return fitting, [label for label, _, _ in candidates]


def plan_table(plan: Plan) -> Any:
    """A rich table of the plan's rows, the peak per device and the CPU RAM column."""
    from rich.table import Table

    on_cpu = plan.layout.device == "cpu"
    offloaded = not on_cpu and any(r.cpu for r in plan.rows)
    columns = ["item", "when", "CPU RAM (MiB)" if on_cpu else "per device (MiB)"]
    columns += ["CPU RAM (MiB)"] if offloaded else []
    table = Table(*columns, "note", title=f"memory plan: {plan.method} on {plan.recipe}, per process")
    peak = plan.peak_phase()
    for row in plan.rows:
        cells = [row.name, row.when + (f" {plan.peak_stage}" if row.when == FORWARD_BACKWARD else ""),
                 f"{row.device + (row.cpu if on_cpu else 0.0):,.0f}"]
        cells += [f"{row.cpu:,.0f}"] if offloaded else []
        table.add_row(*cells, row.note, style=None if row.when in ("always", peak) else "dim")
    total = plan.total("device") + (plan.total("cpu") if on_cpu else 0.0)
    cells = ["peak", f"always + {peak}", f"{total:,.0f}"] + ([f"{plan.total('cpu'):,.0f}"] if offloaded else [])
    table.add_row(*cells, "dim rows: a smaller phase", style="bold")
    return table


def print_plan(plan: Plan, recipe: Recipe, console: Any, *, device_memory_gib: float | None = None) -> bool:
    """Print the plan table, the layout, the models and the verdict; returns whether it fits."""
    console.print(plan_table(plan))
    console.print(f"layout: {plan.layout.describe()}; training precision {plan.precision}", soft_wrap=True)
    for role, shape in (("teacher", plan.teacher), ("student", plan.student)):
        if shape is not None:
            console.print(f"{role}: {shape.parameters:,} parameters, {shape.layers} layers, hidden {shape.hidden}, "
                          f"vocabulary {shape.vocab:,} (config: {shape.source})", highlight=False, soft_wrap=True)
    if device_memory_gib is not None:
        what, available = "--device-memory", device_memory_gib * 1024
    else:
        what, available = available_memory(plan.layout)
    fits, text = verdict(plan, available)
    if not fits:
        fitting, tried = suggestions(recipe, plan, available)
        if fitting:
            text += "; try " + " or ".join(fitting[:2])
        else:
            micro = resolve_run(recipe, plan.method).training.micro_batch_size
            text += (f"; {', '.join(tried) or 'no other layout'} {'does' if len(tried) == 1 else 'do'} not fit "
                     f"either: lower training.micro_batch_size ({micro}) or add devices")
    unit = "per machine" if plan.layout.device == "cpu" else "per device"
    console.print(f"[bold]{'[green]' if fits else '[red]'}{text}[/][/] ({what}; {unit})", highlight=False,
                  soft_wrap=True)
    if plan.layout.kind == "zero3":
        console.print("[yellow]DeepSpeed ZeRO-3: a plan only; distillkit's trainer does not run under ZeRO-3 yet "
                      "(use ZeRO-2 or FSDP, e.g. recipes/accelerate/fsdp.yaml)[/]", highlight=False, soft_wrap=True)
    if plan.cpu_ram():
        console.print(f"CPU RAM for offloaded state: {plan.cpu_ram() / 1024:.1f} GiB per machine "
                      f"({plan.layout.per_machine} processes)", highlight=False, soft_wrap=True)
    return fits


def dry_run(method: str, recipe_name: str, *, overrides: list[str] | None = None,
            accelerate_config: str | None = None, device_memory_gib: float | None = None,
            console: Any = None) -> bool:
    """``distillkit train --dry-run``: plan, print, train nothing; returns whether it fits."""
    from rich.console import Console

    recipe = load_recipe(recipe_name, overrides or [])
    plan = estimate(recipe, method, resolve_layout(accelerate_config))
    return print_plan(plan, recipe, console or Console(), device_memory_gib=device_memory_gib)
