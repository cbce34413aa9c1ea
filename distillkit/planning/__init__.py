"""The memory planner (``distillkit train --dry-run``): model shapes from
configs alone (:mod:`~distillkit.planning.shapes`), the per-process rows of
a run from them and the components' declared footprints
(:mod:`~distillkit.planning.plan`), and the report
(:mod:`~distillkit.planning.report`).  The measured time estimate of a
bench (:mod:`~distillkit.planning.timing`) is imported on its own: it loads
the trainer."""

from distillkit.planning.plan import Plan, Row, activation_bytes_per_token, estimate
from distillkit.planning.report import available_memory, dry_run, plan_table, print_plan, suggestions, verdict
from distillkit.planning.shapes import ModelShape, model_shape, shape_of

__all__ = ["ModelShape", "Plan", "Row", "activation_bytes_per_token", "available_memory", "dry_run", "estimate",
           "model_shape", "plan_table", "print_plan", "shape_of", "suggestions", "verdict"]
