"""Exposure bias: per-step KL against a naive loop, the accumulation and
ExAccErr by hand, identical models, seeds, and the command."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from distillkit.cli import app
from distillkit.engine.models import save_model, train_bpe_tokenizer
from distillkit.evaluation.exposure_bias import ExposureBias, accumulate, measure, sample_prefixes, step_kl

from .conftest import instruction_examples, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tokenizer):
    """A tiny teacher and a smaller, differently initialised student."""
    return tiny_model(tokenizer, n_embd=48, seed=1), tiny_model(tokenizer, seed=2)


def naive_step_kl(teacher, student, prompt: list[int], response: list[int]) -> list[float]:
    """KL(p || q) of each response step in float64, one unpadded sequence at a time."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
        logq = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
    steps = range(len(prompt) - 1, len(prompt) + len(response) - 1)  # the position predicting y_t
    return [float((logp[i].exp() * (logp[i] - logq[i])).sum()) for i in steps]


def test_step_kl_matches_a_naive_float64_loop(tokenizer, pair):
    teacher, student = pair
    prompts = [example.prompt_ids for example in instruction_examples(tokenizer)]
    responses = [[5, 17, 42, tokenizer.eos_token_id], [8], [3, 1, 4, 1, 5, 9]]
    kl, scored = step_kl(teacher, student, prompts, responses, steps=7, pad_token_id=tokenizer.pad_token_id,
                         vocab_size=len(tokenizer), batch_size=2)
    assert kl.shape == scored.shape == (3, 7)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        expected = naive_step_kl(teacher, student, prompt, response)
        assert scored[row].tolist() == [t < len(response) for t in range(7)]
        assert kl[row, : len(response)].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert not kl[row, len(response):].any()


def test_accumulate_and_ex_acc_err_by_hand():
    kl = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]])  # (N=2, S=2, L=3)
    scored = torch.tensor([[[True, True, False], [True, False, False]], [[True] * 3, [True] * 3]])
    # prompt 0: steps (1+3)/2, 2/1, none running -> 0; prompt 1: 3, 3, 3; mean over prompts, then cumsum
    assert accumulate(kl, scored).tolist() == pytest.approx([2.5, 5.0, 6.5])
    running = torch.ones(5)
    result = ExposureBias(r=torch.tensor([2.0, 4.0, 6.0, 0.0, 1.0]), e=torch.tensor([1.0, 4.0, 3.0, 0.0, 0.0]),
                          r_running=running, e_running=running)
    assert result.ex_acc_err.tolist() == pytest.approx([100.0, 0.0, 100.0, 0.0, float("inf")])
    assert result.to_json()["ExAccErr"][:4] == pytest.approx([100.0, 0.0, 100.0, 0.0])


def _measure(tokenizer, teacher, student, *, seed: int = 10) -> ExposureBias:
    examples = instruction_examples(tokenizer)
    settings = {"steps": 6, "samples": 2, "seed": seed, "batch_size": 4}
    prefixes = sample_prefixes(teacher, tokenizer, examples, **settings)
    return measure(teacher, student, tokenizer, examples, prefixes, **settings)


def test_a_student_identical_to_the_teacher_has_no_exposure_bias(tokenizer, pair):
    teacher = pair[0]
    result = _measure(tokenizer, teacher, copy.deepcopy(teacher))
    assert not result.r.any() and not result.e.any()
    assert result.ex_acc_err.tolist() == [0.0] * 6


def test_seeds_make_the_analysis_reproducible(tokenizer, pair):
    first, again, other = (_measure(tokenizer, *pair, seed=seed) for seed in (10, 10, 20))
    assert torch.equal(first.r, again.r) and torch.equal(first.e, again.e)
    assert (first.r > 0).all() and (first.e > 0).all()
    assert not torch.equal(first.r, other.r)


@pytest.fixture
def folders(tmp_path, tokenizer, pair):
    """Saved model folders: the teacher and two students."""
    save_model(pair[0], tokenizer, tmp_path / "teacher")
    for name, seed in (("kd", 2), ("sft", 3)):
        save_model(tiny_model(tokenizer, seed=seed), tokenizer, tmp_path / name)
    return tmp_path


