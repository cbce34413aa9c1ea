"""Loading tokenizers and models: local path or hub id, GGUF file, or built
from a ``transformers`` config; the shared-vocabulary check."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distillkit.config import ModelConfig
from distillkit.errors import DistillkitError

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


def load_tokenizer(path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DistillkitError(f"cannot load tokenizer from '{path}': {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise DistillkitError(f"tokenizer '{path}' has no EOS token; distillkit needs one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelConfig, tokenizer: Any, role: str) -> torch.nn.Module:
    """The ``role`` ("teacher"/"student") model described by ``spec``."""
    if (spec.path is None) == (spec.config is None):
        raise DistillkitError(f"{role}: set exactly one of '{role}.path' (a model) or '{role}.config' (build one)")
    if spec.config is not None:
        settings = dict(spec.config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise DistillkitError(f"{role}.config needs a model_type (e.g. \"gpt2\")")
        settings.setdefault("vocab_size", len(tokenizer))
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            settings.setdefault(name, getattr(tokenizer, name))
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except ValueError as err:
            raise DistillkitError(f"{role}.config: {err}") from None
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype])
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.path, gguf_file=spec.gguf_file, dtype=DTYPES[spec.dtype],
                trust_remote_code=spec.trust_remote_code,
            )
        except (OSError, ValueError) as err:
            raise DistillkitError(f"cannot load {role} from '{spec.path}': {str(err).splitlines()[0]}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise DistillkitError(
            f"{role} has {rows} output rows but the tokenizer has {len(tokenizer)} tokens; they do not belong together"
        )
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
            f"e.g. {differing}); pick a pair that shares a tokenizer (cross-tokenizer alignment is not supported yet)"
        )
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(teacher_tokenizer, name) != getattr(student_tokenizer, name):
            raise DistillkitError(
                f"teacher and student tokenizers disagree on {name} "
                f"({getattr(teacher_tokenizer, name)} vs {getattr(student_tokenizer, name)}); use one tokenizer for both"
            )


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write model weights (safetensors), config and tokenizer to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
