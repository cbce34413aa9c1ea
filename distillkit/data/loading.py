"""Locating datasets and loading their splits as examples.

Dataset resolution: a registered dataset name, a local file or folder, or a
hub id.  A hub id is first looked up in the local mirror ``$DISTILLKIT_DATA_DIR``
(one sub-folder per dataset, named like the id or its last component) and
only then on the hub.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillkit.api import DataFormat, DatasetSpec, InstructionExample
from distillkit.config import DataConfig
from distillkit.config.schema import PromptSource
from distillkit.data.formats import read_rows
from distillkit.errors import DatasetUnavailable, DistillkitError, did_you_mean
from distillkit.registry import registry

log = logging.getLogger(__name__)

DATA_DIR_ENV = "DISTILLKIT_DATA_DIR"
SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SIZES = {"validation": 500, "test": 500}

# --- detecting formats -------------------------------------------------------


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


def with_prompts(examples: list[InstructionExample], source: PromptSource) -> list[InstructionExample]:
    """``examples`` with the prompts ``data.prompt`` asks for: ``"template"``
    clears any prompt a row carried (the template is applied), ``"field"``
    keeps them and requires one on every example."""
    if source == "template":
        return [dataclasses.replace(example, prompt=None) for example in examples]
    missing = next((example for example in examples if example.prompt is None), None)
    if missing is not None:
        raise DistillkitError(f"{missing.origin}: data.prompt = 'field' but this row has no 'prompt' field; "
                              "give every row one or set data.prompt = 'template'")
    return examples


def parse_rows(rows: Iterator[tuple[dict[str, Any], str]], format_name: str) -> list[InstructionExample]:
    examples = []
    data_format = None if format_name == "auto" else registry().data_formats[format_name]
    for row, origin in rows:
        data_format = data_format or detect_format(row, origin)
        try:
            mapped = data_format.to_example(row, origin)
            examples.extend(mapped if isinstance(mapped, list) else [mapped])
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


def _absent(spec: DatasetSpec | None, message: str) -> DistillkitError:
    """The error for a dataset whose files are not found: its known reason, if any."""
    if spec is not None and spec.missing_reason:
        return DatasetUnavailable(spec.name, spec.missing_reason)
    return DistillkitError(message)


def load_split(config: DataConfig, split: str) -> list[InstructionExample]:
    """Examples of one split (``train``, ``validation`` or ``test``) of the
    configured dataset."""
    spec = dataset_spec(config.dataset)
    if spec is not None:
        location, files, fmt, sizes = spec.location, dict(spec.files), spec.format, dict(spec.split_sizes)
    else:
        location, files, fmt, sizes = config.dataset, {}, config.format, dict(DEFAULT_SPLIT_SIZES)
    read = read_rows if spec is None or spec.read is None else spec.read
    files.update(config.files)
    if config.format != "auto":
        fmt = config.format
    folder = locate(location)
    looked = [str(c) for c in mirror_candidates(location)] or [location]
    if files:
        if split not in files:
            raise DistillkitError(f"dataset '{config.dataset}' has no '{split}' split; it has {', '.join(files)}")
        if folder is None or not folder.is_dir():
            raise _absent(spec, f"dataset '{config.dataset}' not found: looked for folder '{location}' in "
                                f"{', '.join(looked)}; set {DATA_DIR_ENV} (e.g. ../shared/data) or pass a local path")
        path = folder / files[split]
        if not path.is_file():
            raise _absent(spec, f"dataset '{config.dataset}': split file {path} does not exist")
        return with_prompts(parse_rows(read(path), fmt), config.prompt)
    rows = read_rows(folder) if folder is not None and folder.is_file() else _hub_rows(location, looked)
    return with_prompts(_split_by_seed(parse_rows(rows, fmt), sizes, config.split_seed)[split], config.prompt)


def dataset_spec(name: str) -> DatasetSpec | None:
    """The registered dataset ``name`` (None for a file, folder or hub id)."""
    datasets = registry().datasets
    return datasets[name] if name in datasets else None


def load_eval_set(name_or_path: str, prompt: PromptSource = "template") -> list[InstructionExample]:
    """A registered dataset's test split, or every row of a local file, with
    the prompts ``prompt`` asks for (``data.prompt`` of the evaluated run);
    before the dataset's reference-length filter (:func:`keep_long_references`)."""
    if Path(name_or_path).is_file():
        return with_prompts(parse_rows(read_rows(Path(name_or_path)), "auto"), prompt)
    names = registry().datasets.names()
    if name_or_path not in names and "/" not in name_or_path:  # neither a registered set, a file nor a hub id
        raise DistillkitError(f"unknown test set '{name_or_path}'{did_you_mean(name_or_path, names)}; registered: "
                              f"{', '.join(names)}; or pass a .jsonl/.json/.parquet file")
    return load_split(DataConfig(dataset=name_or_path, prompt=prompt), "test")


def keep_long_references(examples: list[InstructionExample], tokenizer: Any,
                         min_tokens: int) -> list[InstructionExample]:
    """The examples whose first reference has at least ``min_tokens`` tokens of
    ``tokenizer`` (without special tokens).  MiniLLM counted GPT-2 tokens; no
    GPT-2 vocabulary is available offline, so evaluation counts with the
    evaluated model's tokenizer (identical for GPT-2-family models)."""
    if min_tokens <= 0 or not examples:
        return examples
    ids = tokenizer([e.references[0] for e in examples], add_special_tokens=False)["input_ids"]
    return [example for example, tokens in zip(examples, ids) if len(tokens) >= min_tokens]