def analyze(folders, *args: str, teacher: str = "teacher"):
    return runner.invoke(app, ["analyze", "exposure-bias", "--teacher", str(folders / teacher), "--data", "dolly",
                               "--limit", "3", "--max-length", "12", "--samples", "2", "--batch-size", "6",
                               "--output", str(folders / "out"), *args])


def test_cli_writes_json_png_and_table(folders):
    result = analyze(folders, "--student", str(folders / "kd"), "--student", str(folders / "sft"))
    assert result.exit_code == 0, result.stderr
    report = json.loads((folders / "out" / "exposure_bias.json").read_text())
    assert report["examples"] == 3 and report["samples"] == 2 and report["max_length"] == 12
    assert set(report["students"]) == {"kd", "sft"}
    for student in report["students"].values():
        assert len(student["R"]) == len(student["E"]) == len(student["ExAccErr"]) == 12
        assert student["ExAccErr"][-1] == pytest.approx((student["R"][-1] / student["E"][-1] - 1) * 100)
        assert student["R"][0] == pytest.approx(student["E"][0])  # step 1 sees the prompt only
        for running in (student["R_running"], student["E_running"]):  # every sample runs at step 1, then some end
            assert len(running) == 12 and running[0] == 1.0 and running == sorted(running, reverse=True)
    assert (folders / "out" / "exposure_bias.png").read_bytes().startswith(b"\x89PNG")
    assert "l = 10" in result.stdout and "l = 12" in result.stdout


def test_cli_errors_are_one_line(folders):
    other = train_bpe_tokenizer(["Name a colour. Say hi. Tell me about cats."] * 5, 280)
    save_model(tiny_model(other), other, folders / "other")
    cases = [
        (["--student", str(folders / "missing")], "holds no model"),
        (["--student", str(folders / "other")], "vocabularies differ"),
        (["--student", str(folders / "kd"), "--label", "a", "--label", "b"], "one distinct --label per --student"),
    ]
    for args, message in cases:
        result = analyze(folders, *args)
        assert result.exit_code == 2, result.stdout
        assert message in result.stderr.replace("\n", " ") and "Traceback" not in result.stderr


def test_students_add_to_a_report_of_the_same_settings_and_other_settings_are_refused(folders, tokenizer):
    """The settings include the teacher's weights, wherever its folder is."""
    assert analyze(folders, "--student", str(folders / "kd")).exit_code == 0
    path = folders / "out" / "exposure_bias.json"
    first = json.loads(path.read_text())
    result = analyze(folders, "--student", str(folders / "sft"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(path.read_text())
    assert list(report["students"]) == ["kd", "sft"] and report["students"]["kd"] == first["students"]["kd"]
    assert "kd" in result.stdout and "sft" in result.stdout  # the table shows the whole report
    again = analyze(folders, "--student", str(folders / "kd"))  # measured again with the same seed: the same values
    assert again.exit_code == 0 and json.loads(path.read_text()) == report
    refused = analyze(folders, "--student", str(folders / "sft"), "--seed", "20")
    assert refused.exit_code == 2 and "measured with other settings (seed 10 there, 20 now)" in \
        refused.stderr.replace("\n", " ")
    assert json.loads(path.read_text()) == report  # nothing written
    shutil.copytree(folders / "teacher", folders / "moved")  # the same teacher in another folder: comparable
    moved = analyze(folders, "--student", str(folders / "kd"), teacher="moved")
    assert moved.exit_code == 0, moved.stderr
    assert json.loads(path.read_text()) == {**report, "teacher": str(folders / "moved")}
    save_model(tiny_model(tokenizer, seed=5), tokenizer, folders / "moved")  # other weights there: refused
    other = analyze(folders, "--student", str(folders / "kd"), teacher="moved")
    assert other.exit_code == 2 and "(teacher_weights '" in other.stderr.replace("\n", " ")
    path.write_text("{not json")
    broken = analyze(folders, "--student", str(folders / "sft"))
    assert broken.exit_code == 2 and "is not readable JSON" in broken.stderr.replace("\n", " ")
