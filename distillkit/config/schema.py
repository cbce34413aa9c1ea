"""The recipe schema: typed sections with their own value checks, and
:func:`build`, which turns a plain dict into one of them.

Every key is checked: an unknown key is an error that names the nearest
valid key; a wrong type or value names the key and how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from distillkit.api import Registered
from distillkit.errors import DistillkitError, OptionError, did_you_mean, require


def added_later(default: Any) -> Any:
    """A dataclass field added after the first cached artefacts: left out of
    :meth:`Section.identity` while it holds ``default``, so that caches keyed
    before it existed are still found."""
    return field(default=default, metadata={"added_later": True})


class Section:
    """A recipe section; :meth:`identity` is what cache keys use of it."""

    def identity(self) -> dict[str, Any]:
        """This section as a dict (:func:`to_dict`) without the fields made by
        :func:`added_later` that hold their default."""
        values = to_dict(self)
        for item in dataclasses.fields(self):
            if item.metadata.get("added_later") and values[item.name] == item.default:
                del values[item.name]
        return values


@dataclass
class ModelConfig(Section):
    """Where a model comes from: a local path or hub id (``path``, optionally
    a ``gguf_file`` inside it), or a ``transformers`` config to build a
    randomly initialised model from (``config``, e.g. ``{model_type = "gpt2",
    n_layer = 2}``), or, for the student, ``init_from = "teacher"``: a copy of
    the teacher cut to ``num_layers`` evenly spaced decoder layers (see
    :func:`distillkit.engine.models.shrink_model`).  ``path = "package:NAME"`` is the
    folder of the installed Python package ``NAME`` (found without importing
    it).  A GGUF model is de-quantised once and cached as safetensors.  With
    ``sft`` set, the model is first fine-tuned on the dataset responses with
    those training overrides (cached, reused by every method).

    ``placement`` (the teacher's; independent of the student's layout):
    ``replicate`` keeps a whole copy on every device, ``shard`` splits it
    across the processes like the student (needs an FSDP or DeepSpeed
    ``accelerate`` config), ``offload`` keeps the weights in CPU memory and
    streams each layer to the device for its forward pass."""

    path: str | None = None
    gguf_file: str | None = None
    config: dict[str, Any] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    init_seed: int = 0
    sft: dict[str, Any] | None = None
    init_from: Literal["teacher", None] = added_later(None)
    num_layers: int | None = added_later(None)
    placement: Literal["replicate", "shard", "offload"] = "replicate"


@dataclass
class TokenizerConfig:
    """The shared tokenizer: a local path or hub id (default: the teacher's
    path), or ``train_vocab_size`` to train a byte-level BPE tokenizer of that
    size on the training split (cached)."""

    path: str | None = None
    train_vocab_size: int | None = None


PromptSource = Literal["template", "field"]
"""Where an example's prompt comes from: the Alpaca template or the row's own ``prompt`` field."""
LongPrompts = Literal["drop", "cut_left"]
"""What happens to a prompt over ``max_prompt_length`` tokens: the example is dropped, or the prompt keeps its end."""


@dataclass
class DataConfig(Section):
    """Training data: a registered dataset name, a hub id or a local path.
    ``files`` maps split names to files when ``dataset`` is a folder.

    ``prompt``: the model input is the Alpaca template of the instruction
    and input (``"template"``) or each row's own ``prompt`` field, verbatim
    (``"field"``, e.g. MiniLLM's processed rows; a row without one is an
    error).  ``long_prompts``: a training example whose prompt exceeds
    ``max_prompt_length`` tokens is dropped (``"drop"``, as the references'
    ``tools/process_data_dolly.py`` does) or keeps the prompt's last
    ``max_prompt_length`` tokens (``"cut_left"``); validation and test
    prompts always keep their end, so that every example is scored (see
    docs/fidelity.md, "long prompts")."""

    dataset: str = "dolly"
    format: str = "auto"
    files: dict[str, str] = field(default_factory=dict)
    prompt: PromptSource = added_later("template")
    long_prompts: LongPrompts = added_later("drop")
    max_prompt_length: int = 256
    max_length: int = 512
    train_limit: int = 0
    split_seed: int = 42

    def __post_init__(self) -> None:
        require(self.max_length >= 2, "max_length", "be at least 2", self.max_length)
        require(0 < self.max_prompt_length < self.max_length, "max_prompt_length",
                f"be between 1 and max_length - 1 ({self.max_length - 1})", self.max_prompt_length)
        require(self.train_limit >= 0, "train_limit", "be >= 0 (0: all)", self.train_limit)


@dataclass
class TrainingConfig(Section):
    """Optimisation budget and bookkeeping of one run.  ``batch_size`` is the
    global batch (all processes together), a multiple of the number of
    processes x ``micro_batch_size`` (per process).

    ``group_by_length`` batches examples of similar length (less padding,
    cheaper steps); on the tiny recipe it trained to a worse validation loss
    per step (teacher 5.84 vs 5.54 after 600 steps), so it is off by default.
    ``sort_micro_batches`` sorts each step's examples by length before
    cutting them into micro-batches: the step's examples and its update stay
    the same (it averages over all of the step's response tokens, whatever
    the micro-batches; up to float round-off), with less padding when
    ``micro_batch_size`` is smaller than the batch.  That holds for losses
    that are sums over tokens; where a source samples, or a method takes
    statistics over a micro-batch (MiniLLM's whitening), which rows go
    together changes, and with it their draws or statistics.
    ``on_nonfinite``: a NaN or infinite loss or gradient norm stops the run
    before the update (``"stop"``), keeping the last checkpoint, or skips
    that update (``"skip"``, counted in the trainer state and logged).
    ``keep_checkpoints``: the newest checkpoints kept; resuming falls back
    to an older one when the newest cannot be loaded.

    ``shuffle = false`` feeds the training examples in file order every
    epoch (no permutation; not with ``group_by_length``).  ``optimizer``:
    torch's AdamW as it chooses its implementation (``"adamw"``: a loop over
    the parameters on CPU, ``foreach`` on CUDA), or forced to the
    multi-tensor (``"adamw_foreach"``) or fused kernels (``"adamw_fused"``,
    where torch has them for the parameters' device and dtype); the results
    agree up to float round-off.  ``progress_bar = false`` runs without the
    console progress bar (validation lines are still printed);
    ``final_checkpoint = false`` writes no checkpoint after the last step
    (only those every ``save_every`` steps before it), e.g. for a timed run
    that will not be resumed."""

    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 8
    micro_batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 10
    group_by_length: bool = False
    eval_every: int = 0
    eval_limit: int = 200
    select_by: Literal["rougeL", "loss"] = "rougeL"
    save_every: int = 0
    log_every: int = 10
    on_nonfinite: Literal["stop", "skip"] = "stop"
    keep_checkpoints: int = 2
    shuffle: bool = added_later(True)
    optimizer: Literal["adamw", "adamw_foreach", "adamw_fused"] = added_later("adamw")
    progress_bar: bool = added_later(True)
    final_checkpoint: bool = added_later(True)
    sort_micro_batches: bool = added_later(False)

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, "be >= 1", getattr(self, name))
        for name in ("max_steps", "warmup_steps", "eval_every", "eval_limit", "save_every"):
            require(getattr(self, name) >= 0, name, "be >= 0 (0: the default)", getattr(self, name))
        require(math.isfinite(self.epochs) and self.epochs > 0, "epochs", "be a positive number", self.epochs)
        require(math.isfinite(self.lr) and self.lr >= 0, "lr", "be a finite number >= 0", self.lr)
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "be >= 0",
                self.weight_decay)
        require(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm",
                "be >= 0 (0: no clipping)", self.max_grad_norm)
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
                "be two numbers in [0, 1)", self.adam_betas)
        require(self.shuffle or not self.group_by_length, "group_by_length",
                "be false when shuffle is false (examples in file order)", self.group_by_length)


@dataclass
class GenerationConfig(Section):
    """Sampling settings, the sampler's one settings type
    (:func:`distillkit.engine.sampling.sample`).  The paper's: top-k 0,
    top-p 1.0, temperature 1.0; ``temperature = 0`` is greedy decoding.
    ``max_new_tokens = 0`` means up to ``data.max_length`` in total;
    ``no_repeat_ngram_size`` > 0 bans repeating an n-gram of that many
    tokens (0: off; final evaluation uses ``[eval]``'s); ``batch_size``:
    prompts per sampler call; ``backend``: the registered generation backend
    that draws the samples (:class:`~distillkit.api.GenerationBackend`)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 0
    no_repeat_ngram_size: int = added_later(0)
    batch_size: int = 32
    backend: str = added_later("transformers")

    def __post_init__(self) -> None:
        require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "be >= 0 (0: greedy)",
                self.temperature)
        require(self.top_k >= 0, "top_k", "be >= 0 (0: off)", self.top_k)
        require(0 < self.top_p <= 1, "top_p", "be in (0, 1]", self.top_p)
        require(self.max_new_tokens >= 0, "max_new_tokens", "be >= 0 (0: up to data.max_length)",
                self.max_new_tokens)
        require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "be >= 0 (0: off)",
                self.no_repeat_ngram_size)
        require(self.batch_size >= 1, "batch_size", "be >= 1", self.batch_size)

    def plain_sampling_fixes(self) -> list[str]:
        """The settings to change so that samples follow the model's own
        distribution (temperature 1, no top-k, top-p or n-gram filter), as
        ``"generation.NAME = VALUE"``; empty when they already do."""
        plain = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "no_repeat_ngram_size": 0}
        return [f"generation.{name} = {value!r}" for name, value in plain.items() if getattr(self, name) != value]

    def with_overrides(self, *, max_new_tokens: int | None = None,
                       no_repeat_ngram_size: int | None = None) -> GenerationConfig:
        """These settings with ``max_new_tokens`` and ``no_repeat_ngram_size``
        replaced where given (None keeps this section's), e.g. by ``[eval]``'s."""
        given = {"max_new_tokens": max_new_tokens, "no_repeat_ngram_size": no_repeat_ngram_size}
        return dataclasses.replace(self, **{name: value for name, value in given.items() if value is not None})


