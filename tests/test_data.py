"""Data pipeline on real Dolly rows (processed format) and raw-format rows
written here: template, response masking, splits, resolution and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillkit.api import InstructionExample, collate, left_pad
from distillkit.config import DataConfig
from distillkit.data.formats import read_rows
from distillkit.data.loading import DATA_DIR_ENV, load_eval_set, load_split, parse_rows
from distillkit.data.templates import format_prompt
from distillkit.data.tokenization import tokenize
from distillkit.errors import DistillkitError

from .conftest import DOLLY, write_jsonl


def test_real_dolly_splits_and_template():
    config = DataConfig(dataset="dolly")
    sizes = {split: len(load_split(config, split)) for split in ("train", "validation", "test")}
    assert sizes == {"train": 11235, "validation": 1000, "test": 500}
    # our template reproduces the stored MiniLLM prompt byte for byte, with and without input
    rows = [json.loads(line) for line in (DOLLY / "train.jsonl").read_text().splitlines()[:200]]
    examples = parse_rows(((row, "x") for row in rows), "minillm")
    assert any(row["input"] for row in rows) and any(not row["input"] for row in rows)
    assert [format_prompt(e) for e in examples] == [row["prompt"] for row in rows]


def test_response_mask_covers_exactly_response_and_eos(tokenizer):
    examples = load_split(DataConfig(dataset="dolly"), "test")[:4]
    tokenized, _ = tokenize(examples, tokenizer, max_prompt_length=1000, max_length=1500, long_prompts="cut_left")
    batch = collate([t.prompt_ids for t in tokenized], [t.response_ids for t in tokenized], tokenizer.pad_token_id)
    for row, item in enumerate(tokenized):
        prompt, response = len(item.prompt_ids), len(item.response_ids)
        mask = batch.response_mask[row].tolist()
        assert mask == [False] * prompt + [True] * response + [False] * (len(mask) - prompt - response)
        # the genuine EOS is a label even though pad == EOS
        if item.response_ids[-1] == tokenizer.eos_token_id:
            assert batch.label_mask[row, prompt + response - 2]
            assert batch.labels[row, prompt + response - 2] == tokenizer.eos_token_id
        assert tokenizer.decode(item.prompt_ids) == format_prompt(item.example)
    assert batch.attention_mask.sum() == sum(len(t.prompt_ids) + len(t.response_ids) for t in tokenized)


def test_length_limits(tokenizer):
    examples = load_split(DataConfig(dataset="dolly"), "test")[:50]
    train, dropped = tokenize(examples, tokenizer, max_prompt_length=60, max_length=80, long_prompts="drop")
    evaluation, none_dropped = tokenize(examples, tokenizer, max_prompt_length=60, max_length=80, long_prompts="cut_left")
    assert dropped > 0 and none_dropped == 0 and len(train) + dropped == len(evaluation) == 50
    assert all(len(t.prompt_ids) <= 60 and len(t.prompt_ids) + len(t.response_ids) <= 80 for t in evaluation)
    long_prompt = next(t for t in evaluation if len(t.prompt_ids) == 60)
    assert tokenizer.decode(long_prompt.prompt_ids).endswith("### Response:\n")  # the end is kept
    with pytest.raises(DistillkitError, match="max_prompt_length .* must be below"):
        tokenize(examples, tokenizer, max_prompt_length=80, max_length=80, long_prompts="drop")


def _dolly_rows(count: int) -> list[dict]:
    return [json.loads(line) for line in (DOLLY / "train.jsonl").read_text().splitlines()[:count]]


def test_prompt_field_is_taken_verbatim(tmp_path: Path, tokenizer):
    """data.prompt = "field": each row's own ``prompt`` is the model input (here real Dolly rows whose
    prompt was rewritten); "template" (the default) ignores the field and applies the Alpaca template."""
    rows = _dolly_rows(12)
    for row in rows[::2]:
        row["prompt"] = f"Question: {row['instruction']}\nAnswer:"
    write_jsonl(tmp_path / "rows.jsonl", rows)
    config = DataConfig(dataset=str(tmp_path), files={"train": "rows.jsonl"}, prompt="field")
    tokenized, _ = tokenize(load_split(config, "train"), tokenizer, max_prompt_length=1000, max_length=1500,
                            long_prompts="drop")
    assert [tokenizer.decode(t.prompt_ids) for t in tokenized] == [row["prompt"] for row in rows]
    templated = load_split(DataConfig(dataset=str(tmp_path), files={"train": "rows.jsonl"}), "train")
    assert [format_prompt(e) for e in templated] == [format_prompt(InstructionExample(r["instruction"], r["input"], ()))
                                                     for r in rows]
    assert format_prompt(templated[0]) != rows[0]["prompt"]
    # MiniLLM's stored Dolly prompts are the template: both settings give the same training tokens
    dolly = [load_split(DataConfig(dataset="dolly", prompt=source), "test")[:40] for source in ("field", "template")]
    tokens = [[(t.prompt_ids, t.response_ids) for t in tokenize(examples, tokenizer, max_prompt_length=1000,
                                                                max_length=1500, long_prompts="drop")[0]]
              for examples in dolly]
    assert dolly[0][0].prompt is not None and dolly[1][0].prompt is None and tokens[0] == tokens[1]


def test_prompt_field_must_be_present(tmp_path: Path):
    write_jsonl(tmp_path / "raw.jsonl", RAW_DOLLY_ROWS)  # raw Dolly rows carry no prompt
    with pytest.raises(DistillkitError, match=r"raw\.jsonl:1: data.prompt = 'field' but this row has no 'prompt' "
                                              r"field; give every row one or set data.prompt = 'template'"):
        load_split(DataConfig(dataset=str(tmp_path), files={"test": "raw.jsonl"}, prompt="field"), "test")


@pytest.mark.parametrize("long_prompts", ["drop", "cut_left"])
def test_long_training_prompts_follow_the_recipe(recipe_file, tokenizer, long_prompts):
    """data.long_prompts on the real Dolly training rows: "drop" leaves out the examples whose prompt is
    over max_prompt_length tokens (the references' training data), "cut_left" keeps their last tokens;
    validation prompts always keep their end."""
    from distillkit.config import load_recipe
    from distillkit.data.prepare import prepare_data

    recipe = load_recipe(str(recipe_file()), ["data.max_prompt_length=120", f"data.long_prompts={long_prompts}"])
    data = prepare_data(recipe, tokenizer)
    examples = load_split(recipe.data, "train")[: recipe.data.train_limit]
    full = tokenize(examples, tokenizer, max_prompt_length=10**5 - 1, max_length=10**5, long_prompts="drop")[0]
    long = [len(t.prompt_ids) > 120 for t in full]
    assert 0 < sum(long) < len(full) == 96
    kept = [t for t, over in zip(full, long) if long_prompts == "cut_left" or not over]
    assert [t.example for t in data.train] == [t.example for t in kept]
    assert [t.prompt_ids for t in data.train] == [t.prompt_ids[-120:] for t in kept]
    assert all(tokenizer.decode(t.prompt_ids).endswith("### Response:\n") for t in data.train)
    assert len(data.validation) == 1000 and max(len(t.prompt_ids) for t in data.validation) == 120


def test_left_pad_for_generation():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


RAW_DOLLY_ROWS = [
    {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
    {"instruction": "Summarise the text.", "context": "Cats sleep a lot.", "response": "Cats sleep.",
     "category": "summarization"},
]


def test_raw_dolly_format_is_detected_and_mapped(tmp_path: Path):
    path = write_jsonl(tmp_path / "raw.jsonl", RAW_DOLLY_ROWS * 15)
    examples = load_eval_set(str(path))
    assert len(examples) == 30
    assert examples[1].input == "Cats sleep a lot." and examples[1].references == ("Cats sleep.",)
    assert "### Input:\nCats sleep a lot." in format_prompt(examples[1])
    assert "### Input:" not in format_prompt(examples[0])
    # a single raw file is split reproducibly by seed
    config = DataConfig(dataset=str(path), split_seed=7)
    splits = {s: load_split(config, s) for s in ("train", "validation", "test")}
    assert sum(len(v) for v in splits.values()) == 30 and len(splits["test"]) == 3
    assert [e.origin for e in load_split(config, "test")] == [e.origin for e in splits["test"]]


def test_list_references_are_kept(tmp_path: Path):
    path = write_jsonl(tmp_path / "sni.jsonl", [{"instruction": "Say hi", "input": "", "output": ["hi", "hello"]}])
    assert load_eval_set(str(path))[0].references == ("hi", "hello")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([RAW_DOLLY_ROWS[0], "{not json"], r"bad\.jsonl:2: malformed JSON"),
        ([RAW_DOLLY_ROWS[0], {**RAW_DOLLY_ROWS[1], "response": "  "}], r"bad\.jsonl:2: empty response"),
        ([{"question": "q", "answer": "a"}], r"bad\.jsonl:1: no registered data format matches"),
        ([RAW_DOLLY_ROWS[0], {"instruction": 3, "context": "", "response": "x"}],
         r"bad\.jsonl:2: field 'instruction' must be a string"),
        (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object per line"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DistillkitError, match=message):
        load_eval_set(str(path))


def test_missing_dataset_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DistillkitError, match=rf"dataset 'dolly' not found: looked for folder 'databricks-dolly-15k' in {tmp_path}"):
        load_split(DataConfig(dataset="dolly"), "train")
    with pytest.raises(DistillkitError, match=rf"dataset 'someone/nothing' not found: looked in {tmp_path}/someone/nothing"):
        load_split(DataConfig(dataset="someone/nothing"), "train")


def test_hub_id_resolves_through_local_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my-instructions").mkdir()
    write_jsonl(tmp_path / "my-instructions" / "data.jsonl", RAW_DOLLY_ROWS)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    config = DataConfig(dataset="acme/my-instructions", files={"test": "data.jsonl"})
    assert [e.instruction for e in load_split(config, "test")] == ["Name a primary colour.", "Summarise the text."]
    with pytest.raises(DistillkitError, match="has no 'train' split"):
        load_split(config, "train")


def test_unsupported_file_type(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DistillkitError, match="unsupported data file type '.csv'"):
        list(read_rows(path))
