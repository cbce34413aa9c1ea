"""A recipe's shared tokenizer and its tokenized training and validation data."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkit.config import Recipe
from distillkit.data.loading import load_split
from distillkit.data.templates import format_prompt
from distillkit.data.tokenization import tokenize
from distillkit.engine.models import load_tokenizer, train_bpe_tokenizer
from distillkit.errors import DistillkitError
from distillkit.files import cache_root, fingerprint, publish_dir

log = logging.getLogger(__name__)


def data_identity(recipe: Recipe) -> dict[str, Any]:
    """The fields of ``[data]`` that change which training examples exist."""
    data = recipe.data.identity()
    return {k: data[k] for k in ("dataset", "format", "files", "train_limit", "split_seed", "prompt", "long_prompts",
                                 "max_prompt_length", "max_length") if k in data}


def recipe_tokenizer(recipe: Recipe) -> tuple[Any, str]:
    """The recipe's shared tokenizer (the student's, with ``[teacher_signal] alignment``) and an identity string for
    cache keys."""
    settings = recipe.tokenizer
    if settings.train_vocab_size:
        key = fingerprint("bpe", settings.train_vocab_size, data_identity(recipe))
        folder = cache_root() / "tokenizers" / key
        if not (folder / "tokenizer.json").is_file():
            examples = load_split(recipe.data, "train")
            log.info("training a %d-token byte-level BPE tokenizer on %d examples", settings.train_vocab_size,
                     len(examples))
            tokenizer = train_bpe_tokenizer((format_prompt(e) + e.references[0] for e in examples),
                                            settings.train_vocab_size)
            folder.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            tokenizer.save_pretrained(scratch)
            publish_dir(scratch, folder)
        return load_tokenizer(str(folder)), f"bpe-{key}"
    aligned = recipe.teacher_signal.alignment is not None  # the teacher has its own tokenizer
    path = settings.path or (None if aligned else recipe.teacher.path) or recipe.student.path
    if path is None:
        raise DistillkitError("set tokenizer.path or tokenizer.train_vocab_size (no model path to take it from)")
    return _path_tokenizer(recipe, path), path


def _path_tokenizer(recipe: Recipe, path: str) -> Any:
    """The tokenizer at ``path``, read from the teacher's GGUF file when ``path`` is the teacher's."""
    gguf = recipe.teacher.gguf_file if path == recipe.teacher.path else None
    return load_tokenizer(path, gguf_file=gguf, trust_remote_code=recipe.teacher.trust_remote_code)


def recipe_teacher_tokenizer(recipe: Recipe) -> tuple[Any, str]:
    """The tokenizer of a teacher that has its own (``[teacher_signal] alignment``): ``teacher_tokenizer``, else the
    teacher's ``path``; and the path it came from."""
    path = recipe.teacher_signal.teacher_tokenizer or recipe.teacher.path
    if path is None:
        raise DistillkitError("set teacher_signal.teacher_tokenizer, the teacher's tokenizer folder (a teacher built "
                              "from teacher.config has no tokenizer of its own)")
    return _path_tokenizer(recipe, path), path


@dataclass
class PreparedData:
    train: list
    validation: list


def prepare_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    data = recipe.data
    train_examples = load_split(data, "train")
    if data.train_limit:
        train_examples = train_examples[: data.train_limit]
    train, dropped = tokenize(train_examples, tokenizer, max_prompt_length=data.max_prompt_length,
                              max_length=data.max_length, long_prompts=data.long_prompts)
    if dropped:
        log.info("dropped %d of %d training examples whose prompt exceeds %d tokens", dropped, len(train_examples),
                 data.max_prompt_length)
    validation, _ = tokenize(load_split(data, "validation"), tokenizer, max_prompt_length=data.max_prompt_length,
                             max_length=data.max_length, long_prompts="cut_left")
    return PreparedData(train, validation)
