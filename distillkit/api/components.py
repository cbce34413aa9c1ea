"""The component types that plugins register (see :mod:`distillkit.api.hookspecs`).

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``N`` masked
(response) tokens.  Every token-level loss is averaged over response tokens
only; the trainer rescales micro-batch means so that gradient accumulation
averages over all response tokens of the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from distillkit.errors import DistillkitError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from distillkit.api.batch import ExampleBatch, InstructionExample, TopKSignal, TrainBatch
    from distillkit.api.context import StepContext
    from distillkit.api.footprints import AdapterFootprint, PlanContext, SourceFootprint, StageFootprint
    from distillkit.config.assembly import RunConfig


@dataclass(frozen=True)
class Registered:
    """Marks an option whose value names a registered component of
    ``category`` (a :class:`~distillkit.registry.Registry` attribute): the
    run assembly checks the value, default included, against the registry,
    e.g. ``divergence: Annotated[str, Registered("divergences")]``."""

    category: Literal["methods", "sources", "teacher_adapters", "divergences", "schedules", "alignments",
                      "data_formats", "datasets"]


DivergenceName = Annotated[str, Registered("divergences")]
"""An option naming a registered divergence."""
ScheduleName = Annotated[str, Registered("schedules")]
"""An option naming a registered schedule."""


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that has no hyper-parameters of its own."""


ParameterGroup = Literal["student", "teacher_adapter"]
"""What a stage trains: the student's weights, or the teacher adapter's
parameters (a soft prompt, LoRA); each group has its own optimizer and
learning-rate schedule."""

StudentMode = Literal["train", "eval"]
"""The student's module mode during a stage: ``"train"`` (dropout on) or ``"eval"``."""


@dataclass(frozen=True)
class Stage:
    """One parameter update inside a training step.

    ``trains`` is the parameter group the stage updates.  ``loss(run,
    batch)`` receives the :class:`~distillkit.api.StepContext` and a
    micro-batch and returns a dict of scalar tensors whose ``"loss"`` entry
    is back-propagated (a mean over the micro-batch's response tokens); the
    other entries are logged.  ``student_mode`` puts the student in train or
    eval mode for the stage (MiniLLM's update runs in eval mode); a callable
    receives the method's options and returns the mode (e.g. GKD's
    ``student_dropout`` option).  ``footprint(plan, options)`` declares what
    the stage holds beyond the core's logits copies, for the memory planner
    (:class:`~distillkit.api.StageFootprint`; ``options``: the method's).
    """

    trains: ParameterGroup
    loss: Callable[[StepContext, TrainBatch], dict[str, torch.Tensor]]
    student_mode: StudentMode | Callable[[Any], StudentMode] = "train"
    footprint: Callable[[PlanContext, Any], StageFootprint] | None = None

    def student_mode_for(self, options: Any) -> StudentMode:
        """The student's mode in this stage under the method's ``options``."""
        return self.student_mode(options) if callable(self.student_mode) else self.student_mode


