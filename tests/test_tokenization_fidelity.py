"""Tokenisation as the reference does it, on a tokenizer that adds a BOS
(OPT/Llama-like, built here offline) and on the GPT-2-style test tokenizer
(no BOS): prompts without special tokens, responses sliced from the joint
tokenisation, and the soft-prompt text init with the BOS."""

from __future__ import annotations

import pytest
import torch

from distillkit.builtins.teacher_adapters import PROMPT_INIT_TEXT, SoftPromptOptions, initial_prompt
from distillkit.config import DataConfig
from distillkit.data.loading import load_split
from distillkit.data.templates import format_prompt
from distillkit.data.tokenization import tokenize
from distillkit.errors import OptionError

from .conftest import tiny_model


@pytest.fixture(scope="module")
def examples():
    return load_split(DataConfig(dataset="dolly"), "test")[:40]


@pytest.fixture(scope="module")
def bos_tokenizer(examples):
    """A Llama-like tokenizer: BPE over a sentencepiece-style ``▁`` pre-tokenizer
    (a leading ``▁`` on the text's first word only, so a response tokenised
    alone differs from the same response after its prompt), whose
    post-processor adds ``<s>`` as Llama's and OPT's (``</s>``) do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(prepend_scheme="first")
    texts = [format_prompt(e) + e.references[0] for e in examples] + [PROMPT_INIT_TEXT]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>")


def reference_tokens(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Transcription of ``Encoder.encode`` in gmkim-ai/PromptKD
    ``tools/process_data_dolly.py`` (= microsoft/LMOps
    ``minillm/tools/process_data_dolly.py``): the prompt and response ids."""
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)
    full_tokens = tokenizer.encode(prompt + response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_tokens, full_tokens[len(prompt_tokens):]


def test_the_local_tokenizer_adds_a_bos(bos_tokenizer):
    assert bos_tokenizer.bos_token_id != bos_tokenizer.eos_token_id
    assert bos_tokenizer("hi")["input_ids"][0] == bos_tokenizer.bos_token_id


def test_prompts_have_no_bos_and_responses_come_from_the_joint_tokenisation(bos_tokenizer, examples):
    tokenized, dropped = tokenize(examples, bos_tokenizer, max_prompt_length=1000, max_length=10**5, long_prompts="drop")
    assert dropped == 0 and len(tokenized) == len(examples)
    for item in tokenized:
        assert bos_tokenizer.bos_token_id not in item.prompt_ids
        prompt, response = reference_tokens(bos_tokenizer, format_prompt(item.example), item.example.references[0])
        assert (item.prompt_ids, item.response_ids) == (prompt, response)
    # the slicing matters here: the response tokenised alone starts with "▁", after its prompt it does not
    alone = bos_tokenizer([e.references[0] for e in examples], add_special_tokens=False)["input_ids"]
    assert all(item.response_ids != ids + [bos_tokenizer.eos_token_id] for item, ids in zip(tokenized, alone))


def test_length_rules_with_the_reference_slicing(bos_tokenizer, examples):
    full = [reference_tokens(bos_tokenizer, format_prompt(e), e.references[0]) for e in examples]
    train, dropped = tokenize(examples, bos_tokenizer, max_prompt_length=60, max_length=90, long_prompts="drop")
    evaluation, _ = tokenize(examples, bos_tokenizer, max_prompt_length=60, max_length=90, long_prompts="cut_left")
    kept = [(p, r[: 90 - len(p)]) for p, r in full if len(p) <= 60]
    assert dropped == len(full) - len(kept) > 0
    assert [(t.prompt_ids, t.response_ids) for t in train] == kept
    # evaluation keeps the prompt's end; the response is still sliced after the whole prompt
    assert [(t.prompt_ids, t.response_ids) for t in evaluation] == [(p[-60:], r[: 90 - len(p[-60:])]) for p, r in full]


def test_gpt2_style_prompts_are_unchanged(tokenizer, examples):
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]  # no BOS
    tokenized, _ = tokenize(examples, tokenizer, max_prompt_length=1000, max_length=10**5, long_prompts="cut_left")
    prompts = tokenizer([format_prompt(e) for e in examples], add_special_tokens=True)["input_ids"]
    assert [t.prompt_ids for t in tokenized] == prompts
    for item in tokenized:
        reference = reference_tokens(tokenizer, format_prompt(item.example), item.example.references[0])
        assert (item.prompt_ids, item.response_ids) == reference


def test_text_init_starts_with_the_bos_and_cycles(bos_tokenizer):
    model = tiny_model(bos_tokenizer, seed=1)
    table = model.get_input_embeddings().weight.detach()
    ids = bos_tokenizer(PROMPT_INIT_TEXT)["input_ids"]  # PromptKD utils.py get_teacher_model: with special tokens
    assert ids[0] == bos_tokenizer.bos_token_id and len(ids) > 2
    prompt = initial_prompt(model, bos_tokenizer, 2 * len(ids) + 1, "text", PROMPT_INIT_TEXT)
    assert torch.equal(prompt[0], table[bos_tokenizer.bos_token_id])
    assert torch.equal(prompt, table[(ids * 3)[: 2 * len(ids) + 1]])  # cycled from the start, BOS included
    assert torch.equal(initial_prompt(model, bos_tokenizer, 2, "text", PROMPT_INIT_TEXT), table[ids[:2]])
    with pytest.raises(OptionError, match="init_text must be non-empty text"):  # a BOS alone is no init text
        SoftPromptOptions(init_text="")