@dataclass
class EvalConfig:
    """Final evaluation protocol (ROUGE-L over seeds, as in the paper).

    ``max_new_tokens`` caps evaluation and validation responses; unset, it is
    ``[generation]``'s (the cap of training samples).  The paper recipes set
    it to 0 (up to ``data.max_length`` in total, as the references evaluate)
    while their training samples stop at 256 new tokens."""

    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    no_repeat_ngram_size: int = 6
    limit: int = 0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        require(len(self.seeds) > 0, "seeds", "list at least one seed", self.seeds)
        require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "be >= 0 (0: off)",
                self.no_repeat_ngram_size)
        require(self.limit >= 0, "limit", "be >= 0 (0: all)", self.limit)
        require(self.max_new_tokens is None or self.max_new_tokens >= 0, "max_new_tokens",
                "be >= 0 (0: up to data.max_length) or unset", self.max_new_tokens)


@dataclass
class TeacherSignalConfig(Section):
    """What a method that reads the teacher through
    :meth:`~distillkit.api.StepContext.teacher_signal` gets: the online
    teacher's logits (``top_k = 0``), or its ``top_k`` most likely tokens plus
    one tail bucket, computed once over the source's sequences before
    training (with a progress bar, resumable) and cached, keyed by teacher,
    sequences and k, so another student or method reuses it.  Needs a method
    that declares ``reads_teacher_signal`` and a source whose sequences are
    fixed before training.

    ``alignment``: a registered vocabulary alignment for a teacher with its own
    tokenizer (``teacher_tokenizer``, a local tokenizer folder; default: the
    teacher's ``path``), while ``[tokenizer]`` (or the student's path) is the
    student's; the name is checked when the recipe loads.  The teacher's
    signal over the student's vocabulary, ``top_k`` (> 0) tokens wide, is then
    computed online at every step, never cached; a method that samples from
    the teacher cannot use it, nor ``teacher.sft``."""

    top_k: int = 0
    alignment: str | None = added_later(None)
    teacher_tokenizer: str | None = added_later(None)

    def __post_init__(self) -> None:
        require(self.top_k >= 0, "top_k", "be >= 0 (0: the online teacher)", self.top_k)
        require(self.alignment is None or self.top_k > 0, "top_k",
                "be > 0 with an alignment (the width of the teacher's signal over the student's vocabulary)",
                self.top_k)
        require(self.teacher_tokenizer is None or self.alignment is not None, "teacher_tokenizer",
                "be unset without teacher_signal.alignment (one tokenizer for both)", self.teacher_tokenizer)


