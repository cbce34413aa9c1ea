"""The memory plan of a run (``distillkit train --dry-run``): per-device
memory from model configs alone (:mod:`distillkit.planning.shapes`) and
what the method's components declare (:mod:`distillkit.api.footprints`).
No weights are loaded, nothing is downloaded and nothing trains.

**Layout** (:class:`~distillkit.engine.layout.Layout`): an ``accelerate``
config file, else the environment of ``accelerate launch``, else one device;
N processes.  FSDP and DeepSpeed configs plan for GPUs; DDP-style configs
(``MULTI_GPU``) for CPU processes when this machine has no CUDA device, as
distillkit then runs them.

**Rows** per process, in MiB; P parameters, b bytes per value.  The core's
rows follow from the model shapes and the layout; the rows marked
*declared* come from the footprints of the method's teacher adapter
(``TeacherAdapterFactory.footprint``), source (``SourceFactory.footprint``)
and stages (``Stage.footprint``); a component without one adds none.

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
- trainable adapter (*declared* by the adapter, shown when a stage trains
  it): its trainable fp32 values with gradients and AdamW, 16 B each (the
  soft prompt's m x d, LoRA's r (in + out) per adapted layer).
- buffers (*declared* by the source): what it keeps across steps, e.g.
  MiniLLM's rollout buffer (the teacher's response logits of the process's
  share of the rollouts, in CPU RAM).
- activations of a micro-batch (``training.micro_batch_size`` sequences of
  ``data.max_length`` tokens, fewer when a process's 1/N share of
  ``training.batch_size`` is smaller) through each model carrying
  gradients: the student (times the stage's *declared* student graphs); the
  teacher in a stage training its adapter, with the adapter's *declared*
  extra positions, dropout, and frozen-layer coefficients when its
  gradients reach the teacher's inputs only (a soft prompt).
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
- logits: only the response positions reach the output layers, a chunk of
  ``min(N, 2^22 / V)`` rows at a time (:mod:`distillkit.engine.losses`), so
  a stage holds chunk copies (fp32, chunk x V) and no (B, T, V) logits:
  4 for a teacher-free stage (SFT), 8 for a student stage with a teacher
  (KD: 8, GKD: 7), 9 for a stage training the teacher adapter (PromptKD's
  prompt step, two terms), as measured (peak resident set, glibc mmap
  threshold 64 KiB) on 4,096 positions at V = 8,192; plus the student's
  output-layer gradient (V x h fp32), computed with the loss and held until
  backward; plus the stage's *declared* full (B, T, V) and gathered (N, V)
  copies for what it keeps dense (TAID's interpolated target, MiniLLM's
  stored teacher logits).  The planner takes N = B T (every position a
  response token).
- KV cache while sampling (*declared* by the source: the models it samples
  from and with what batch, e.g. one micro-batch, or
  ``generation.batch_size``): ``batch x length x L x 2 kv`` values per
  sampling model, in its compute dtype, the teacher's with its adapter's
  extra positions; and the logits the source *declares* for scoring its
  samples (MiniLLM's rollouts: 2 full and 3 gathered copies).
- optimizer step: on CUDA the foreach AdamW makes one temporary of the
  student's (local) parameters, in fp32 for DeepSpeed's master copy.
- cached top-k teacher signal (``[teacher_signal] top_k`` = k, for a method
  that declares ``reads_teacher_signal``): each micro-batch's signal in a
  stage, (12 k + 4) B per position (int64 ids, fp32 values and tail); the
  stage's logits rows stay those of a stage with a teacher, an upper bound
  (the signal replaces the teacher's logits of the source's view).  Before
  training the cache is filled: the teacher's logits of a micro-batch's
  response positions with no gradients, 3 gathered copies (the logits, their
  log-softmax, the tail's masked copy).  On disk the cache holds k (index + 2) + 4 B per response
  token (index: 1, 2 or 4 B by vocabulary size).
- with ``[teacher_signal] alignment`` (a teacher with its own tokenizer):
  no fill and no cache; in a stage, the signal over the student's
  vocabulary, (12 k + 5) B per position (with ``valid``), and the teacher's
  logits of its view of the micro-batch in its own vocabulary V_t, 1 full
  and 2 chunk copies (log-softmax, the matched columns), the view counted
  at the student's length (it may be longer or shorter); the stage's own
  logits rows then count the student's vocabulary (an upper bound, with
  the dense-teacher copies).

The peak is the rows held throughout (weights, AdamW, adapter, buffers) plus
the largest phase: sampling, a stage's forward/backward (with its gradients),
or the optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distillkit.api import AdapterFootprint, PlanContext, SourceFootprint, StageFootprint
from distillkit.config import Recipe
from distillkit.config.assembly import Component, component, resolve_run
from distillkit.engine.layout import Layout
from distillkit.errors import DistillkitError
from distillkit.planning.shapes import ActivationFamily, ModelShape, meta_model, model_config, model_shape
from distillkit.registry import registry

MiB = 2**20
FORWARD_BACKWARD, OPTIMIZER_STEP, SAMPLING, TOP_K_FILL = "fwd/bwd", "optimizer step", "sampling", "top-k fill"
LAYER_CONSTANT = 32  # bytes per token and layer: normalisation statistics, attention log-sum-exp

# family -> (trained, frozen) -> precision -> (c_h, c_kv, c_f, c_b): see the module docstring
ACTIVATION_COEFFICIENTS: dict[ActivationFamily, dict[bool, dict[str, tuple[int, int, int, int]]]] = {
    "gpt2": {True: {"fp32": (40, 0, 20, 8), "autocast": (24, 0, 10, 6), "half": (20, 0, 10, 4)},
             False: {"fp32": (32, 0, 16, 4), "autocast": (20, 0, 8, 4), "half": (16, 0, 8, 2)}},
    "opt": {True: {"fp32": (32, 0, 4, 8), "autocast": (24, 0, 2, 6), "half": (16, 0, 2, 4)},
            False: {"fp32": (24, 0, 4, 4), "autocast": (16, 0, 2, 4), "half": (12, 0, 2, 2)}},
    "llama": {True: {"fp32": (32, 8, 16, 12), "autocast": (30, 4, 8, 10), "half": (20, 4, 8, 8)},
              False: {"fp32": (16, 8, 12, 4), "autocast": (12, 4, 6, 4), "half": (12, 4, 6, 4)}},
}


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


def _chunk_copies(trains: str, has_teacher: bool) -> int:
    """The fused loss path's chunk copies of logits at a stage's peak (module docstring)."""
    if trains != "student":
        return 9
    return 8 if has_teacher else 4


def _footprint(part: Component | None, plan: PlanContext, default: Any) -> Any:
    """What ``part`` (a source or teacher adapter) declares, else ``default``."""
    if part is None or part.factory.footprint is None:
        return default
    return part.factory.footprint(plan, part.options)


def _adapter_row(part: Component, adapter: AdapterFootprint) -> Row:
    if part.factory.footprint is None:
        return Row("trainable adapter", "always", 0.0, 0.0,
                   f"adapter '{part.factory.name}' declares no footprint: not estimated")
    return Row("trainable adapter", "always", adapter.trainable * 16 / MiB, 0.0,
               f"{adapter.note}, fp32 + gradients + AdamW")


def estimate(recipe: Recipe, method_name: str, layout: Layout, *, shapes: dict[str, ModelShape] | None = None,
             sequence_length: int | None = None, response_tokens: int | None = None,
             tokenizer: Any = None) -> Plan:
    """The per-process memory plan of ``method_name`` on ``recipe`` under
    ``layout``.  ``shapes`` reuses model shapes from an earlier plan;
    ``sequence_length`` (default ``data.max_length``) and ``response_tokens``
    per micro-batch (default: every position) replace the worst case, e.g. to
    compare with a measured run."""
    from distillkit.engine.losses import default_chunk_rows

    method = registry().methods[method_name]
    run = resolve_run(recipe, method_name)
    shapes = dict(shapes or {})
    roles = ["student"] + (["teacher"] if method.teacher_adapter is not None else [])
    if tokenizer is None and any(getattr(recipe, r).config is not None and r not in shapes for r in roles):
        from distillkit.data.prepare import recipe_tokenizer

        tokenizer = recipe_tokenizer(recipe)[0]
    teacher_tokenizer = tokenizer
    if "teacher" in roles and "teacher" not in shapes and recipe.teacher_signal.alignment is not None \
            and recipe.teacher.config is not None:  # a teacher with its own tokenizer sizes its config table
        from distillkit.data.prepare import recipe_teacher_tokenizer

        teacher_tokenizer = recipe_teacher_tokenizer(recipe)[0]
    for role in roles:
        if role not in shapes:
            shapes[role] = model_shape(recipe, role, teacher_tokenizer if role == "teacher" else tokenizer)
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
    # each process takes 1/N of the global batch, in micro-batches of at most micro_batch_size
    micro = min(run.training.micro_batch_size, -(-run.training.batch_size // layout.processes))
    new_tokens = min(recipe.generation.max_new_tokens or recipe.data.max_length, recipe.data.max_length)
    context = PlanContext(run, layout.processes, micro, new_tokens, student, teacher,
                          lambda: meta_model(model_config(recipe, "teacher", tokenizer)[0]))
    adapter_part = component(run, "teacher_adapter")
    adapter: AdapterFootprint = _footprint(adapter_part, context, AdapterFootprint())
    if adapter_part is not None and any(stage.trains == "teacher_adapter" for stage in method.stages):
        rows.append(_adapter_row(adapter_part, adapter))
    source: SourceFootprint = _footprint(component(run, "source"), context, SourceFootprint())
    for buffer in source.buffers:
        size = buffer.bytes / MiB
        rows.append(Row(buffer.name, "always", 0.0 if buffer.in_cpu_ram else size, size if buffer.in_cpu_ram else 0.0,
                        buffer.note))

    # each stage's forward/backward; the largest is shown
    sequence = sequence_length or recipe.data.max_length
    response = response_tokens if response_tokens is not None else micro * sequence
    aligned = teacher is not None and recipe.teacher_signal.alignment is not None
    # a teacher with its own tokenizer: its logits are the aligned-signal row, the stage's copies are the student's
    vocab = student.vocab if aligned else max(student.vocab, teacher.vocab if teacher is not None else 0)
    chunk = min(response, default_chunk_rows(vocab))
    stages = []
    for stage in method.stages:
        declared = stage.footprint(context, run.options) if stage.footprint is not None else StageFootprint()
        chunks = _chunk_copies(stage.trains, teacher is not None)
        full, gathered = declared.extra_logits.full, declared.extra_logits.gathered
        if stage.trains == "student":
            graphs = declared.student_graphs
            per_token = activation_bytes_per_token(
                student, trained=True, precision=_activation_precision(student, autocast),
                dropout=stage.student_mode_for(run.options) == "train", device=layout.device, sequence=sequence)
            batches = f"{graphs} batches x " if graphs > 1 else ""
            stage_rows = [dataclasses.replace(gradients, when=FORWARD_BACKWARD),
                          Row("activations", FORWARD_BACKWARD, graphs * micro * sequence * per_token / MiB, 0.0,
                              f"student: {batches}{micro} x {sequence} tokens x {per_token / 1024:,.0f} KiB"),
                          Row("output-layer gradient", FORWARD_BACKWARD, student.vocab * student.hidden * 4 / MiB,
                              0.0, f"computed with the loss, held until backward: {student.vocab:,} x "
                                   f"{student.hidden:,} x 4 B")]
        else:
            tokens = sequence + adapter.extra_positions
            per_token = activation_bytes_per_token(
                teacher, trained=not adapter.gradients_to_inputs_only, precision=_activation_precision(teacher, False),
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
    rows.extend(_sampling_rows(source, recipe.data.max_length, student, 2 if autocast else student.dtype_bytes,
                               teacher, adapter.extra_positions, vocab, sequence, new_tokens))
    if method.reads_teacher_signal and teacher is not None and recipe.teacher_signal.top_k:
        k = recipe.teacher_signal.top_k
        if recipe.teacher_signal.alignment is not None:
            rows.extend(_aligned_signal_rows(k, micro * sequence, chunk, teacher.vocab))
        else:
            rows.extend(_teacher_signal_rows(k, micro, sequence, response, vocab))
    return plan


def _aligned_signal_rows(k: int, positions: int, chunk: int, teacher_vocab: int) -> list[Row]:
    """The teacher's logits of its view of a micro-batch and the projected signal, in a stage (no fill)."""
    return [Row("teacher signal", FORWARD_BACKWARD, positions * (12 * k + 5) / MiB, 0.0,
                f"top-{k} over the student's vocabulary: {positions:,} positions x (12 x {k} + 5) B"),
            Row("logits", FORWARD_BACKWARD, (positions + 2 * chunk) * teacher_vocab * 4 / MiB, 0.0,
                f"teacher's view, its vocabulary: (1 x {positions:,} + 2 x {chunk:,}) rows x {teacher_vocab:,} x 4 B")]


