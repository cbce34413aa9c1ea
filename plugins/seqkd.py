"""SeqKD (Kim & Rush 2016), as run in the MiniLLM/PromptKD baselines: KD on
teacher-generated responses y^ instead of the dataset's y*.

    offline: y^ ~ p(.|x) once per training prompt (seeded, cached on disk)
    L = (1 - kd_ratio) * CE(y^) + kd_ratio * mean_t KL(p_t || q_t)   on [x ‖ y^]

``kd_ratio = 0`` is classic SeqKD (hard targets only).  As in the reference
(gmkim-ai/PromptKD ``generate.py`` then ``tools/process_data_dolly.py``), the
samples are decoded to text and re-tokenized as dataset responses, so every
target ends with EOS (``targets = "text"``); ``targets = "ids"`` trains on
the sampled ids as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distillkit.api import Method, Stage, hookimpl
from distillkit.plugins.kd import KDOptions, kd_loss


@dataclass(frozen=True)
class SeqKDOptions(KDOptions):
    generation_seed: int = 10
    targets: Literal["text", "ids"] = "text"


@hookimpl
def distillkit_register_methods() -> list[Method]:
    return [Method(name="seqkd", description="KD on teacher-generated responses (generated once, cached)",
                   stages=(Stage("student", kd_loss),), source="teacher_cache", teacher_adapter="frozen",
                   options=SeqKDOptions,
                   source_options=lambda o: {"seed": o.generation_seed, "targets": o.targets},
                   reads_teacher_signal=True)]
