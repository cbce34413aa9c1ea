"""The paper's test sets (raw and processed adapters on the real files), the
reference-length filter, ROUGE-L, and multi-set evaluation with its per-cell
cache, through the API and the command line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from typer.testing import CliRunner

import distillkit.evaluation.protocol as evaluation
from distillkit.api import InstructionExample
from distillkit.cli import app
from distillkit.config import EvalConfig, load_recipe
from distillkit.data.formats import read_rows, sni_task_rows, vicuna_rows
from distillkit.data.loading import DATA_DIR_ENV, dataset_spec, keep_long_references, load_eval_set, parse_rows
from distillkit.engine.models import save_model
from distillkit.errors import DatasetUnavailable, DistillkitError

from .conftest import tiny_model, write_jsonl


def _key(example: InstructionExample) -> tuple:
    return example.instruction, example.input, example.references


# --- the sets on real rows -----------------------------------------------------------


@pytest.mark.parametrize(("name", "rows"), [("dolly", 500), ("selfinst", 242), ("vicuna", 80), ("sni", 1694),
                                            ("selfinst-raw", 252), ("vicuna-raw", 80), ("sni-raw", 300)])
def test_real_set_sizes(name: str, rows: int):
    assert len(load_eval_set(name)) == rows


def test_eval_set_prompts_follow_the_runs_data_prompt():
    """A run trained on the rows' own prompts (data.prompt = "field") is scored on them too."""
    templated, given = load_eval_set("dolly"), load_eval_set("dolly", "field")
    assert len(given) == len(templated) == 500
    assert all(e.prompt is None for e in templated) and all(e.prompt for e in given)
    raw = [row["prompt"] for row, _ in read_rows(Path(os.environ[DATA_DIR_ENV]) / "databricks-dolly-15k/minillm/valid.jsonl")]
    assert [e.prompt for e in given] == raw


def test_raw_selfinst_holds_minillm_processed_rows():
    raw = load_eval_set("selfinst-raw")
    assert raw[0].origin.endswith("user_oriented_instructions.jsonl:1 instances[0]")
    assert {_key(e) for e in load_eval_set("selfinst")} <= {_key(e) for e in raw}


def test_raw_vicuna_joins_questions_with_gpt35_answers():
    raw, processed = load_eval_set("vicuna-raw"), load_eval_set("vicuna")
    assert {_key(e) for e in raw} == {_key(e) for e in processed}  # MiniLLM's references are the GPT-3.5 answers
    assert raw[0].instruction == "How can I improve my time management skills?" and raw[0].input == ""


def test_raw_sni_reads_the_task_files_present_and_says_so(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="distillkit.data.formats"):
        raw = load_eval_set("sni-raw")
    assert "3 of 119 test task files found" in caplog.text
    tasks = {e.origin.split("/tasks/")[1].split(".json")[0] for e in raw}
    assert tasks == {"task1393_superglue_copa_text_completion", "task648_answer_generation",
                     "task957_e2e_nlg_text_generation_generate"}
    # the one task MiniLLM kept (long references) matches its processed rows exactly
    processed = {_key(e) for e in load_eval_set("sni")}
    task957 = [e for e in raw if "task957" in e.origin]
    assert len(task957) == 100 and all(_key(e) in processed for e in task957)


def test_missing_set_is_an_error_with_its_reason():
    with pytest.raises(DistillkitError, match="dataset 'unni' is not available: the UnNI eval data is not"):
        load_eval_set("unni")


# --- adapters on rows written here -------------------------------------------------


UNNI_ROWS = [
    {"instruction": "You are given a word. Reverse it.",
     "instances": [{"instruction_with_input": "You are given a word. Reverse it.\nWord: cat", "input": "Word: cat",
                    "constraints": "None.", "output": "tac"},
                   {"instruction_with_input": "You are given a word. Reverse it.\nWord: dog", "input": "Word: dog",
                    "constraints": "None.", "output": "god"}]},
    {"instruction": "Write a sentence about the topic.",
     "instances": [{"instruction_with_input": "Write a sentence about the topic.\nTopic: rain", "input": "Topic: rain",
                    "constraints": "The output should be one sentence.", "output": "Rain fell all night."}]},
]


def test_unni_core_rows_give_one_example_per_instance(tmp_path: Path):
    examples = load_eval_set(str(write_jsonl(tmp_path / "core_data.jsonl", UNNI_ROWS)))
    assert [_key(e) for e in examples] == [
        ("You are given a word. Reverse it.", "Word: cat", ("tac",)),
        ("You are given a word. Reverse it.", "Word: dog", ("god",)),
        ("Write a sentence about the topic.", "Topic: rain", ("Rain fell all night.",)),
    ]
    assert examples[1].origin.endswith("core_data.jsonl:1 instances[1]")
    assert parse_rows(read_rows(tmp_path / "core_data.jsonl"), "unni-core") == examples


