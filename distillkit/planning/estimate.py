"""The memory planner (``distillkit train --dry-run``): per-device memory of a
training run from model configs alone.  No weights are loaded, nothing is
downloaded and nothing trains.

**Model configs**, first found: the recipe's ``config`` table (sized by the
recipe tokenizer); a local folder's ``config.json``, a ``package:NAME`` folder
or a GGUF header (the de-quantised cache's ``config.json`` once it exists); the
Hugging Face cache (``local_files_only``); the snapshot
``model_configs/<org>--<name>.json`` in a registered recipe folder (plugins add
theirs).  Parameters are counted on the meta device, and the logits have the
config's ``vocab_size`` columns (padding such as OPT's 50272 included).

**Layout** (:class:`Layout`): an ``accelerate`` config file, else the
environment of ``accelerate launch``, else one device; N processes.  FSDP and
DeepSpeed configs plan for GPUs; DDP-style configs (``MULTI_GPU``) for CPU
processes when this machine has no CUDA device, as distillkit then runs them.

**Rows** per process, in MiB; P parameters, b bytes per value:

- teacher weights: P b in the recipe's dtype.  ``placement = "shard"`` (FSDP
  layouts only, as in the trainer): P b / N plus the gathered units
  (embeddings, head and two decoder layers); ``"offload"`` on GPUs: CPU RAM,
  with the embeddings, head and one layer on the device at a time.
- student weights: P b, / N under FSDP full shard and ZeRO-3 (plus the gathered
  units in the compute dtype), on CPU with parameter offload.  DeepSpeed with
  bf16/fp16 holds 16-bit weights and keeps an fp32 master copy with AdamW.
- gradients: the weights' dtype; / N under FSDP, ZeRO-2 and ZeRO-3; DDP adds
  its bucket copy (``gradient_as_bucket_view`` is off by default).
- AdamW: two moments in the weights' dtype (``torch.optim.AdamW`` keeps them
  like the parameter: 8 B per fp32 parameter), 12 B (master + moments) under
  DeepSpeed mixed precision; / N when sharded (FSDP, ZeRO-1/2/3); in CPU RAM
  with optimizer offload (DeepSpeed's CPU Adam also keeps fp32 gradients there).
- trainable adapter: the soft prompt (m x d, fp32) or LoRA matrices, with
  gradients and AdamW (16 B per value).
- activations of a micro-batch (``training.micro_batch_size`` sequences of
  ``data.max_length`` tokens, fewer when a process's 1/N share of
  ``training.batch_size`` is smaller) through each model carrying
  gradients: the student; the teacher in a stage training its adapter (a soft
  prompt sends gradients through the frozen teacher, m more positions).
  Bytes per token are ``L (c_h h + c_kv kv + c_f f + 32 + 4 T) + c_b h`` for
  hidden size h, feed-forward size f, L layers and T positions.  kv is the
  width of K and V as attention sees them, heads x head size: transformers
  repeats grouped K/V to every head whenever a padding mask is passed, as the
  trainer always does; 4 T is the row of the float attention mask that each
  layer keeps (2 T with 16-bit weights).  The coefficients, "c_h h + c_kv kv +
  c_f f, c_b h":

  ====================  ===============  ===================  ==============
  family, weights       fp32             bf16 autocast        16-bit weights
  ====================  ===============  ===================  ==============
  gpt2, trained         40h + 20f, 8h    24h + 10f, 6h        20h + 10f, 4h
  gpt2, frozen          32h + 16f, 4h    20h + 8f, 4h         16h + 8f, 2h
  opt, trained          32h + 4f, 8h     24h + 2f, 6h         16h + 2f, 4h
  opt, frozen           24h + 4f, 4h     16h + 2f, 4h         12h + 2f, 2h
  llama, trained        32h+8kv+16f, 12h 30h+4kv+8f, 10h      20h+4kv+8f, 8h
  llama, frozen         16h+8kv+12f, 4h  12h+4kv+6f, 4h       12h+4kv+6f, 4h
  ====================  ===============  ===================  ==============

  (per layer, then c_b h once per model; "frozen": weights without gradients,
  gradient to the inputs only).  They were measured by counting the bytes of
  the distinct tensors that a forward pass saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``) in tiny GPT-2, OPT and Llama
  models built from config with SDPA attention (PyTorch 2.13, transformers 5;
  exact to 5 B per token and layer; the mask term with padded batches); model
  types other than GPT-2 and OPT use the Llama (gated MLP) row.  Dropout in
  train mode adds its masks: 2h per layer and h once for residual/embedding
  dropout (1 B per value on CUDA, the activation's bytes on CPU), and on CPU,
  where attention dropout falls back to the math kernel, ``8 heads T`` bytes
  per token and layer for the attention probabilities and mask.
- logits: (B, T, V) fp32 copies, response-position rows (N, V) and the chunked
  loss's rows (``min(N, 1024)``, V), counted at a stage's peak as measured
  with the PyTorch profiler on the tiny recipe: 2 full copies for a teacher-free
  stage; 2 full, 3 gathered and 6 chunk copies for a student stage with a
  teacher (KD: 2/3/5, GKD: 2/2/6); 3/4/5 for a stage training the teacher
  adapter (PromptKD's prompt step); MiniLLM's stage also holds its LM batch
  (+2 full, +3 gathered, two student graphs).  The planner takes N = B T
  (every position a response token).
- KV cache while sampling (sources ``student``, ``teacher``, ``mixture``:
  one micro-batch; ``rollouts``, ``teacher_cache``: ``generation.batch_size``):
  ``batch x length x L x 2 kv`` values per sampling model, in its compute
  dtype; MiniLLM's rollouts sample from both models and score each chunk (2
  full and 3 gathered logits copies).  Its rollout buffer keeps the teacher's
  response logits of the process's share of the rollouts in CPU RAM
  (``keep_teacher_logits``).
- optimizer step: on CUDA the foreach AdamW makes one temporary of the
  student's (local) parameters, in fp32 for DeepSpeed's master copy.

The peak is the rows held throughout (weights, AdamW, adapter, buffer) plus
the largest phase: sampling, a stage's forward/backward (with its gradients),
or the optimizer step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distillkit.config import ModelConfig, Recipe, load_recipe, recipe_dir_files, resolve_run
from distillkit.engine.layout import Layout, accelerate_config_files, layout_from_config, resolve_layout, shown_path
from distillkit.errors import DistillkitError
from distillkit.registry import registry

MiB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAMPLING_SOURCES = {"student", "teacher", "mixture", "rollouts", "teacher_cache"}
INPUT_GRAD_ADAPTERS = {"soft_prompt"}  # gradients reach the teacher's inputs, not its weights
FORWARD_BACKWARD, OPTIMIZER_STEP, SAMPLING = "fwd/bwd", "optimizer step", "sampling"
LAYER_CONSTANT = 32  # bytes per token and layer: normalisation statistics, attention log-sum-exp

# family -> (trained, frozen) -> precision -> (c_h, c_kv, c_f, c_b): see the module docstring
ACTIVATION_COEFFICIENTS: dict[str, dict[bool, dict[str, tuple[int, int, int, int]]]] = {
    "gpt2": {True: {"fp32": (40, 0, 20, 8), "autocast": (24, 0, 10, 6), "half": (20, 0, 10, 4)},
             False: {"fp32": (32, 0, 16, 4), "autocast": (20, 0, 8, 4), "half": (16, 0, 8, 2)}},
    "opt": {True: {"fp32": (32, 0, 4, 8), "autocast": (24, 0, 2, 6), "half": (16, 0, 2, 4)},
            False: {"fp32": (24, 0, 4, 4), "autocast": (16, 0, 2, 4), "half": (12, 0, 2, 2)}},
    "llama": {True: {"fp32": (32, 8, 16, 12), "autocast": (30, 4, 8, 10), "half": (20, 4, 8, 8)},
              False: {"fp32": (16, 8, 12, 4), "autocast": (12, 4, 6, 4), "half": (12, 4, 6, 4)}},
}


# --- model configs and shapes --------------------------------------------------------


def snapshot_name(path: str) -> str:
    """The file name of a hub id's shipped config snapshot: ``facebook/opt-13b`` -> ``facebook--opt-13b.json``."""
    return path.strip("/").replace("/", "--") + ".json"


