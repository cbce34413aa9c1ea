"""The built-in vocabulary alignment ``byte_match``: the student batch re-tokenized for the teacher, and the
teacher's top-k over the tokens whose bytes are a student token's, at the positions where both tokenizations start
a token at the same response byte, plus one tail bucket (:mod:`distillkit.engine.alignment`)."""

from __future__ import annotations

from typing import Any

import torch

from distillkit.api import TopKSignal, TrainBatch, VocabularyAlignment, hookimpl
from distillkit.engine.alignment import VocabularyMap, student_signal, teacher_view


class ByteMatch:
    """One teacher/student tokenizer pair; the vocabulary map is built once."""

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.vocabulary_map = VocabularyMap.between(teacher_tokenizer, student_tokenizer)

    def teacher_view(self, batch: TrainBatch) -> tuple[TrainBatch, torch.Tensor]:
        """The teacher's batch (B, T_t) and the alignment (B, T_s - 1) (see :func:`teacher_view`)."""
        return teacher_view(batch, self.student_tokenizer, self.teacher_tokenizer)

    def signal(self, teacher_logits: torch.Tensor, alignment: torch.Tensor, k: int) -> TopKSignal:
        """The teacher's logits (B, T_t - 1, V_t) as a top-k signal over the student's vocabulary (B, T_s - 1, k')."""
        return student_signal(teacher_logits, alignment, self.vocabulary_map, k)


@hookimpl
def distillkit_register_alignments() -> list[VocabularyAlignment]:
    return [VocabularyAlignment("byte_match", "teacher tokens with a byte-identical student token, at shared token "
                                "starts; the rest of the teacher's mass in one tail bucket", ByteMatch)]
