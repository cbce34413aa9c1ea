"""Tokenization of examples, as the reference implementations do it."""

from __future__ import annotations

from typing import Any

from distillkit.api import InstructionExample, TokenizedExample
from distillkit.config.schema import LongPrompts
from distillkit.data.templates import format_prompt
from distillkit.errors import DistillkitError


def tokenize(
    examples: list[InstructionExample],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_length: int,
    long_prompts: LongPrompts,
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

    Length rules: an example whose prompt exceeds ``max_prompt_length``
    tokens is dropped (``long_prompts = "drop"``, as the reference does in
    training) or keeps the prompt's last ``max_prompt_length`` tokens
    (``"cut_left"``; the response is still the one sliced after the whole
    prompt).  Responses are cut so that prompt + response <= ``max_length``.
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
            if long_prompts == "drop":
                dropped += 1
                continue
            prompt = prompt[-max_prompt_length:]
        tokenized.append(TokenizedExample(prompt, response[: max_length - len(prompt)], example))
    return tokenized, dropped