def _config_from_dict(settings: dict[str, Any], where: str) -> Any:
    from transformers import AutoConfig

    settings = dict(settings)
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise DistillkitError(f"model config {where} has no model_type; copy the model's config.json there")
    try:
        return AutoConfig.for_model(model_type, **settings)
    except (ValueError, KeyError) as error:
        raise DistillkitError(f"model config {where}: {str(error).splitlines()[0]}") from None


@functools.lru_cache(maxsize=8)
def _gguf_config(folder: str, gguf_file: str, role: str) -> Any:
    """The config in a GGUF file's header (read once per process: seconds)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    except ImportError:
        raise DistillkitError(f"reading the {role}'s GGUF header needs the gguf package: pip install gguf") from None
    except (OSError, ValueError) as error:
        raise DistillkitError(f"cannot read the {role}'s GGUF file '{gguf_file}' in {folder}: "
                              f"{str(error).splitlines()[0]}") from None


def path_config(spec: ModelConfig, role: str) -> tuple[Any, str]:
    """(transformers config, where it came from) of a path-loaded model, offline."""
    from transformers import AutoConfig

    from distillkit.engine.models import cached_gguf_folder, check_local_path, resolve_path

    folder = resolve_path(spec.path)
    if spec.gguf_file is not None:
        cached = cached_gguf_folder(spec.path, spec.gguf_file)
        if cached is not None:
            return AutoConfig.from_pretrained(cached), f"{cached}/config.json"
        return _gguf_config(folder, spec.gguf_file, role), f"{spec.gguf_file} header"
    if Path(folder).is_dir():
        if not (Path(folder) / "config.json").is_file():
            raise DistillkitError(f"the {role} folder {folder} has no config.json")
        return AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code), f"{folder}/config.json"
    check_local_path(folder, f"{role}.path")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=spec.trust_remote_code)
        return config, "Hugging Face cache"
    except (OSError, ValueError):
        pass
    name = snapshot_name(folder)
    snapshot = recipe_dir_files("model_configs/*.json").get(name.removesuffix(".json"))
    if snapshot is not None:
        return _config_from_dict(json.loads(snapshot.read_text()), str(snapshot)), f"model_configs/{name}"
    raise DistillkitError(f"no config for the {role} model '{spec.path}' offline: add its config.json as "
                          f"recipes/model_configs/{name} (or in a plugin's recipe folder), or download it with "
                          f"`huggingface-cli download {spec.path} config.json`")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of one model: parameter counts, sizes, the
    activation family and the bytes of its weights (``dtype``)."""

    parameters: int
    layer_parameters: int  # one decoder layer
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_width: int  # key/value heads x head size (the KV cache)
    attention_width: int  # attention heads x head size (K and V as attention sees them)
    vocab: int
    family: str
    dtype_bytes: int
    residual_dropout: float
    attention_dropout: float
    source: str

    @property
    def outer_parameters(self) -> int:
        """Embeddings, final norm and head: everything outside the decoder layers."""
        return self.parameters - self.layers * self.layer_parameters

    def cut(self, layers: int) -> ModelShape:
        """This model with ``layers`` of its decoder layers (a student cut from the teacher)."""
        if not 1 <= layers <= self.layers:
            raise DistillkitError(f"num_layers must be between 1 and the teacher's {self.layers} layers, got {layers}")
        return dataclasses.replace(self, layers=layers,
                                   parameters=self.parameters - (self.layers - layers) * self.layer_parameters)


