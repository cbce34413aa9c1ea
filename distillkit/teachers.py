"""Built-in teacher adapters: how a run uses the teacher model."""

from __future__ import annotations

import torch

from distillkit import hookimpl
from distillkit.batch import TrainBatch
from distillkit.components import TeacherAdapterFactory
from distillkit.run import Run


class FrozenTeacher:
    """The teacher as loaded: eval mode, no gradients, weights never change."""

    def __init__(self, model: torch.nn.Module, run: Run) -> None:
        self.model = model.eval().requires_grad_(False)

    def logits(self, batch: TrainBatch, *, grad: bool = False) -> torch.Tensor:
        """(B, T-1, V) next-token logits on the same ids and mask as the student."""
        with torch.set_grad_enabled(grad):
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.logits[:, :-1]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []


@hookimpl
def distillkit_register_teacher_adapters() -> list[TeacherAdapterFactory]:
    return [TeacherAdapterFactory("frozen", "the teacher as loaded, without gradients", FrozenTeacher)]