@dataclass
class LoggingConfig(Section):
    """Experiment trackers besides ``metrics.jsonl`` (always written).
    ``report_to``: accelerate's trackers (``"tensorboard"``, ``"mlflow"``,
    ``"wandb"``, ``"trackio"``, ...; names and packages are checked when the
    recipe loads).  They get the resolved recipe as hyper-parameters, every
    ``metrics.jsonl`` record and the tokens generated so far, the sampled
    validation responses (a table where the tracker has tables, markdown text
    on TensorBoard) and the run's cost at the end; their files go to the run
    folder's ``trackers/``, MLflow's (unless ``MLFLOW_TRACKING_URI`` is set) to
    a SQLite store there, ``trackers/mlflow.db``.  ``project``: the project or
    experiment (default: the recipe's name); ``run_name``: the run's name
    (default: the method's).  All three may change when a run is resumed."""

    report_to: list[str] = field(default_factory=list)
    project: str | None = None
    run_name: str | None = None


@dataclass
class Recipe:
    """A whole recipe file."""

    name: str = ""
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher_signal: TeacherSignalConfig = field(default_factory=TeacherSignalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- validation --------------------------------------------------------------


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_ok(value, typing.get_args(annotation)[0])
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "None")


Lookup = Callable[[str], Any]
"""A category of registered components by name (``"divergences"`` ->
the registry's category, which has ``require(name, field)``)."""