def _family(config: Any) -> str:
    if config.model_type in ACTIVATION_COEFFICIENTS:
        return config.model_type
    return "llama" if getattr(config, "intermediate_size", None) else "gpt2"


@functools.lru_cache(maxsize=32)
def _meta_counts(config_json: str) -> tuple[int, int, int]:
    """(parameters, parameters of one decoder layer, layers) of a config, counted
    on the meta device (tied embeddings once); cached by the config's JSON."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from distillkit.engine.models import decoder_layers

    settings = json.loads(config_json)
    config = _config_from_dict(settings, "")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    try:
        layers = decoder_layers(model)[1]
    except DistillkitError:  # another decoder layout: its longest module list
        layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in layers[0].parameters()), len(layers)


def shape_of(config: Any, dtype: str, source: str) -> ModelShape:
    """The shape of a transformers ``config`` whose weights are ``dtype``."""
    total, per_layer, layers = _meta_counts(config.to_json_string(use_diff=False))
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or hidden // heads
    ffn = next((v for v in (getattr(config, k, None) for k in ("intermediate_size", "ffn_dim", "n_inner")) if v),
               4 * hidden)
    residual = getattr(config, "resid_pdrop", None)
    if residual is None:
        residual = getattr(config, "dropout", 0.0) if config.model_type == "opt" else 0.0
    attention = getattr(config, "attn_pdrop", None) or getattr(config, "attention_dropout", 0.0) or 0.0
    if dtype == "auto":
        config_dtype = getattr(config, "dtype", None)
        dtype = str(config_dtype).removeprefix("torch.") if config_dtype is not None else "float32"
    return ModelShape(total, per_layer, layers, hidden, ffn, heads,
                      (getattr(config, "num_key_value_heads", None) or heads) * head_size, heads * head_size,
                      config.vocab_size,
                      _family(config), DTYPE_BYTES.get(dtype, 4), float(residual or 0.0), float(attention),
                      source)


def model_shape(recipe: Recipe, role: str, tokenizer: Any = None) -> ModelShape:
    """The shape of the recipe's ``role`` model; ``tokenizer`` (the recipe's)
    is needed only by models built from a ``config`` table."""
    from distillkit.engine.models import config_from_recipe

    spec: ModelConfig = getattr(recipe, role)
    if spec.init_from is not None:
        if role != "student" or recipe.teacher.init_from is not None:
            raise DistillkitError(f"'{role}.init_from' is for the student only (a student cut from the teacher)")
        as_student = dataclasses.replace(recipe.teacher, dtype=spec.dtype)
        teacher = model_shape(dataclasses.replace(recipe, teacher=as_student), "teacher", tokenizer)
        cut = teacher.cut(spec.num_layers if spec.num_layers is not None else teacher.layers)
        return dataclasses.replace(cut, source=f"teacher's ({teacher.source}), {cut.layers} layers")
    if spec.config is not None:
        if tokenizer is None:
            from distillkit.data.prepare import recipe_tokenizer

            tokenizer = recipe_tokenizer(recipe)[0]
        return shape_of(config_from_recipe(spec, tokenizer, role), spec.dtype, "recipe config")
    if spec.path is None:
        raise DistillkitError(f"{role}: set exactly one of '{role}.path', '{role}.config' or '{role}.init_from'")
    config, source = path_config(spec, role)
    return shape_of(config, spec.dtype, source)


# --- the estimate ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the plan: ``when`` is "always" or the phase it belongs to."""

    name: str
    when: str
    device: float  # MiB per process
    cpu: float = 0.0  # MiB of CPU RAM per process
    note: str = ""


