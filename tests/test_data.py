"""Data pipeline on real Dolly rows (processed format) and raw-format rows
written here: template, response masking, splits, resolution and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillkit.api import collate, left_pad
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
    tokenized, _ = tokenize(examples, tokenizer, max_prompt_length=1000, max_length=1500, training=False)
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
    train, dropped = tokenize(examples, tokenizer, max_prompt_length=60, max_length=80, training=True)
    evaluation, none_dropped = tokenize(examples, tokenizer, max_prompt_length=60, max_length=80, training=False)
    assert dropped > 0 and none_dropped == 0 and len(train) + dropped == len(evaluation) == 50
    assert all(len(t.prompt_ids) <= 60 and len(t.prompt_ids) + len(t.response_ids) <= 80 for t in evaluation)
    long_prompt = next(t for t in evaluation if len(t.prompt_ids) == 60)
    assert tokenizer.decode(long_prompt.prompt_ids).endswith("### Response:\n")  # the end is kept
    with pytest.raises(DistillkitError, match="max_prompt_length .* must be below"):
        tokenize(examples, tokenizer, max_prompt_length=80, max_length=80, training=True)


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