def test_unni_reads_the_core_file_once_it_is_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetUnavailable, match="not available: the UnNI eval data"):
        load_eval_set("unni")
    (tmp_path / "unnatural-instructions").mkdir()
    write_jsonl(tmp_path / "unnatural-instructions" / "core_data.jsonl", UNNI_ROWS)
    examples = load_eval_set("unni")
    assert len(examples) == 3 and dataset_spec("unni").min_reference_tokens == 11


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([UNNI_ROWS[0], {"instruction": "x", "instances": "tac"}],
         r"bad\.jsonl:2: field 'instances' must be a non-empty list of instances \(format 'unni-core'\)"),
        ([{"instruction": "x", "instances": [{"input": "a", "output": "b"}, {"input": "a"}]}],
         r"bad\.jsonl:1: instances\[1\]: missing field 'output'"),
        ([{"instruction": "x", "instances": [["a", "b"]]}], r"bad\.jsonl:1: instances\[0\]: expected an object"),
    ],
)
def test_bad_multi_instance_rows_name_file_line_and_instance(tmp_path: Path, rows, message):
    with pytest.raises(DistillkitError, match=message):
        load_eval_set(str(write_jsonl(tmp_path / "bad.jsonl", rows)))


def test_bad_vicuna_and_sni_files_name_file_and_line(tmp_path: Path):
    write_jsonl(tmp_path / "question.jsonl", [{"question_id": 1, "text": "Hi?"}, {"question_id": 2, "text": "Why?"}])
    write_jsonl(tmp_path / "answer_gpt35.jsonl", [{"question_id": 1, "text": "Hello."}])
    with pytest.raises(DistillkitError, match=r"question\.jsonl:2: no answer with question_id 2 in answer_gpt35"):
        parse_rows(vicuna_rows(tmp_path / "question.jsonl"), "vicuna")
    write_jsonl(tmp_path / "test_references.jsonl", [{"id": "t1-a", "task_id": "t1", "references": ["x"]}, "{"])
    with pytest.raises(DistillkitError, match=r"test_references\.jsonl:2: malformed JSON"):
        list(sni_task_rows(tmp_path / "test_references.jsonl"))
    write_jsonl(tmp_path / "test_references.jsonl", [{"id": "t1-a", "task_id": "t1", "references": ["x"]}])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t1.json").write_text('{\n  "Definition": ["Do it."],\n  "Instances": [\n}\n')
    with pytest.raises(DistillkitError, match=r"tasks/t1\.json:4: malformed JSON"):
        list(sni_task_rows(tmp_path / "test_references.jsonl"))
    (tmp_path / "tasks" / "t1.json").write_text(json.dumps(
        {"Definition": ["Do it."], "Instances": [{"id": "t1-a", "input": "in", "output": ["stale"]},
                                                 {"id": "t1-b", "input": "not a test id", "output": ["y"]}]}))
    examples = parse_rows(sni_task_rows(tmp_path / "test_references.jsonl"), "sni-task")
    assert [_key(e) for e in examples] == [("Do it.", "in", ("x",))]  # test ids only, official references


# --- reference-length filter -------------------------------------------------------


class WordTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [[0] * len(text.split()) for text in texts]}


def test_length_filter_keeps_references_of_at_least_min_tokens(tokenizer):
    words = [" ".join(["word"] * n) for n in (3, 10, 11, 12)]
    examples = [InstructionExample("i", "", (text, "a much longer second reference " * 5)) for text in words]
    kept = keep_long_references(examples, WordTokenizer(), 11)
    assert [len(e.references[0].split()) for e in kept] == [11, 12]  # the first reference counts
    assert keep_long_references(examples, WordTokenizer(), 0) == examples
    # on the real raw S-NI file, with a real tokenizer: kept iff >= 11 tokens
    raw = load_eval_set("sni-raw")
    kept = keep_long_references(raw, tokenizer, 11)
    lengths = {_key(e): len(tokenizer(e.references[0], add_special_tokens=False)["input_ids"]) for e in raw}
    assert 0 < len(kept) < len(raw)
    assert {_key(e) for e in kept} == {k for k, n in lengths.items() if n >= 11}


# --- ROUGE-L -----------------------------------------------------------------------