@dataclass
class Plan:
    """The per-process estimate of one method on one recipe and layout."""

    recipe: str
    method: str
    layout: Layout
    precision: str
    teacher: ModelShape | None
    student: ModelShape
    placement: str
    rows: list[Row] = field(default_factory=list)
    peak_stage: str = ""  # the stage whose forward/backward rows are shown

    def _sum(self, when: str, column: str) -> float:
        return sum(getattr(r, column) for r in self.rows if r.when == when)

    def phases(self) -> list[str]:
        return list(dict.fromkeys(r.when for r in self.rows if r.when != "always"))

    def peak_phase(self, column: str = "device") -> str:
        return max(self.phases(), key=lambda phase: self._sum(phase, column), default="always")

    def total(self, column: str = "device") -> float:
        """MiB per process at the peak of ``column``: rows held always plus the largest phase."""
        return self._sum("always", column) + max((self._sum(p, column) for p in self.phases()), default=0.0)

    def needed(self) -> float:
        """MiB the verdict compares: one device's peak, or on CPU layouts the
        RAM of all processes of a machine (device and offloaded rows alike)."""
        if self.layout.device == "cpu":
            return (self.total("device") + self.total("cpu")) * self.layout.per_machine
        return self.total("device")

    def cpu_ram(self) -> float:
        """MiB of CPU RAM per machine for what a GPU layout offloads."""
        return 0.0 if self.layout.device == "cpu" else self.total("cpu") * self.layout.per_machine


