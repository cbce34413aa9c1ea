"""The built-in data formats and datasets, registered through the entry-point
group like any plugin's."""

from __future__ import annotations

from distillkit.api import DataFormat, DatasetSpec, hookimpl
from distillkit.data.formats import (
    dolly_row,
    instances_row,
    processed_row,
    sni_task_row,
    sni_task_rows,
    vicuna_row,
    vicuna_rows,
)
from distillkit.data.loading import DEFAULT_SPLIT_SIZES

BUILTIN_FORMATS = [
    DataFormat("dolly", "raw databricks-dolly-15k rows: instruction, context, response, category",
               frozenset({"instruction", "context", "response"}), dolly_row),
    DataFormat("minillm", "processed rows of MiniLLM/PromptKD: instruction, input, output, prompt (optional)",
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
