"""The memory planner (``distillkit train --dry-run``)."""