def _count(n: float) -> str:
    """124.4M, 12.85B: a parameter count for the notes."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def activation_bytes_per_token(shape: ModelShape, *, trained: bool, precision: str, dropout: bool,
                               device: str, sequence: int) -> float:
    """Bytes saved for backward per token of a forward pass through ``shape``
    (the formula of the module docstring); ``precision`` is "fp32",
    "autocast" or "half"."""
    c_h, c_kv, c_f, c_b = ACTIVATION_COEFFICIENTS[shape.family][trained][precision]
    mask_bytes = 2 if precision == "half" else 4
    layer = c_h * shape.hidden + c_kv * shape.attention_width + c_f * shape.ffn + LAYER_CONSTANT
    layer += mask_bytes * sequence
    base = c_b * shape.hidden
    if dropout:
        mask = 1 if device == "cuda" else (4 if precision == "fp32" else 2)
        if shape.residual_dropout > 0:
            layer += 2 * shape.hidden * mask
            base += shape.hidden * mask
        if shape.attention_dropout > 0 and device == "cpu":
            layer += 8 * shape.heads * sequence
    return shape.layers * layer + base


def _activation_precision(shape: ModelShape, autocast: bool) -> str:
    if shape.dtype_bytes == 2:
        return "half"
    return "autocast" if autocast else "fp32"


def _adapter_options(method: Any, options: Any) -> dict[str, Any]:
    """The teacher adapter's keyword arguments, its defaults filled in."""
    factory = registry().teacher_adapters[method.teacher_adapter]
    defaults = {name: p.default for name, p in inspect.signature(factory.build).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **method.teacher_adapter_options(options)}


def _lora_parameters(recipe: Recipe, rank: int, targets: list[str] | None, tokenizer: Any) -> int:
    """r (in + out) summed over the teacher's LoRA target linear layers."""
    from accelerate import init_empty_weights
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from distillkit.engine.models import config_from_recipe

    spec = recipe.teacher
    config = config_from_recipe(spec, tokenizer, "teacher") if spec.config else path_config(spec, "teacher")[0]
    targets = targets or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type, [])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    count = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, (torch.nn.Linear, Conv1D)):
            count += rank * sum(module.weight.shape)
    return count


def _logits_copies(stage_trains: str, has_teacher: bool, rollouts: bool) -> tuple[int, int, int, int]:
    """(full, gathered, chunk copies, student graphs) a stage holds at its peak (module docstring)."""
    if stage_trains != "student":
        return 3, 4, 5, 0
    if not has_teacher:
        return 2, 0, 0, 1
    if rollouts:
        return 4, 6, 6, 2
    return 2, 3, 6, 1


