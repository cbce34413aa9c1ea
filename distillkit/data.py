"""The one data pipeline: locate, read, map rows to examples, template, tokenize.

Dataset resolution: a registered dataset name, a local file or folder, or a
hub id.  A hub id is first looked up in the local mirror ``$DISTILLKIT_DATA_DIR``
(one sub-folder per dataset, named like the id or its last component) and
only then on the hub.  Prompts use the Alpaca template of the PromptKD paper
(Table 5), with or without ``### Input:``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillkit import hookimpl
from distillkit.batch import TokenizedExample
from distillkit.components import DataFormat, DatasetSpec, InstructionExample
from distillkit.config import DataConfig
from distillkit.errors import DatasetUnavailable, DistillkitError
from distillkit.registry import did_you_mean, registry

log = logging.getLogger(__name__)

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


def _references(row: dict[str, Any], key: str) -> tuple[str, ...]:
    if key not in row:
        raise ValueError(f"missing field '{key}'")
    refs = [row[key]] if isinstance(row[key], str) else row[key]
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"field '{key}' must be a string or a list of strings")
    if not refs or not refs[0].strip():
        raise ValueError(f"empty response in field '{key}'; remove the row or fill in its response")
    return tuple(refs)


def dolly_row(row: dict[str, Any], origin: str) -> InstructionExample:
    """Raw Dolly (hub): instruction, context, response, category."""
    return InstructionExample(_text(row, "instruction"), _text(row, "context", required=False),
                              _references(row, "response"), origin)


def processed_row(row: dict[str, Any], origin: str) -> InstructionExample:
    """MiniLLM/PromptKD processed: instruction, input (optional), output (one or a list), prompt (ignored)."""
    return InstructionExample(_text(row, "instruction"), _text(row, "input", required=False),
                              _references(row, "output"), origin)


def _instance_example(instruction: str, instance: Any, where: str, origin: str) -> InstructionExample:
    """The example of one ``{input, output}`` instance of a multi-instance row."""
    try:
        if not isinstance(instance, dict):
            raise ValueError(f"expected an object, got {type(instance).__name__}")
        return InstructionExample(instruction, _text(instance, "input", required=False),
                                  _references(instance, "output"), f"{origin} {where}")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _instance_examples(row: dict[str, Any], key: str, instruction: str, origin: str) -> list[InstructionExample]:
    instances = row.get(key)
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"field '{key}' must be a non-empty list of instances")
    return [_instance_example(instruction, instance, f"{key}[{index}]", origin)
            for index, instance in enumerate(instances)]


def instances_row(row: dict[str, Any], origin: str) -> list[InstructionExample]:
    """Self-Instruct user-oriented and UnNI core rows: instruction, instances
    [{input, output, ...}]; one example per instance.  UnNI's per-instance
    ``constraints`` and ``instruction_with_input`` are not used (MiniLLM's
    processed UnNI rows hold instruction, input and output only)."""
    return _instance_examples(row, "instances", _text(row, "instruction"), origin)


def sni_task_row(row: dict[str, Any], origin: str) -> list[InstructionExample]:
    """A Super-NaturalInstructions task file: Definition [text], Instances
    [{id, input, output: [references]}], ...; one example per instance whose
    instruction is the Definition (as in MiniLLM's processed S-NI rows)."""
    definition = row.get("Definition")
    if not isinstance(definition, list) or not definition or not isinstance(definition[0], str):
        raise ValueError("field 'Definition' must be a list holding the task definition")
    return _instance_examples(row, "Instances", definition[0], origin)


def vicuna_row(row: dict[str, Any], origin: str) -> InstructionExample:
    """A Vicuna question (question_id, text, category) with its reference in
    ``answer`` (added by :func:`vicuna_rows` from the answer file)."""
    return InstructionExample(_text(row, "text"), "", _references(row, "answer"), origin)


# --- reading files -------------------------------------------------------------


def read_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield ``(row, origin)`` from a JSONL, JSON or parquet file; a file
    without rows, bytes that are not UTF-8 and rows that are not objects are
    one-line errors naming the file and line."""
    if not path.is_file():
        raise DistillkitError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    count = 0
    if suffix == ".jsonl":
        for number, line in _utf8_lines(path):
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("[") and not _is_json(line):
                raise DistillkitError(f"{path} holds a JSON array, not one object per line; rename it to .json "
                                      "or write one object per line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DistillkitError(
                    f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); fix or delete that line"
                ) from None
            if not isinstance(row, dict):
                raise DistillkitError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            count += 1
            yield row, f"{path}:{number}"
    elif suffix == ".json":
        rows = _load_json(path)
        rows = [rows] if isinstance(rows, dict) else rows
        if not isinstance(rows, list):
            raise DistillkitError(f"{path}: expected a JSON list of objects or one object")
        for number, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DistillkitError(f"{path}[{number}]: expected a JSON object, got {type(row).__name__}")
            count += 1
            yield row, f"{path}[{number}]"
    elif suffix == ".parquet":
        import datasets

        for number, row in enumerate(datasets.Dataset.from_parquet(str(path))):
            count += 1
            yield row, f"{path}[{number}]"
    else:
        raise DistillkitError(f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json or .parquet")
    if count == 0:
        raise DistillkitError(f"{path} holds no rows; point the recipe at a file with examples")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file; other bytes are an error naming the line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DistillkitError(f"{path}:{number}: bytes that are not UTF-8 (column {err.start + 1}); "
                                      "re-save the file as UTF-8") from None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _load_json(path: Path) -> Any:
    text = "".join(line for _, line in _utf8_lines(path))
    if not text.strip():
        raise DistillkitError(f"{path} holds no rows; point the recipe at a file with examples")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DistillkitError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


VICUNA_ANSWERS = "answer_gpt35.jsonl"


def vicuna_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """The Vicuna questions of ``path`` (question.jsonl), each with the text of
    its GPT-3.5 answer (``answer_gpt35.jsonl`` beside it, joined on
    question_id) as ``answer``."""
    answers = {}
    for row, origin in read_rows(path.with_name(VICUNA_ANSWERS)):
        if not isinstance(row.get("text"), str):
            raise DistillkitError(f"{origin}: field 'text' (the answer) must be a string")
        answers[row.get("question_id")] = row["text"]
    for row, origin in read_rows(path):
        if row.get("question_id") not in answers:
            raise DistillkitError(f"{origin}: no answer with question_id {row.get('question_id')!r} in {VICUNA_ANSWERS}")
        yield {**row, "answer": answers[row["question_id"]]}, origin


def _sni_references(path: Path) -> dict[str, dict[str, Any]]:
    """task id -> {instance id -> references} of S-NI's test_references.jsonl, in file order."""
    tasks: dict[str, dict[str, Any]] = {}
    for row, origin in read_rows(path):
        task, instance = row.get("task_id"), row.get("id")
        if not isinstance(task, str) or not isinstance(instance, str):
            raise DistillkitError(f"{origin}: fields 'task_id' and 'id' must be strings")
        tasks.setdefault(task, {})[instance] = row.get("references")
    return tasks


def sni_task_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """S-NI's official test instances.  ``path`` is test_references.jsonl
    (its task ids are those of splits/default/test_tasks.txt); yields the task
    file ``tasks/<task_id>.json`` of each test task found beside it, its
    Instances cut to the referenced ids, with the official references as
    outputs.  Absent task files are left out with a warning (the shared data
    holds 3 of the 119)."""
    tasks = _sni_references(path)
    files = {task: path.parent / "tasks" / f"{task}.json" for task in tasks}
    present = [task for task, file in files.items() if file.is_file()]
    if len(present) < len(tasks):
        log.warning("S-NI: %d of %d test task files found in %s; the other %d tasks are left out",
                    len(present), len(tasks), path.parent / "tasks", len(tasks) - len(present))
    for task in present:
        data, references = _load_json(files[task]), tasks[task]
        if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
            raise DistillkitError(f"{files[task]}: expected an S-NI task object with a list 'Instances'")
        instances = [{**instance, "output": references[instance["id"]]} for instance in data["Instances"]
                     if isinstance(instance, dict) and instance.get("id") in references]
        if not instances:
            raise DistillkitError(f"{files[task]}: none of its Instances has a test id of {path.name}")
        yield {**data, "Instances": instances}, str(files[task])


# --- registration ------------------------------------------------------------


BUILTIN_FORMATS = [
    DataFormat("dolly", "raw databricks-dolly-15k rows: instruction, context, response, category",
               frozenset({"instruction", "context", "response"}), dolly_row),
    DataFormat("minillm", "processed rows of MiniLLM/PromptKD: instruction, input, output, prompt",
               frozenset({"instruction", "output"}), processed_row),
    DataFormat("self-instruct", "Self-Instruct user-oriented rows: id, motivation_app, instruction, "
               "instances [{input, output}]", frozenset({"id", "motivation_app", "instruction", "instances"}),
               instances_row),
    DataFormat("unni-core", "Unnatural Instructions core rows: instruction, instances [{instruction_with_input, "
               "input, constraints, output}]", frozenset({"instruction", "instances"}), instances_row),
    DataFormat("vicuna", "Vicuna questions (question_id, text, category) joined with a reference 'answer'",
               frozenset({"question_id", "text"}), vicuna_row),
    DataFormat("sni-task", "Super-NaturalInstructions task files: Definition, Instances [{id, input, output}], ...",
               frozenset({"Definition", "Instances"}), sni_task_row),
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
    DatasetSpec("selfinst-raw", "Self-Instruct user-oriented, the raw 252 instructions", "self-instruct-user-oriented",
                "self-instruct", files={"test": "user_oriented_instructions.jsonl"}),
    DatasetSpec("vicuna-raw", "Vicuna 80 questions joined with their GPT-3.5 answers (FastChat files)", "vicuna-80",
                "vicuna", files={"test": "question.jsonl"}, read=vicuna_rows),
    DatasetSpec("sni-raw", "Super-NaturalInstructions official test instances from the task files present "
                "(3 of 119 in the shared data), references >= 11 tokens", "super-natural-instructions", "sni-task",
                files={"test": "test_references.jsonl"}, read=sni_task_rows,
                min_reference_tokens=11),
    DatasetSpec("unni", "Unnatural Instructions core set, references >= 11 tokens", "unnatural-instructions",
                "unni-core", files={"test": "core_data.jsonl"}, min_reference_tokens=11,
                missing_reason="the UnNI eval data is not in the shared data: neither UnNI's core_data.jsonl nor "
                "MiniLLM's processed uinst/11_/valid.jsonl could be obtained (dskd_uinst_valid_1050.jsonl there "
                "has 1-2 word answers and is not the eval set)"),
]


@hookimpl
def distillkit_register_data_formats() -> list[DataFormat]:
    return BUILTIN_FORMATS


@hookimpl
def distillkit_register_datasets() -> list[DatasetSpec]:
    return BUILTIN_DATASETS


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
        return parse_rows(read(path), fmt)
    rows = read_rows(folder) if folder is not None and folder.is_file() else _hub_rows(location, looked)
    return _split_by_seed(parse_rows(rows, fmt), sizes, config.split_seed)[split]


def dataset_spec(name: str) -> DatasetSpec | None:
    """The registered dataset ``name`` (None for a file, folder or hub id)."""
    datasets = registry().datasets
    return datasets[name] if name in datasets else None


def load_eval_set(name_or_path: str) -> list[InstructionExample]:
    """A registered dataset's test split, or every row of a local file; before
    the dataset's reference-length filter (:func:`keep_long_references`)."""
    if Path(name_or_path).is_file():
        return parse_rows(read_rows(Path(name_or_path)), "auto")
    names = registry().datasets.names()
    if name_or_path not in names and "/" not in name_or_path:  # neither a registered set, a file nor a hub id
        raise DistillkitError(f"unknown test set '{name_or_path}'{did_you_mean(name_or_path, names)}; registered: "
                              f"{', '.join(names)}; or pass a .jsonl/.json/.parquet file")
    return load_split(DataConfig(dataset=name_or_path), "test")


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


# --- tokenization --------------------------------------------------------------


def tokenize(
    examples: list[InstructionExample],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_length: int,
    training: bool,
) -> tuple[list[TokenizedExample], int]:
    """Tokenize as MiniLLM/PromptKD do for every model family (gpt2, opt,
    llama): ``Encoder.encode`` of gmkim-ai/PromptKD ``tools/process_data_dolly.py``
    (= microsoft/LMOps ``minillm/tools/process_data_dolly.py``)::

        prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)
        full_tokens = tokenizer.encode(prompt + response, add_special_tokens=False) + [eos_token_id]
        response_tokens = full_tokens[len(prompt_tokens):]

    So no special token (no BOS, e.g. OPT's ``</s>`` or Llama's ``<s>``)
    is added, and the response ids are the joint tokenisation of prompt +
    first reference after the prompt's token count (even where the joint
    tokenisation merges across the boundary), plus EOS.

    Length rules: in training, examples whose prompt exceeds
    ``max_prompt_length`` tokens are dropped (as the reference does); in
    evaluation the prompt keeps its last ``max_prompt_length`` tokens.
    Responses are cut so that prompt + response <= ``max_length``.
    Returns the examples (``prompt_ids``: the prompt's ids; ``response_ids``:
    response + EOS) and the number dropped."""
    if max_prompt_length >= max_length:
        raise DistillkitError(
            f"data.max_prompt_length ({max_prompt_length}) must be below data.max_length ({max_length})"
        )
    texts = [format_prompt(e) for e in examples]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    joints = tokenizer([t + e.references[0] for t, e in zip(texts, examples)], add_special_tokens=False)["input_ids"]
    tokenized, dropped = [], 0
    for example, prompt, joint in zip(examples, prompts, joints):
        response = joint[len(prompt):] + [tokenizer.eos_token_id]
        if len(prompt) > max_prompt_length:
            if training:
                dropped += 1
                continue
            prompt = prompt[-max_prompt_length:]
        tokenized.append(TokenizedExample(prompt, response[: max_length - len(prompt)], example))
    return tokenized, dropped
