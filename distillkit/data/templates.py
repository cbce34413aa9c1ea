"""The prompt template: the Alpaca template of the PromptKD paper (Table 5),
with or without ``### Input:``, as gmkim-ai/PromptKD ``tools/process_data_dolly.py``
writes it; or an example's own prompt."""

from __future__ import annotations

from distillkit.api import InstructionExample

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
    """The prompt ``x`` of an example: its own ``prompt``, verbatim, when it
    carries one (``data.prompt = "field"``), else the Alpaca template."""
    if example.prompt is not None:
        return example.prompt
    template = PROMPT_WITH_INPUT if example.input.strip() else PROMPT_WITHOUT_INPUT
    return template.format(instruction=example.instruction, input=example.input)