def _teacher_row(teacher: ModelShape, placement: str, layout: Layout) -> Row:
    size = teacher.parameters * teacher.dtype_bytes / MiB
    what = f"{_count(teacher.parameters)} x {teacher.dtype_bytes} B"
    if placement == "shard":
        if not layout.kind.startswith("fsdp"):
            raise DistillkitError(f"teacher.placement = 'shard' needs an FSDP layout (--accelerate-config fsdp); with "
                                  f"this {layout.kind} layout use 'replicate' or 'offload'")
        gathered = (teacher.outer_parameters + 2 * teacher.layer_parameters) * teacher.dtype_bytes / MiB
        return Row("teacher weights", "always", size / layout.processes + gathered, 0.0,
                   f"{what} / {layout.processes} + gathered layers")
    if placement == "offload" and layout.device == "cuda":
        streamed = (teacher.outer_parameters + teacher.layer_parameters) * teacher.dtype_bytes / MiB
        return Row("teacher weights", "always", streamed, size, f"{what} in CPU RAM; one layer at a time on the device")
    return Row("teacher weights", "always", size, 0.0, what)


def _student_rows(student: ModelShape, layout: Layout, autocast: bool) -> tuple[list[Row], Row]:
    """The student's weights and AdamW rows, and its gradients row (held in a
    stage's backward and the optimizer step)."""
    n, params = layout.processes, student.parameters
    deepspeed_mixed = layout.deepspeed and autocast
    weight_bytes = 2 if deepspeed_mixed else student.dtype_bytes
    what = f"{_count(params)} x {weight_bytes} B"
    gathered = (student.outer_parameters + 2 * student.layer_parameters) * (2 if autocast else weight_bytes) / MiB
    shard = params * weight_bytes / n / MiB
    if layout.shards_weights and layout.offload_params:
        weights = Row("student weights", "always", gathered, shard, f"{what} / {n} in CPU RAM; gathered layers on "
                                                                    "the device")
    elif layout.shards_weights:
        weights = Row("student weights", "always", shard + gathered, 0.0, f"{what} / {n} + gathered layers")
    else:
        weights = Row("student weights", "always", params * weight_bytes / MiB, 0.0, what)
    grads = params * weight_bytes / (n if layout.shards_gradients else 1) / MiB
    grad_note = what + (f" / {n}" if layout.shards_gradients else "")
    if layout.kind == "ddp":
        grads, grad_note = 2 * grads, grad_note + ", x 2: DDP buckets"
    if deepspeed_mixed:
        per_param, kept = 12, "fp32 master + 2 moments"
    else:
        per_param, kept = 2 * student.dtype_bytes, f"2 moments x {student.dtype_bytes} B"
    if layout.offload_optimizer and layout.deepspeed:
        per_param, kept = per_param + 4, kept + " + fp32 gradients"
    size = params * per_param / (n if layout.shards_optimizer else 1) / MiB
    note = f"{_count(params)} x {per_param} B ({kept})" + (f" / {n}" if layout.shards_optimizer else "")
    if layout.offload_optimizer:
        optimizer = Row("AdamW states", "always", 0.0, size, note + " in CPU RAM")
    else:
        optimizer = Row("AdamW states", "always", size, 0.0, note)
    return [weights, optimizer], Row("gradients", "", grads, 0.0, grad_note)


@dataclass(frozen=True)
class _Adapter:
    """A trainable teacher adapter: its row, the positions it prepends, whether
    gradients go to the teacher's inputs only, and whether dropout is on."""

    row: Row
    positions: int = 0
    input_grad: bool = False
    dropout: bool = False


def _adapter(recipe: Recipe, method: Any, options: Any, teacher: ModelShape, tokenizer: Any) -> _Adapter:
    settings = _adapter_options(method, options)
    if method.teacher_adapter in INPUT_GRAD_ADAPTERS:
        length = int(settings.get("length", 0))
        return _Adapter(Row("trainable adapter", "always", length * teacher.hidden * 16 / MiB, 0.0,
                            f"soft prompt {length} x {teacher.hidden}, fp32 + gradients + AdamW"),
                        length, True, bool(settings.get("train_mode_for_grad", False)))
    if method.teacher_adapter == "lora":
        rank = int(settings.get("rank", 8))
        count = _lora_parameters(recipe, rank, settings.get("target_modules"), tokenizer)
        return _Adapter(Row("trainable adapter", "always", count * 16 / MiB, 0.0,
                            f"LoRA rank {rank}: {_count(count)}, fp32 + gradients + AdamW"))
    return _Adapter(Row("trainable adapter", "always", 0.0, 0.0, f"adapter '{method.teacher_adapter}': not estimated"))