@dataclass(frozen=True)
class Method:
    """A distillation method: a named composition of the four hook points.

    Per optimizer step the trainer draws dataset examples, turns them into a
    training batch with the ``source``, then runs each ``stage`` in order
    (all micro-batches, then one optimizer step of that stage's parameters).

    - ``source``: name of a registered pseudo-target source;
      ``source_options(opts)`` gives its keyword arguments.
    - ``teacher_adapter``: name of a registered teacher adapter, or ``None``
      when the method uses no teacher (SFT); ``teacher_adapter_options(opts)``
      gives its keyword arguments.
    - ``options``: a frozen dataclass of hyper-parameters, set by a recipe's
      ``[methods.NAME]`` section and checked when the run is assembled (its
      ``__post_init__`` raises through :func:`~distillkit.api.require`;
      fields typed :data:`DivergenceName` / :data:`ScheduleName` must name
      registered components); the run exposes it as ``run.options``.
    - ``student_init``: ``"pretrained"`` starts from the recipe's student,
      ``"sft"`` from its supervised fine-tuned checkpoint (prepared and cached).
    - ``schedules``: the schedules with state (:class:`Schedule`) its losses
      evaluate; their states are checkpointed with the run.
    - ``after_step(run, logs)``: called in every process after each optimizer
      step (``run.step`` = k, 1..K), after the stateful schedules' updates and
      before the step's logging, validation and checkpoint; ``logs``: the
      step's logged values (the same in every process), to which it may add
      entries that are then logged too; returns None.  State it keeps must
      live in a checkpointed part (a stateful schedule, the teacher adapter's
      ``checkpoint_modules()``, the source's ``state_dict()``).  A method
      field rather than a hook, so that it runs only in the runs of its method.
    - ``reads_teacher_signal``: its losses compare the student with the teacher
      only through ``run.teacher_signal(batch)`` and a divergence at
      temperature 1 (on the source's batches; other views may use
      ``teacher_logits``), so ``[teacher_signal] top_k`` can stand a cached
      top-k signal in for the teacher's logits.

    A stage's optimizer uses ``training.lr`` unless the options define
    ``<group>_lr`` (e.g. ``teacher_adapter_lr``) with a value that is not None.
    """

    name: str
    description: str
    stages: tuple[Stage, ...]
    source: str
    teacher_adapter: str | None
    options: type = NoOptions
    source_options: Callable[[Any], dict[str, Any]] = field(default=lambda opts: {})
    teacher_adapter_options: Callable[[Any], dict[str, Any]] = field(default=lambda opts: {})
    student_init: Literal["pretrained", "sft"] = "pretrained"
    schedules: tuple[str, ...] = ()
    after_step: Callable[[StepContext, dict[str, float]], None] | None = None
    reads_teacher_signal: bool = False


@dataclass(frozen=True)
class Divergence:
    """A token-level divergence between a trainable and a target distribution.

    ``per_token(trainable_logp, target_logp, **params)`` receives fp32
    log-probabilities of shape ``(N, V)`` (already temperature-scaled and
    log-softmaxed) and returns the divergence per row, shape ``(N,)``, in nats.
    ``params`` are the divergence's own parameters (e.g. ``beta``) with their
    defaults.  Chunking, masking and averaging are done by the core
    (:func:`distillkit.engine.losses.masked_divergence`).

    ``gradient`` (optional), the closed form: ``gradient(trainable_logp,
    target_logp, **params)`` returns ``(values (N,), grad (N, V))``, the
    values of ``per_token`` and the gradient of each row's value with
    respect to the trainable *logits* (before the log-softmax, at
    temperature 1).  The core uses it, instead of autograd through
    ``per_token``, for averaged losses when both inputs are finite.
    """

    name: str
    description: str
    per_token: Callable[..., torch.Tensor]
    params: dict[str, float] = field(default_factory=dict)
    gradient: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


class VocabularyAligner(Protocol):
    """A teacher with its own tokenizer, seen over the student's vocabulary (built once per run).

    ``teacher_view(batch)``: the student batch (B, T_s) re-tokenized for the teacher, a
    :class:`~distillkit.api.TrainBatch` (B, T_t), and ``alignment`` (B, T_s - 1) int64: the teacher label
    position of each student label position, -1 where none.  ``signal(teacher_logits, alignment, k)``: the
    teacher's logits of that view (B, T_t - 1, V_t) as a :class:`~distillkit.api.TopKSignal` over the student's
    vocabulary (B, T_s - 1, <= k) with ``valid`` (alignment >= 0).
    """

    def teacher_view(self, batch: TrainBatch) -> tuple[TrainBatch, torch.Tensor]: ...

    def signal(self, teacher_logits: torch.Tensor, alignment: torch.Tensor, k: int) -> TopKSignal: ...


