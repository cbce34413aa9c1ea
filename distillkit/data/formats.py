"""Row formats and file readers: a raw row (dict) of JSONL, JSON or parquet
becomes an :class:`~distillkit.api.InstructionExample`; malformed input is a
one-line error naming the file and line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillkit.api import InstructionExample
from distillkit.errors import DistillkitError

log = logging.getLogger(__name__)


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
    """MiniLLM/PromptKD processed: instruction, input (optional), output (one
    or a list), prompt (optional; used verbatim with ``data.prompt = "field"``)."""
    prompt = _text(row, "prompt") if row.get("prompt") is not None else None
    return InstructionExample(_text(row, "instruction"), _text(row, "input", required=False),
                              _references(row, "output"), origin, prompt)


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