def _teacher_signal_rows(k: int, micro: int, sequence: int, response: int, vocab: int) -> list[Row]:
    """The cached top-k signal of a micro-batch in a stage, and the fill's teacher logits."""
    from distillkit.engine.topk_cache import index_dtype

    positions = micro * sequence
    stored = k * (index_dtype(vocab).itemsize + 2) + 4
    return [Row("teacher signal", FORWARD_BACKWARD, positions * (12 * k + 4) / MiB, 0.0,
                f"top-{k}: {positions:,} positions x (12 x {k} + 4) B; on disk {stored} B per response token"),
            Row("logits", TOP_K_FILL, 3 * response * vocab * 4 / MiB, 0.0,
                f"teacher, no gradients: 3 x {response:,} response rows x {vocab:,} x 4 B")]


def _sampling_rows(source: SourceFootprint, max_length: int, student: ModelShape, student_bytes: int,
                   teacher: ModelShape | None, teacher_positions: int, vocab: int, sequence: int,
                   new_tokens: int) -> list[Row]:
    """KV caches of the models the source samples from, and the logits it scores its samples with."""
    batch = source.batch
    samplers = {"student": (student, student_bytes, 0),
                "teacher": (teacher, teacher.dtype_bytes if teacher is not None else 0, teacher_positions)}
    rows = []
    for role in source.samples_from:
        shape, value_bytes, positions = samplers[role]
        if shape is None:
            continue
        length = max_length + positions
        rows.append(Row("KV cache", SAMPLING, batch * length * shape.layers * 2 * shape.kv_width * value_bytes / MiB,
                        0.0, f"{role}: {batch} x {length} x {shape.layers} layers x 2 x {shape.kv_width} x "
                             f"{value_bytes} B"))
    full, gathered = source.scoring.full, source.scoring.gathered
    if full or gathered:
        rows.append(Row("logits", SAMPLING, (full * batch * sequence + gathered * batch * new_tokens) * vocab * 4 / MiB,
                        0.0, f"scoring samples: ({full} x {batch * sequence:,} + {gathered} x "
                             f"{batch * new_tokens:,}) rows x {vocab:,} x 4 B"))
    return rows
