"""A teacher with another tokenizer than the student's (``[teacher_signal] alignment``), end to end: the test recipe's
400-token student tokenizer and a 700-token byte-level BPE teacher tokenizer trained on other real Dolly rows, a tiny
teacher built from config with that vocabulary.  KD and GKD train with a falling loss and resume exactly; methods that
read the teacher's dense logits, sample from the teacher or prepare it with ``teacher.sft`` are refused before any
training; a third-party alignment registered through the hook is used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillkit.api import VocabularyAlignment, hookimpl
from distillkit.config import DataConfig, load_recipe, resolve_run
from distillkit.data.loading import load_split
from distillkit.data.templates import format_prompt
from distillkit.engine.alignment import VocabularyMap, student_signal, teacher_view
from distillkit.engine.models import train_bpe_tokenizer
from distillkit.errors import DistillkitError
from distillkit.training.pipeline import train

from .conftest import assert_resumes_exactly, plugins_installed


@pytest.fixture(scope="session")
def teacher_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 700-token byte-level BPE tokenizer trained on 300 Dolly validation rows, saved to a folder."""
    examples = load_split(DataConfig(dataset="dolly"), "validation")[:300]
    folder = tmp_path_factory.mktemp("teacher-tokenizer")
    train_bpe_tokenizer((format_prompt(e) + e.references[0] for e in examples), 700).save_pretrained(folder)
    return folder


def aligned(folder: Path, name: str = "byte_match", top_k: int = 64) -> list[str]:
    """Overrides pairing the test recipe's teacher with the tokenizer in ``folder`` (no ``teacher.sft``)."""
    return ["~teacher.sft", f"teacher_signal.alignment={name}", f"teacher_signal.top_k={top_k}",
            f"teacher_signal.teacher_tokenizer={json.dumps(str(folder))}"]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val/rougeL" not in r]


@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_methods_train_with_a_teacher_of_another_tokenizer(method, recipe_file, tmp_path, teacher_tokenizer_dir):
    train(method, str(recipe_file(steps=10, eval_every=5)), output=tmp_path / method,
          overrides=aligned(teacher_tokenizer_dir))
    records = _records(tmp_path / method)
    losses = [r["loss"] for r in records]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    fractions = [r["aligned_fraction"] for r in records]
    assert all(0.2 < f <= 1.0 for f in fractions), fractions
    teacher = json.loads((tmp_path / method / "run.json").read_text())["recipe"]["teacher_signal"]
    assert teacher["alignment"] == "byte_match"
    assert not (tmp_path / method / "teacher").exists()  # a config-built teacher without teacher.sft: no folder


def test_a_teacher_view_longer_than_the_limit_is_cut(recipe_file, tmp_path, tmp_path_factory):
    """A finer teacher tokenizer (270 tokens: nearly bytes) makes views past data.max_length (the teacher's
    positions): they are cut there and the positions past the cut are left out, not an indexing error."""
    examples = load_split(DataConfig(dataset="dolly"), "validation")[:300]
    folder = tmp_path_factory.mktemp("fine-tokenizer")
    train_bpe_tokenizer((format_prompt(e) + e.references[0] for e in examples), 270).save_pretrained(folder)
    train("kd", str(recipe_file(steps=2, eval_every=2)), output=tmp_path / "kd", overrides=aligned(folder))
    fractions = [r["aligned_fraction"] for r in _records(tmp_path / "kd")]
    assert max(fractions) > 0.0 and all(f < 1.0 for f in fractions), fractions  # many responses lie past the cut


def test_the_teacher_keeps_its_own_vocabulary(recipe_file, tmp_path, teacher_tokenizer_dir, monkeypatch):
    """The teacher is built with the 700 tokens of its tokenizer and reads batches of its own tokens."""
    from distillkit.training import run as run_module

    widths = []
    original = run_module.Run.teacher_logits

    def recording(self, batch, **kwargs):
        logits = original(self, batch, **kwargs)
        widths.append((logits.shape[-1], int(batch.input_ids.max())))
        return logits

    monkeypatch.setattr(run_module.Run, "teacher_logits", recording)
    train("kd", str(recipe_file(steps=1, eval_every=1)), output=tmp_path / "kd", overrides=aligned(teacher_tokenizer_dir))
    assert widths and all(width == 700 for width, _ in widths)
    assert max(largest for _, largest in widths) >= 400  # ids only the teacher's vocabulary has