def _check_registered_names(options: Any, hints: dict[str, Any], lookup: Lookup | None) -> None:
    """Raise :class:`OptionError` for a field marked :class:`~distillkit.api.Registered`
    (defaults included) whose value names no component of its category in ``lookup``."""
    for name, annotation in hints.items():
        if typing.get_origin(annotation) is not Annotated:
            continue
        for marker in typing.get_args(annotation)[1:]:
            if isinstance(marker, Registered):
                if lookup is None:
                    raise TypeError(f"{type(options).__name__}.{name} names a registered component: build it "
                                    "with registered=... (see distillkit.config.assembly)")
                lookup(marker.category).require(getattr(options, name), name)


def option_error(key: str, error: OptionError) -> DistillkitError:
    """The one-line error of an option check that failed on recipe ``key``."""
    return DistillkitError(f"'{key}' {error.problem}; change it in the recipe or with --set {key}=...")


def build(cls: type, data: dict[str, Any], where: str, keys: dict[str, str] | None = None,
          registered: Lookup | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types
    raise :class:`DistillkitError` naming the key (``where.key``, or
    ``keys[key]`` for a field that another recipe key sets, such as a
    source option set by a method option).  Fields marked
    :class:`~distillkit.api.Registered` are checked in ``registered``."""
    if not isinstance(data, dict):
        raise DistillkitError(f"'{where}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    keys = keys or {}
    kwargs = {}
    for key, value in data.items():
        path = keys.get(key) or (f"{where}.{key}" if where else key)
        if key not in names:
            raise DistillkitError(
                f"unknown key '{path}'{did_you_mean(key, names)}; valid keys here: {', '.join(names)}"
            )
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = build(annotation, value, path)
        elif _type_ok(value, annotation):
            kwargs[key] = float(value) if annotation is float else value
        else:
            raise DistillkitError(f"'{path}' must be {_describe(annotation)}, got {value!r}")
    try:
        built = cls(**kwargs)
        _check_registered_names(built, hints, registered)
        return built
    except OptionError as err:  # the dataclass's own checks
        raise option_error(keys.get(err.field) or (f"{where}.{err.field}" if where else err.field), err) from None
    except ValueError as err:
        raise DistillkitError(f"'{where}': {err}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, table by table (copies; neither input changes)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