def test_rouge_l_matches_rouge_score_on_known_strings():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert evaluation.rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert evaluation.rouge_l("completely different words", ["the cat sat"]) == 0.0
    # LCS "the cat on the mat": 5 of 6 tokens on both sides, so F1 = 5/6
    assert evaluation.rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    assert evaluation.rouge_l("Cats running", ["cat runs"]) == pytest.approx(100.0)  # stemming, lower case
    assert evaluation.rouge_l("a b c", ["x y", "a b d"]) == pytest.approx(200 / 3)  # best reference
    for prediction, reference in [("a quick brown fox", "the quick fox jumped"), ("one two", "two one three")]:
        expected = 100 * scorer.score(reference, prediction)["rougeL"].fmeasure
        assert evaluation.rouge_l(prediction, [reference]) == pytest.approx(expected)


# --- evaluate_sets and its cache ---------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny saved model with a run.json asking for short generations, and a cache of its own."""
    monkeypatch.setenv("DISTILLKIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    save_model(tiny_model(tokenizer, seed=3), tokenizer, folder)
    recipe = {"data": {"max_prompt_length": 96, "max_length": 128}, "generation": {"max_new_tokens": 6,
                                                                                   "batch_size": 4}}
    (folder / "run.json").write_text(json.dumps({"recipe": recipe}))
    return folder


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The seeds that :func:`distillkit.evaluation.generate` was called with."""
    calls: list[int] = []
    original = evaluation.generate

    def counting(*args, seed: int, **kwargs):
        calls.append(seed)
        return original(*args, seed=seed, **kwargs)

    monkeypatch.setattr(evaluation, "generate", counting)
    return calls


def _scores(reports: dict[str, dict]) -> dict[str, dict]:
    return {name: report.get("rougeL", report) for name, report in reports.items()}


def test_default_seeds_are_the_papers():
    assert EvalConfig().seeds == [10, 20, 30, 40, 50]
    assert load_recipe("tiny").eval.seeds == [10, 20, 30]  # the CPU recipe keeps three for speed


def test_evaluate_sets_caches_each_set_and_seed(model_dir: Path, generations: list[int]):
    seen: list[tuple[int, int]] = []
    sets = ["dolly", "vicuna-raw", "unni"]
    first = evaluation.evaluate_sets(model_dir, sets, seeds=[10, 20], limit=3, progress=lambda d, t: seen.append((d, t)),
                                     notice=lambda text: None)
    assert list(first) == sets and sorted(generations) == [10, 10, 20, 20]
    assert seen[-1] == (12, 12)  # 2 sets x 2 seeds x 3 examples
    assert first["unni"] == {"missing": dataset_spec("unni").missing_reason}
    dolly = first["dolly"]
    assert dolly["examples"] == 3 and set(dolly["rougeL"]) == {"10", "20"} and dolly["generated_tokens"] > 0
    assert dolly["mean"] == pytest.approx(sum(dolly["rougeL"].values()) / 2)
    generations.clear()
    assert evaluation.evaluate_sets(model_dir, sets, seeds=[10, 20], limit=3, notice=lambda text: None) == first
    assert generations == []
    third = evaluation.evaluate_sets(model_dir, sets, seeds=[10, 20, 30], limit=3, notice=lambda text: None)
    assert generations == [30, 30]
    assert all(third[s]["rougeL"][k] == first[s]["rougeL"][k] for s in ("dolly", "vicuna-raw") for k in ("10", "20"))
    generations.clear()
    single = evaluation.evaluate_model_dir(model_dir, "dolly", seeds=[20, 30], limit=3, notice=lambda text: None)
    assert generations == [] and single["rougeL"] == {"20": dolly["rougeL"]["20"], "30": third["dolly"]["rougeL"]["30"]}
    with pytest.raises(DistillkitError, match="dataset 'unni' is not available"):
        evaluation.evaluate_model_dir(model_dir, "unni", seeds=[10], notice=lambda text: None)


def test_cache_is_invalidated_by_new_weights_limit_or_a_broken_entry(model_dir: Path, tokenizer,
                                                                     generations: list[int]):
    evaluation.evaluate_sets(model_dir, ["dolly"], seeds=[10, 20], limit=2, notice=lambda text: None)
    cells = sorted((Path(evaluation.cache_root()) / "eval").rglob("seed10-*.json"))
    assert len(cells) == 1 and json.loads(cells[0].read_text())["samples"]
    cells[0].write_text('{"rougeL": 1')  # a torn write: recomputed, not trusted
    generations.clear()
    evaluation.evaluate_sets(model_dir, ["dolly"], seeds=[10, 20], limit=2, notice=lambda text: None)
    assert generations == [10]
    generations.clear()
    evaluation.evaluate_sets(model_dir, ["dolly"], seeds=[10], limit=3, notice=lambda text: None)
    assert generations == [10]
    (model_dir / "README.md").write_text("a new model card")  # records of the model, not the model: reused
    (model_dir / "best.json").write_text('{"step": 3, "cost": {"elapsed_s": 1.5}}')
    generations.clear()
    evaluation.evaluate_sets(model_dir, ["dolly"], seeds=[10, 20], limit=2, notice=lambda text: None)
    assert generations == []
    save_model(tiny_model(tokenizer, seed=4), tokenizer, model_dir)  # new weights, same folder
    generations.clear()
    evaluation.evaluate_sets(model_dir, ["dolly"], seeds=[10, 20], limit=2, notice=lambda text: None)
    assert generations == [10, 20]
    assert not list((Path(evaluation.cache_root()) / "eval").rglob("*.tmp"))


def test_length_filtered_set_records_the_counting_tokenizer(model_dir: Path):
    notes: list[str] = []
    report = evaluation.evaluate_sets(model_dir, ["sni-raw"], seeds=[10], limit=2, notice=notes.append)["sni-raw"]
    assert report["examples"] == 2
    kept = report["reference_filter"]["kept"]
    assert report["reference_filter"] == {"min_tokens": 11, "counted_with": str(model_dir), "kept": kept, "rows": 300}
    assert 2 < kept < 300
    assert f"sni-raw: {kept} of 300 examples have a reference of >= 11 tokens (counted with the model's tokenizer)" \
        in notes


def test_cli_eval_on_several_sets(model_dir: Path):
    out_file = model_dir.parent / "scores.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--data", "dolly,selfinst-raw,unni",
                                      "--seeds", "10,20", "--limit", "2", "--output", str(out_file)])
    assert result.exit_code == 0, result.stderr
    for text in ("dolly", "selfinst-raw", "unni", "missing:", "mean ± std", "seed 20"):
        assert text in result.stdout
    reports = json.loads(out_file.read_text())
    assert list(reports) == ["dolly", "selfinst-raw", "unni"] and "missing" in reports["unni"]
    assert reports["selfinst-raw"]["examples"] == 2 and set(reports["selfinst-raw"]["rougeL"]) == {"10", "20"}
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--data", "dolly", "--limit", "1",
                                      "--output", str(out_file)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out_file.read_text())  # one set: its report, as before
    assert report["data"] == "dolly" and list(report["rougeL"]) == ["10", "20", "30", "40", "50"]  # the paper's


def test_a_seeded_subset_is_fixed_ordered_and_spread_over_the_set():
    rows = list(range(1694))  # S-NI's size
    subset = evaluation.seeded_subset(rows, 100)
    assert len(subset) == 100 == len(set(subset)) and subset == sorted(subset)
    assert subset == evaluation.seeded_subset(list(range(1694)), 100)  # a pure function of the seed and size
    assert min(subset) < 1694 * 0.1 and max(subset) > 1694 * 0.9  # spans the set, unlike its first 100
    assert set(evaluation.seeded_subset(rows, 50)) <= set(subset)  # a smaller subset is nested in a larger one
    assert evaluation.seeded_subset(rows, 0) == evaluation.seeded_subset(rows, 5000) == rows


def test_a_subset_is_reported_and_keyed_apart_from_the_first_examples(model_dir: Path, generations: list[int]):
    subset = evaluation.evaluate_sets(model_dir, ["vicuna-raw"], seeds=[10], subsets={"vicuna-raw": 5},
                                      notice=lambda text: None)["vicuna-raw"]
    assert subset["examples"] == 5 and subset["subset"] == {"size": 5, "of": 80, "seed": evaluation.SUBSET_SEED}
    picked = evaluation.seeded_subset(list(range(80)), 5)
    assert picked != list(range(5))
    questions = [json.loads(line)["text"] for line in
                 (Path(os.environ["DISTILLKIT_DATA_DIR"]) / "vicuna-80" / "question.jsonl").read_text().splitlines()]
    assert subset["samples"][0]["instruction"] == questions[picked[0]]
    first = evaluation.evaluate_sets(model_dir, ["vicuna-raw"], seeds=[10], limit=5,
                                     notice=lambda text: None)["vicuna-raw"]
    assert generations == [10, 10]  # the first five examples are another cell
    assert "subset" not in first and first["samples"][0]["instruction"] == questions[0]
    generations.clear()
    evaluation.evaluate_sets(model_dir, ["vicuna-raw"], seeds=[10], subsets={"vicuna-raw": 5}, notice=lambda text: None)
    assert generations == []  # the subset's cell is cached