@dataclass(frozen=True)
class GenerationBackend:
    """A sampler implementation (``[generation] backend = NAME``), used for every sample a run or an
    evaluation draws.

    ``sample(model, prompts, settings, **keywords)`` has the signature and the contract of
    :func:`distillkit.engine.sampling.sample` (the ``transformers`` backend, the reference): one response
    per prompt, through the first EOS, with the same keywords (``row_keys``, ``prefix_embeds``,
    ``guide_model`` and ``rule``, ``max_length``, ``capped_ending``, ``batch_size``, ``progress``, ...).  ``unavailable()`` gives None, or
    the one-line reason this backend cannot run here (a missing extra or device), which a recipe that picks
    it gets when the run is assembled, before any model is loaded.
    """

    name: str
    description: str
    sample: Callable[..., list[list[int]]]
    unavailable: Callable[[], str | None] = lambda: None


@dataclass(frozen=True)
class VocabularyAlignment:
    """A named way to pair a teacher with another tokenizer than the student's
    (``[teacher_signal] alignment = NAME``): ``build(teacher_tokenizer,
    student_tokenizer)`` returns a :class:`VocabularyAligner`, once per run."""

    name: str
    description: str
    build: Callable[[Any, Any], VocabularyAligner]


@dataclass(frozen=True)
class Schedule:
    """A coefficient schedule ``value(k, K, **params) -> float``.

    ``k`` is the optimizer step being taken, 1..K (the algorithm boxes'
    count), ``K`` the total; ``value(0, K)`` is the value before training.

    A schedule with state (e.g. TAID's adaptive t) sets both ``initial_state``
    and ``update``:

    - ``initial_state(**params)``: its state before training, a dict of
      numbers and tensors (checkpointed with the run as safetensors + JSON);
    - ``value(k, K, state, **params)`` then also receives the current state;
    - ``update(state, k, K, logs, **params) -> state``: called in every
      process after each optimizer step k = 1..K, with ``logs`` the values
      the step logged (the stage terms, e.g. ``"loss"``, averaged over the
      global batch, so the same in every process; a multi-stage method's as
      ``"GROUP/name"``), before the step's logging, validation and checkpoint.

    The run keeps one state per schedule name, created at its first
    evaluation; a method whose losses evaluate one declares it in
    ``Method.schedules``.
    """

    name: str
    description: str
    value: Callable[..., float]
    params: dict[str, float] = field(default_factory=dict)
    initial_state: Callable[..., dict[str, Any]] | None = None
    update: Callable[..., dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if (self.initial_state is None) != (self.update is None):
            raise DistillkitError(f"schedule '{self.name}' sets only one of initial_state and update; "
                                  "a schedule with state sets both")

    @property
    def stateful(self) -> bool:
        """Whether the schedule keeps state across steps."""
        return self.update is not None


class PseudoTargetSource(Protocol):
    """Turns dataset examples into a teacher-forcing batch ``[x ‖ y]``.

    A source with state (e.g. a rollout buffer) also defines ``state_dict()``
    and ``load_state_dict(state)``; the trainer then checkpoints it.
    """

    def __call__(self, examples: ExampleBatch) -> TrainBatch: ...


class TeacherAdapter(Protocol):
    """The teacher as a run sees it.

    ``logits(batch, grad=False, adapted=True)`` returns next-token logits of
    shape ``(B, T-1, V)`` aligned with ``batch.labels`` (virtual prompt
    positions already dropped); ``adapted=False`` gives the plain teacher.
    ``trainable_parameters()`` lists what the adapter trains (empty for a
    frozen teacher); the base teacher never trains.  ``sampling_inputs()``
    gives the model to sample from and embeddings to prepend (or None).
    ``extra_positions`` is how many positions it prepends to every sequence
    (a soft prompt's length; samples are capped to leave room for them).
    Optional: ``checkpoint_modules()`` (objects with ``state_dict``) and
    ``save(folder)`` for adapters with trainable state (in peft's adapter
    format, so that ``PeftModel.from_pretrained(teacher, folder)`` loads it).
    """

    extra_positions: int

    def logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def sampling_inputs(self) -> tuple[torch.nn.Module, torch.Tensor | None]: ...


@dataclass(frozen=True)
class SourceFactory:
    """A named pseudo-target source; ``build(run, **options)`` makes it.

    - ``options``: the frozen dataclass of the keyword options ``build``
      takes (their defaults, and ``__post_init__`` checks through
      :func:`~distillkit.api.require`).  The run assembly builds it from
      ``method.source_options(method_options)`` when the recipe loads, so a
      bad value is an error naming the method's recipe key before any model
      loads.
    - ``check(config, options)``: checks the options against the rest of the
      run (the :class:`~distillkit.config.RunConfig`) when the run is
      assembled, raising :class:`~distillkit.api.OptionError` (through
      ``require``, naming the option) or :class:`~distillkit.api.DistillkitError`.
    - ``footprint(plan, options)``: what the source holds, for the memory
      planner (:class:`~distillkit.api.SourceFootprint`); None: nothing.
    - ``fixed_view(run, **options)``: for a source whose batches (their
      primary view, for a :class:`~distillkit.api.PairedBatch`) depend only
      on the examples, not on the student, the step or the randomness:
      builds a source of just those views, over which the teacher's top-k
      signal is computed once (``[teacher_signal] top_k``); None: the
      source makes its sequences during training.
    """

    name: str
    description: str
    build: Callable[..., PseudoTargetSource]
    options: type = NoOptions
    check: Callable[[RunConfig, Any], None] | None = None
    footprint: Callable[[PlanContext, Any], SourceFootprint] | None = None
    fixed_view: Callable[..., PseudoTargetSource] | None = None


@dataclass(frozen=True)
class TeacherAdapterFactory:
    """A named teacher adapter; ``build(teacher, run, **options)`` wraps the
    loaded teacher model for a run (``run``: the :class:`~distillkit.api.StepContext`).

    ``options``, ``check`` and ``footprint`` as for :class:`SourceFactory`
    (``method.teacher_adapter_options`` gives the options; the footprint is
    an :class:`~distillkit.api.AdapterFootprint`).
    """

    name: str
    description: str
    build: Callable[..., TeacherAdapter]
    options: type = NoOptions
    check: Callable[[RunConfig, Any], None] | None = None
    footprint: Callable[[PlanContext, Any], AdapterFootprint] | None = None


@dataclass(frozen=True)
class DataFormat:
    """A row format: ``to_example(row, origin)`` maps one raw row to an
    :class:`InstructionExample` (or to a list of them, for a row holding
    several instances, such as an S-NI task file), raising ``ValueError`` with
    a one-line reason for a malformed row.  ``fields`` are the columns that
    identify the format (used by ``format = "auto"``)."""

    name: str
    description: str
    fields: frozenset[str]
    to_example: Callable[[dict[str, Any], str], InstructionExample | list[InstructionExample]]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset.

    ``location`` is a hub id or folder name, looked up first under
    ``DISTILLKIT_DATA_DIR``.  ``files`` maps split names (``train``,
    ``validation``, ``test``) to files inside the folder.  A dataset with a
    single file (``split_sizes`` set) is split reproducibly by seed into
    validation/test sizes, the rest being train.

    - ``read(path)`` yields the raw ``(row, origin)`` pairs of a split file
      (default: JSONL/JSON/parquet rows); set it for a split that spans
      files, e.g. questions joined with their answers by id.
    - ``min_reference_tokens``: evaluation keeps only examples whose first
      reference has at least this many tokens (counted with the evaluated
      model's tokenizer; the paper's S-NI and UnNI filter is 11 GPT-2 tokens).
    - ``missing_reason``: why the files may be absent (e.g. not obtainable
      offline); while they are not found, loading fails with this reason and
      evaluation reports the set as missing instead of scoring it.
    """

    name: str
    description: str
    location: str
    format: str
    files: dict[str, str] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    missing_reason: str = ""
    read: Callable[[Path], Iterator[tuple[dict[str, Any], str]]] | None = None
    min_reference_tokens: int = 0