def estimate(recipe: Recipe, method_name: str, layout: Layout, *, shapes: dict[str, ModelShape] | None = None,
             sequence_length: int | None = None, response_tokens: int | None = None,
             tokenizer: Any = None) -> Plan:
    """The per-process memory plan of ``method_name`` on ``recipe`` under
    ``layout``.  ``shapes`` reuses model shapes from an earlier plan;
    ``sequence_length`` (default ``data.max_length``) and ``response_tokens``
    per micro-batch (default: every position) replace the worst case, e.g. to
    compare with a measured run."""
    from distillkit.engine.losses import DEFAULT_CHUNK_SIZE

    method = registry().methods[method_name]
    run = resolve_run(recipe, method_name)
    shapes = dict(shapes or {})
    roles = ["student"] + (["teacher"] if method.teacher_adapter is not None else [])
    if tokenizer is None and any(getattr(recipe, r).config is not None and r not in shapes for r in roles):
        from distillkit.data.prepare import recipe_tokenizer

        tokenizer = recipe_tokenizer(recipe)[0]
    for role in roles:
        if role not in shapes:
            shapes[role] = model_shape(recipe, role, tokenizer)
    student, teacher = shapes["student"], shapes["teacher"] if method.teacher_adapter is not None else None
    precision = run.training.mixed_precision
    precision = layout.mixed_precision if precision == "auto" else precision
    autocast = precision in ("bf16", "fp16")
    plan = Plan(recipe.name, method_name, layout, precision, teacher, student, recipe.teacher.placement)
    rows = plan.rows
    if teacher is not None:
        rows.append(_teacher_row(teacher, recipe.teacher.placement, layout))
    student_rows, gradients = _student_rows(student, layout, autocast)
    rows.extend(student_rows)
    adapter = _Adapter(Row("", "always", 0.0))
    if teacher is not None and any(stage.trains == "teacher_adapter" for stage in method.stages):
        adapter = _adapter(recipe, method, run.options, teacher, tokenizer)
        rows.append(adapter.row)
    new_tokens = min(recipe.generation.max_new_tokens or recipe.data.max_length, recipe.data.max_length)
    if method.source == "rollouts" and teacher is not None and getattr(run.options, "keep_teacher_logits", False):
        size = -(-run.options.rollout_size // layout.processes)  # each process collects its share
        rows.append(Row("rollout buffer", "always", 0.0, size * new_tokens * teacher.vocab * teacher.dtype_bytes / MiB,
                        f"teacher logits of {size} rollouts x {new_tokens} tokens x {teacher.vocab:,}"))

    # each stage's forward/backward; the largest is shown
    # each process takes 1/N of the global batch, in micro-batches of at most micro_batch_size
    micro = min(run.training.micro_batch_size, -(-run.training.batch_size // layout.processes))
    sequence = sequence_length or recipe.data.max_length
    response = response_tokens if response_tokens is not None else micro * sequence
    chunk = min(response, DEFAULT_CHUNK_SIZE)
    vocab = max(student.vocab, teacher.vocab if teacher is not None else 0)
    stages = []
    for stage in method.stages:
        full, gathered, chunks, graphs = _logits_copies(stage.trains, teacher is not None,
                                                        method.source == "rollouts")
        if stage.trains == "student":
            per_token = activation_bytes_per_token(
                student, trained=True, precision=_activation_precision(student, autocast),
                dropout=stage.student_mode_for(run.options) == "train", device=layout.device, sequence=sequence)
            batches = f"{graphs} batches x " if graphs > 1 else ""
            stage_rows = [dataclasses.replace(gradients, when=FORWARD_BACKWARD),
                          Row("activations", FORWARD_BACKWARD, graphs * micro * sequence * per_token / MiB, 0.0,
                              f"student: {batches}{micro} x {sequence} tokens x {per_token / 1024:,.0f} KiB")]
        else:
            tokens = sequence + adapter.positions
            per_token = activation_bytes_per_token(
                teacher, trained=not adapter.input_grad, precision=_activation_precision(teacher, False),
                dropout=adapter.dropout, device=layout.device, sequence=tokens)
            stage_rows = [Row("activations", FORWARD_BACKWARD, micro * tokens * per_token / MiB, 0.0,
                              f"teacher, to its adapter: {micro} x {tokens} tokens x {per_token / 1024:,.0f} KiB")]
        logits = (full * micro * sequence + gathered * response + chunks * chunk) * vocab * 4 / MiB
        stage_rows.append(Row("logits", FORWARD_BACKWARD, logits, 0.0, f"({full} x {micro * sequence:,} + {gathered} x "
                                                                       f"{response:,} + {chunks} x {chunk:,}) rows x "
                                                                       f"{vocab:,} x 4 B"))
        stages.append((sum(r.device for r in stage_rows), stage.trains, stage_rows))
    _, plan.peak_stage, stage_rows = max(stages, key=lambda entry: entry[0])
    rows.extend(stage_rows)
    if layout.device == "cuda" and not layout.offload_optimizer:  # foreach AdamW: a parameter-size temporary
        local = student.parameters / (layout.processes if layout.shards_optimizer else 1)
        master_bytes = 4 if layout.deepspeed and autocast else student.dtype_bytes  # DeepSpeed steps fp32 masters
        rows.append(dataclasses.replace(gradients, when=OPTIMIZER_STEP))
        rows.append(Row("optimizer temporaries", OPTIMIZER_STEP, local * master_bytes / MiB, 0.0,
                        "foreach AdamW, parameter-size"))
    if method.source in SAMPLING_SOURCES:
        rows.extend(_sampling_rows(recipe, method.source, run.options, layout.processes, student, teacher, micro,
                                   adapter.positions, 2 if autocast else student.dtype_bytes, vocab, sequence,
                                   new_tokens))
    return plan


def _sampling_rows(recipe: Recipe, source: str, options: Any, processes: int, student: ModelShape,
                   teacher: ModelShape | None, micro: int, prefix: int, student_bytes: int, vocab: int, sequence: int,
                   new_tokens: int) -> list[Row]:
    """KV caches of the sampling models (and MiniLLM's scoring of its rollouts)."""
    batch = recipe.generation.batch_size if source in ("rollouts", "teacher_cache") else micro
    if source == "rollouts":  # each process samples its share of the rollouts
        batch = min(batch, -(-getattr(options, "rollout_size", batch) // processes))
    samplers = []
    if source in ("student", "mixture", "rollouts"):
        samplers.append(("student", student, student_bytes, 0))
    if source in ("teacher", "teacher_cache", "rollouts") and teacher is not None:
        samplers.append(("teacher", teacher, teacher.dtype_bytes, 0 if source == "rollouts" else prefix))
    rows = []
    for name, shape, value_bytes, positions in samplers:
        length = recipe.data.max_length + positions
        rows.append(Row("KV cache", SAMPLING, batch * length * shape.layers * 2 * shape.kv_width * value_bytes / MiB,
                        0.0, f"{name}: {batch} x {length} x {shape.layers} layers x 2 x {shape.kv_width} x "
                             f"{value_bytes} B"))
    if source == "rollouts":
        rows.append(Row("logits", SAMPLING, (2 * batch * sequence + 3 * batch * new_tokens) * vocab * 4 / MiB, 0.0,
                        f"scoring rollouts: (2 x {batch * sequence:,} + 3 x {batch * new_tokens:,}) rows x "
                        f"{vocab:,} x 4 B"))
    return rows


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
