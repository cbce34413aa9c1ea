"""Model configs and shapes for the memory planner: what it needs of each
model, from its config alone (no weights are loaded, nothing is downloaded).

**Model configs**, first found: the recipe's ``config`` table (sized by the
recipe tokenizer); a local folder's ``config.json``, a ``package:NAME`` folder
or a GGUF header (the de-quantised cache's ``config.json`` once it exists); the
Hugging Face cache (``local_files_only``); the snapshot
``model_configs/<org>--<name>.json`` in a registered recipe folder (plugins add
theirs).  Parameters are counted on the meta device, and the logits have the
config's ``vocab_size`` columns (padding such as OPT's 50272 included).  A
student cut from the teacher (``init_from``) is the teacher's shape with
fewer decoder layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from distillkit.config import ModelConfig, Recipe, recipe_dir_files
from distillkit.config.assembly import check_model_spec
from distillkit.errors import DistillkitError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ActivationFamily = Literal["gpt2", "opt", "llama"]
"""Model families with measured activation coefficients (:mod:`distillkit.planning.plan`)."""


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
    family: ActivationFamily
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


def _family(config: Any) -> ActivationFamily:
    """The config's family; other model types: the Llama (gated MLP) one when
    the config has an ``intermediate_size``, else GPT-2's."""
    if config.model_type in typing.get_args(ActivationFamily):
        return config.model_type
    return "llama" if getattr(config, "intermediate_size", None) else "gpt2"


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM of a transformers ``config`` on the meta device: no weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=32)
def _meta_counts(config_json: str) -> tuple[int, int, int]:
    """(parameters, parameters of one decoder layer, layers) of a config, counted
    on the meta device (tied embeddings once); cached by the config's JSON."""
    from distillkit.engine.models import decoder_layers

    model = meta_model(_config_from_dict(json.loads(config_json), ""))
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


def model_config(recipe: Recipe, role: str, tokenizer: Any = None) -> tuple[Any, str]:
    """(transformers config, where it came from) of the recipe's ``role``
    model loaded from a path or built from a ``config`` table; ``tokenizer``
    (the recipe's, loaded when not given) sizes a config table."""
    from distillkit.engine.models import config_from_recipe

    spec: ModelConfig = getattr(recipe, role)
    if spec.config is not None:
        if tokenizer is None:
            from distillkit.data.prepare import recipe_tokenizer

            tokenizer = recipe_tokenizer(recipe)[0]
        return config_from_recipe(spec, tokenizer, role), "recipe config"
    return path_config(spec, role)


def model_shape(recipe: Recipe, role: str, tokenizer: Any = None) -> ModelShape:
    """The shape of the recipe's ``role`` model; ``tokenizer`` (the recipe's)
    is needed only by models built from a ``config`` table."""
    spec: ModelConfig = getattr(recipe, role)
    check_model_spec(spec, role)
    if spec.init_from is not None:
        as_student = dataclasses.replace(recipe.teacher, dtype=spec.dtype)
        teacher = model_shape(dataclasses.replace(recipe, teacher=as_student), "teacher", tokenizer)
        cut = teacher.cut(spec.num_layers if spec.num_layers is not None else teacher.layers)
        return dataclasses.replace(cut, source=f"teacher's ({teacher.source}), {cut.layers} layers")
    config, source = model_config(recipe, role, tokenizer)
    return shape_of(config, spec.dtype, source)
