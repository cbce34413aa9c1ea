"""The plugin API: everything a plugin author imports, from this one module.

- the hook specifications (:mod:`distillkit.api.hookspecs`) and ``hookimpl``;
- the component contracts a plugin registers (:class:`Method`,
  :class:`Stage`, :class:`SourceFactory`, :class:`TeacherAdapterFactory`,
  :class:`Divergence`, :class:`Schedule`, :class:`VocabularyAlignment`, :class:`DataFormat`,
  :class:`DatasetSpec`), each declaring its options and their checks;
- the step context a loss receives (:class:`StepContext`);
- the memory footprints components declare for the planner
  (:mod:`distillkit.api.footprints`);
- the data types (:class:`InstructionExample`, :class:`TokenizedExample`,
  :class:`TrainBatch`) and the helpers that build batches;
- the option checks (:func:`require`, :class:`OptionError`) and the cache
  helpers for sources that store what they generate.

Shared loss math on logits is :mod:`distillkit.engine.losses`.
"""

from distillkit import hookimpl
from distillkit.api.batch import (
    CappedEnding,
    ExampleBatch,
    InstructionExample,
    LossTerm,
    PairedBatch,
    ResponseLogits,
    TokenizedExample,
    TopKSignal,
    TrainBatch,
    collate,
    ended_with_eos,
    left_pad,
)
from distillkit.api.components import (
    DataFormat,
    DatasetSpec,
    Divergence,
    DivergenceName,
    GenerationBackend,
    Method,
    NoOptions,
    ParameterGroup,
    PseudoTargetSource,
    Registered,
    Schedule,
    ScheduleName,
    SourceFactory,
    Stage,
    StudentMode,
    TeacherAdapter,
    TeacherAdapterFactory,
    VocabularyAligner,
    VocabularyAlignment,
)
from distillkit.api.context import SamplerRule, StepContext
from distillkit.api.footprints import (
    AdapterFootprint,
    Buffer,
    Logits,
    ModelRole,
    ModelSizes,
    PlanContext,
    SourceFootprint,
    StageFootprint,
)
from distillkit.errors import DistillkitError, OptionError, require
from distillkit.files import cache_root, fingerprint, keyed_generator, write_json_atomic

__all__ = [
    "AdapterFootprint", "Buffer", "Logits", "ModelRole", "ModelSizes", "PlanContext", "SourceFootprint",
    "StageFootprint",
    "CappedEnding", "DataFormat", "DatasetSpec", "DistillkitError", "Divergence", "DivergenceName", "ExampleBatch", "GenerationBackend",
    "InstructionExample", "LossTerm", "Method", "NoOptions", "OptionError", "PairedBatch", "ParameterGroup", "PseudoTargetSource", "Registered", "ResponseLogits", "SamplerRule", "Schedule", "ScheduleName", "SourceFactory",
    "Stage", "StepContext", "StudentMode", "TeacherAdapter", "TeacherAdapterFactory", "TokenizedExample", "TopKSignal", "TrainBatch",
    "VocabularyAligner", "VocabularyAlignment",
    "cache_root", "collate", "ended_with_eos", "fingerprint", "hookimpl", "keyed_generator", "left_pad", "require",
    "write_json_atomic",
]
