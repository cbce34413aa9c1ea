"""Memory estimates from parameter counts and dtypes, without loading weights.

Models are built on the meta device (``accelerate.init_empty_weights``) from
their config: a recipe's ``config``, a local folder's ``config.json`` or a
GGUF header.  The estimate per model:

- frozen teacher: weights only, in the recipe's dtype;
- trained student: fp32 weights, gradients and two AdamW moments
  (16 bytes per parameter);
- logits: one micro-batch of ``max_length`` positions over the vocabulary in
  fp32, three copies (student, teacher, gradient).

Activations and the KV cache are not included, so treat "fits" as a lower
bound on what is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillkit.config import ModelConfig, Recipe

MiB = 2**20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}


def _meta_config(spec: ModelConfig, tokenizer: Any, role: str) -> Any:
    from transformers import AutoConfig

    from distillkit.models import config_from_recipe, resolve_path

    if spec.config is not None:
        return config_from_recipe(spec, tokenizer, role)
    return AutoConfig.from_pretrained(resolve_path(spec.path), gguf_file=spec.gguf_file,
                                      trust_remote_code=spec.trust_remote_code)


def parameter_count(spec: ModelConfig, tokenizer: Any, teacher: ModelConfig | None = None) -> int:
    """Parameters of the model ``spec`` describes (a student cut from the
    teacher keeps ``num_layers`` of its decoder layers)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from distillkit.models import decoder_layers

    base, role = (teacher, "teacher") if spec.init_from is not None else (spec, "student")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(_meta_config(base, tokenizer, role))
    model.tie_weights()  # shared input/output embeddings count once
    total = sum(p.numel() for p in model.parameters())
    if spec.init_from is None or spec.num_layers is None:
        return total
    layers = decoder_layers(model)[1]
    per_layer = sum(p.numel() for p in layers[0].parameters())
    return total - (len(layers) - spec.num_layers) * per_layer


@dataclass
class ModelEstimate:
    role: str
    parameters: int | None
    dtype: str
    megabytes: float | None
    note: str = ""


def estimate(recipe: Recipe, tokenizer: Any, *, with_teacher: bool = True) -> list[ModelEstimate]:
    """Per-model memory estimates (MiB) for training on ``recipe``; a model
    whose config cannot be read offline gets ``parameters = None`` and a note."""
    rows = []
    roles = ("teacher", "student") if with_teacher else ("student",)
    for role in roles:
        spec: ModelConfig = getattr(recipe, role)
        try:
            count = parameter_count(spec, tokenizer, recipe.teacher)
        except (OSError, ValueError, KeyError) as error:
            rows.append(ModelEstimate(role, None, spec.dtype, None, str(error).splitlines()[0][:120]))
            continue
        per_parameter = BYTES[spec.dtype] if role == "teacher" else 16
        rows.append(ModelEstimate(role, count, spec.dtype, count * per_parameter / MiB))
    micro = recipe.training.micro_batch_size
    rows.append(ModelEstimate("logits", None, "float32", 3 * micro * recipe.data.max_length * len(tokenizer) * 4 / MiB,
                              f"{micro} x {recipe.data.max_length} x {len(tokenizer)} x 3"))
    return rows


def available_memory() -> tuple[str, float]:
    """(device description, free MiB): the first CUDA device, else system RAM."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})", free / MiB
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        return "CPU RAM", int(fields["MemAvailable"].split()[0]) / 1024
    return "CPU RAM", float("nan")