def test_a_killed_aligned_run_resumes_to_identical_parameters(recipe_file, tmp_path, monkeypatch,
                                                              teacher_tokenizer_dir):
    assert_resumes_exactly(monkeypatch, tmp_path, "kd", str(recipe_file(steps=4, eval_every=2)),
                           aligned(teacher_tokenizer_dir))


@pytest.mark.parametrize("method", ["promptkd", "minillm"])
def test_methods_that_read_dense_logits_are_refused_when_the_recipe_loads(method, recipe_file,
                                                                          teacher_tokenizer_dir):
    with pytest.raises(DistillkitError, match=f"method '{method}' reads the teacher's dense logits .* cannot pair "
                                              "a teacher with another tokenizer") as error:
        resolve_run(load_recipe(str(recipe_file()), aligned(teacher_tokenizer_dir)), method)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["seqkd", "distillm2"])
def test_methods_that_sample_from_the_teacher_are_refused_before_training(method, recipe_file, tmp_path,
                                                                          teacher_tokenizer_dir):
    with pytest.raises(DistillkitError, match=f"method '{method}' samples from the teacher, whose samples are in "
                                              "its own tokens") as error:
        train(method, str(recipe_file()), output=tmp_path / method, overrides=aligned(teacher_tokenizer_dir))
    assert "\n" not in str(error.value)
    assert not (tmp_path / method / "metrics.jsonl").exists()


def test_teacher_sft_is_refused_with_an_alignment(recipe_file, teacher_tokenizer_dir):
    overrides = aligned(teacher_tokenizer_dir)[1:]  # keeps [teacher.sft]
    with pytest.raises(DistillkitError, match="teacher.sft is not supported with teacher_signal.alignment"):
        resolve_run(load_recipe(str(recipe_file()), overrides), "kd")


def test_an_unknown_alignment_is_refused_with_the_nearest_name(recipe_file, teacher_tokenizer_dir):
    with pytest.raises(DistillkitError, match="'teacher_signal.alignment' must name a registered vocabulary "
                                              "alignment .*'byte_mach'.*did you mean 'byte_match'"):
        load_recipe(str(recipe_file()), aligned(teacher_tokenizer_dir, name="byte_mach"))


def test_an_alignment_needs_a_signal_width(recipe_file, teacher_tokenizer_dir):
    with pytest.raises(DistillkitError, match="'teacher_signal.top_k' must be > 0 with an alignment"):
        load_recipe(str(recipe_file()), aligned(teacher_tokenizer_dir, top_k=0))


class CountingAlignment:
    """A third-party alignment: byte matching, counting its calls."""

    calls = 0

    def __init__(self, teacher_tokenizer, student_tokenizer) -> None:
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.map = VocabularyMap.between(teacher_tokenizer, student_tokenizer)

    def teacher_view(self, batch):
        CountingAlignment.calls += 1
        return teacher_view(batch, self.student_tokenizer, self.teacher_tokenizer)

    def signal(self, teacher_logits, alignment, k):
        return student_signal(teacher_logits, alignment, self.map, k)


class CountingPlugin:
    @hookimpl
    def distillkit_register_alignments(self):
        return [VocabularyAlignment("counting", "byte matching, counted", CountingAlignment)]


def test_a_third_party_alignment_is_used(recipe_file, tmp_path, monkeypatch, teacher_tokenizer_dir):
    with plugins_installed(monkeypatch, {"counting-alignment": CountingPlugin()}):
        train("kd", str(recipe_file(steps=2, eval_every=2)), output=tmp_path / "kd",
              overrides=aligned(teacher_tokenizer_dir, name="counting"))
    assert CountingAlignment.calls == 2 * 2  # two micro-batches per step


def test_the_plan_counts_the_teacher_view_and_the_signal_without_a_fill(recipe_file, teacher_tokenizer_dir):
    from distillkit.engine.layout import Layout
    from distillkit.planning.plan import estimate

    recipe = load_recipe(str(recipe_file()), aligned(teacher_tokenizer_dir, top_k=16))
    plan = estimate(recipe, "kd", Layout())
    assert plan.teacher.vocab == 700 and plan.student.vocab == 400  # the teacher sized by its own tokenizer
    positions = recipe.training.micro_batch_size * recipe.data.max_length
    signal = next(row for row in plan.rows if row.name == "teacher signal")
    assert signal.when == "fwd/bwd" and signal.device == pytest.approx(positions * (12 * 16 + 5) / 2**20)
    view = next(row for row in plan.rows if row.name == "logits" and "teacher's view" in row.note)
    assert view.device == pytest.approx((positions + 2 * positions) * 700 * 4 / 2**20)  # chunk = all positions here
    assert "top-k fill" not in plan.phases()
