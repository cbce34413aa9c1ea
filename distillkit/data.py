"""The one data pipeline: locate, read, map rows to examples, template, tokenize.

Dataset resolution: a registered dataset name, a local file or folder, or a
hub id.  A hub id is first looked up in the local mirror ``$DISTILLKIT_DATA_DIR``
(one sub-folder per dataset, named like the id or its last component) and
only then on the hub.  Prompts use the Alpaca template of the PromptKD paper
(Table 5), with or without ``### Input:``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillkit import hookimpl
from distillkit.batch import TokenizedExample
from distillkit.components import DataFormat, DatasetSpec, InstructionExample
from distillkit.config import DataConfig
from distillkit.errors import DistillkitError
from distillkit.registry import registry

DATA_DIR_ENV = "DISTILLKIT_DATA_DIR"
SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SIZES = {"validation": 500, "test": 500}

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(example: InstructionExample) -> str:
    """The Alpaca prompt ``x`` for an example."""
    template = PROMPT_WITH_INPUT if example.input.strip() else PROMPT_WITHOUT_INPUT
    return template.format(instruction=example.instruction, input=example.input)


# --- row formats ---------------------------------------------------------------


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key, "" if not required else None)
    if value is None:
        raise ValueError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _references(value: Any, key: str) -> tuple[str, ...]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"field '{key}' must be a string or a list of strings")
    if not refs or not refs[0].strip():
        raise ValueError(f"empty response in field '{key}'; remove the row or fill in its response")
    return tuple(refs)


def dolly_row(row: dict[str, Any], origin: str) -> InstructionExample:
    """Raw Dolly (hub): instruction, context, response, category."""
    if "response" not in row:
        raise ValueError("missing field 'response'")
    return InstructionExample(_text(row, "instruction"), _text(row, "context", required=False),
                              _references(row["response"], "response"), origin)


def processed_row(row: dict[str, Any], origin: str) -> InstructionExample:
    """MiniLLM/PromptKD processed: instruction, input (optional), output (one or a list), prompt (ignored)."""
    if "output" not in row:
        raise ValueError("missing field 'output'")
    return InstructionExample(_text(row, "instruction"), _text(row, "input", required=False),
                              _references(row["output"], "output"), origin)


BUILTIN_FORMATS = [
    DataFormat("dolly", "raw databricks-dolly-15k rows: instruction, context, response, category",
               frozenset({"instruction", "context", "response"}), dolly_row),
    DataFormat("minillm", "processed rows of MiniLLM/PromptKD: instruction, input, output, prompt",
               frozenset({"instruction", "output"}), processed_row),
]

BUILTIN_DATASETS = [
    DatasetSpec("dolly", "Dolly in MiniLLM's processed split (train 11,235 / dev 1,000 / test 500)",
                "databricks-dolly-15k", "minillm",
                files={"train": "minillm/train.jsonl", "validation": "minillm/dev.jsonl",
                       "test": "minillm/valid.jsonl"}),
    DatasetSpec("dolly-raw", "raw databricks-dolly-15k from the hub, split by seed",
                "databricks/databricks-dolly-15k", "dolly", split_sizes=dict(DEFAULT_SPLIT_SIZES)),
    DatasetSpec("selfinst", "Self-Instruct user-oriented, MiniLLM's processed 242 rows", "self-instruct-user-oriented",
                "minillm", files={"test": "minillm/valid.jsonl"}),
    DatasetSpec("vicuna", "Vicuna 80 questions, GPT-3.5 references", "vicuna-80", "minillm",
                files={"test": "minillm/valid.jsonl"}),
    DatasetSpec("sni", "Super-NaturalInstructions test, references >= 11 GPT-2 tokens (1,694 rows)",
                "super-natural-instructions", "minillm", files={"test": "minillm/11_/valid.jsonl"}),
]


@hookimpl
def distillkit_register_data_formats() -> list[DataFormat]:
    return BUILTIN_FORMATS


@hookimpl
def distillkit_register_datasets() -> list[DatasetSpec]:
    return BUILTIN_DATASETS


# --- reading files -------------------------------------------------------------


def read_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield ``(row, origin)`` from a JSONL, JSON or parquet file."""
    if not path.is_file():
        raise DistillkitError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DistillkitError(
                        f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); fix or delete that line"
                    ) from None
                if not isinstance(row, dict):
                    raise DistillkitError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
                yield row, f"{path}:{number}"
    elif suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                rows = json.load(handle)
            except json.JSONDecodeError as err:
                raise DistillkitError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise DistillkitError(f"{path}: expected a JSON list of objects")
        for number, row in enumerate(rows):
            yield row, f"{path}[{number}]"
    elif suffix == ".parquet":
        import datasets

        for number, row in enumerate(datasets.Dataset.from_parquet(str(path))):
            yield row, f"{path}[{number}]"
    else:
        raise DistillkitError(f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json or .parquet")


def detect_format(row: dict[str, Any], origin: str) -> DataFormat:
    formats = registry().data_formats
    matches = [formats[n] for n in formats.names() if formats[n].fields <= row.keys()]
    if not matches:
        known = "; ".join(f"{n}: {', '.join(sorted(formats[n].fields))}" for n in formats.names())
        raise DistillkitError(
            f"{origin}: no registered data format matches the fields {sorted(row)}; known formats ({known}); "
            "set data.format or register a format plugin"
        )
    return max(matches, key=lambda f: len(f.fields))


def parse_rows(rows: Iterator[tuple[dict[str, Any], str]], format_name: str) -> list[InstructionExample]:
    examples = []
    data_format = None if format_name == "auto" else registry().data_formats[format_name]
    for row, origin in rows:
        data_format = data_format or detect_format(row, origin)
        try:
            examples.append(data_format.to_example(row, origin))
        except ValueError as err:
            raise DistillkitError(f"{origin}: {err} (format '{data_format.name}')") from None
    return examples


# --- locating datasets ---------------------------------------------------------


def mirror_candidates(location: str) -> list[Path]:
    """Folders under ``$DISTILLKIT_DATA_DIR`` that may hold ``location``."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return []
    names = dict.fromkeys([location, location.replace("/", "__"), location.rsplit("/", 1)[-1]])
    return [Path(root) / name for name in names]


def locate(location: str) -> Path | None:
    """A local folder or file for ``location``, or None when it must come from the hub."""
    direct = Path(location).expanduser()
    if direct.exists():
        return direct
    return next((c for c in mirror_candidates(location) if c.exists()), None)


def _hub_rows(location: str, looked: list[str]) -> Iterator[tuple[dict[str, Any], str]]:
    import datasets

    try:
        table = datasets.load_dataset(location, split="train")
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DistillkitError(
            f"dataset '{location}' not found: looked in {', '.join(looked) or f'${DATA_DIR_ENV} (unset)'} "
            f"and on the hub ({type(err).__name__}); set {DATA_DIR_ENV} to a folder holding it or pass a local path"
        ) from None
    for number, row in enumerate(table):
        yield row, f"{location}[{number}]"


def _split_by_seed(examples: list[InstructionExample], sizes: dict[str, int], seed: int) -> dict[str, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    splits, start = {}, 0
    for name in ("validation", "test"):
        size = min(sizes.get(name, 0), len(order) // 10)
        splits[name] = [examples[i] for i in order[start : start + size]]
        start += size
    splits["train"] = [examples[i] for i in sorted(order[start:])]
    return splits


def load_split(config: DataConfig, split: str) -> list[InstructionExample]:
    """Examples of one split (``train``, ``validation`` or ``test``) of the
    configured dataset."""
    datasets = registry().datasets
    if config.dataset in datasets:
        spec = datasets[config.dataset]
        location, files, fmt, sizes = spec.location, dict(spec.files), spec.format, dict(spec.split_sizes)
        if spec.missing_reason:
            raise DistillkitError(f"dataset '{spec.name}' is not available: {spec.missing_reason}")
    else:
        location, files, fmt, sizes = config.dataset, {}, config.format, dict(DEFAULT_SPLIT_SIZES)
    files.update(config.files)
    if config.format != "auto":
        fmt = config.format
    folder = locate(location)
    looked = [str(c) for c in mirror_candidates(location)] or [location]
    if files:
        if split not in files:
            raise DistillkitError(f"dataset '{config.dataset}' has no '{split}' split; it has {', '.join(files)}")
        if folder is None or not folder.is_dir():
            raise DistillkitError(
                f"dataset '{config.dataset}' not found: looked for folder '{location}' in "
                f"{', '.join(looked)}; set {DATA_DIR_ENV} (e.g. ../shared/data) or pass a local path"
            )
        path = folder / files[split]
        if not path.is_file():
            raise DistillkitError(f"dataset '{config.dataset}': split file {path} does not exist")
        return parse_rows(read_rows(path), fmt)
    rows = read_rows(folder) if folder is not None and folder.is_file() else _hub_rows(location, looked)
    return _split_by_seed(parse_rows(rows, fmt), sizes, config.split_seed)[split]


def load_eval_set(name_or_path: str) -> list[InstructionExample]:
    """A registered dataset's test split, or every row of a local file."""
    if Path(name_or_path).is_file():
        return parse_rows(read_rows(Path(name_or_path)), "auto")
    return load_split(DataConfig(dataset=name_or_path), "test")


# --- tokenization --------------------------------------------------------------


def tokenize(
    examples: list[InstructionExample],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_length: int,
    training: bool,
) -> tuple[list[TokenizedExample], int]:
    """Tokenize prompts (with the tokenizer's special tokens) and responses
    (plus EOS).  In training, examples whose prompt exceeds
    ``max_prompt_length`` are dropped (as in MiniLLM's processing); in
    evaluation the prompt keeps its last ``max_prompt_length`` tokens.
    Responses are cut so that prompt + response <= ``max_length``.
    Returns the examples and the number dropped."""
    if max_prompt_length >= max_length:
        raise DistillkitError(
            f"data.max_prompt_length ({max_prompt_length}) must be below data.max_length ({max_length})"
        )
    prompts = tokenizer([format_prompt(e) for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.references[0] for e in examples], add_special_tokens=False)["input_ids"]
    tokenized, dropped = [], 0
    for example, prompt, response in zip(examples, prompts, responses):
        if len(prompt) > max_prompt_length:
            if training:
                dropped += 1
                continue
            prompt = prompt[-max_prompt_length:]
        response = (response + [tokenizer.eos_token_id])[: max_length - len(prompt)]
        tokenized.append(TokenizedExample(prompt, response, example))
    return tokenized, dropped
