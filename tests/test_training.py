"""End to end: every method trains a few steps on tiny models with a falling
loss; a killed run resumes to the same parameters; outputs are protected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillkit.errors import DistillkitError
from distillkit.registry import registry
from distillkit.training.pipeline import train
from distillkit.training.trainer import StepReport, Trainer

from .conftest import Killed, assert_same_tensors, instruction_examples, tiny_model, train_killed_during_step


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get(key, r.get(f"student/{key}")) for r in records if "val/rougeL" not in r]


# MiniLLM's total is dominated by a policy-gradient surrogate (whitened
# advantages, mean about 0) and the LM loss on changing batches; the
# divergence it minimises, the exact per-token reverse KL, is what must fall.
# OPD's loss is a one-sample estimate of the reverse KL; the exact one must fall
# (and at the test recipe's lr of 1e-2 Adam turns the estimate's noise into too large steps).
FALLING_TERM = {"minillm": "single_step", "opd": "reverse_kl"}
OVERRIDES = {"opd": ["methods.opd.training.lr=3e-3"]}
END_TO_END = ["sft", "kd", "seqkd", "gkd", "promptkd", "minillm", "abkd", "opd", "taid", "skd", "distillm2"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("method", END_TO_END)
def test_method_trains_with_falling_loss(method, recipe_file, tmp_path):
    best = train(method, str(recipe_file(steps=10, eval_every=5)), output=tmp_path / method,
                 overrides=OVERRIDES.get(method, []))
    losses = _losses(tmp_path / method, FALLING_TERM.get(method, "loss"))
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert (best / "model.safetensors").is_file() and (best / "tokenizer.json").is_file()
    assert json.loads((best / "best.json").read_text())["step"] in (5, 10)
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["method"] == method and run["total_steps"] == 10
    assert run["trainable_parameters"]["student"] > 0
    state = json.loads((tmp_path / method / "checkpoints" / "step-0000010" / "trainer_state.json").read_text())
    assert state["peak_memory_mb"] > 0 and state["elapsed_s"] > 0
    if registry().methods[method].source == "dataset":
        assert state["generated_tokens"] == 0
    elif method != "seqkd":  # SeqKD's generations may come from the cache of an earlier test
        assert state["generated_tokens"] > 0


def test_every_registered_method_trains(recipe_file, tmp_path):
    """Guards that a newly registered built-in method gets end-to-end coverage."""
    covered = set(END_TO_END)
    builtin = {n for n in registry().methods.names() if registry().methods.entry(n).plugin.startswith("distillkit:")}
    assert builtin <= covered, f"add {sorted(builtin - covered)} to test_method_trains_with_falling_loss"


def test_kd_leaves_teacher_untouched_and_reuses_cached_teacher(recipe_file, tmp_path):
    recipe = str(recipe_file(steps=3, eval_every=3))
    train("kd", recipe, output=tmp_path / "a")
    teacher_dir = (tmp_path / "a" / "teacher").resolve()
    before = _weights(teacher_dir)
    stamp = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    train("kd", recipe, output=tmp_path / "b", overrides=["methods.kd.kd_ratio=0.9"])
    assert (tmp_path / "b" / "teacher").resolve() == teacher_dir  # prepared once, reused
    assert (teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp
    after = _weights(teacher_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("method", "overrides"), [
    ("kd", ["student.config.resid_pdrop=0.1"]),  # dropout: the RNG state must be restored too
    ("minillm", ["methods.minillm.ppo_epochs=2"]),  # rollouts of steps 1-4 come from the step-0 student:
])                                                  # the buffer must be restored, not re-collected
def test_killed_run_resumes_to_identical_parameters(recipe_file, tmp_path, monkeypatch, method, overrides):
    recipe = str(recipe_file(steps=6, eval_every=2))
    train(method, recipe, output=tmp_path / "straight", overrides=overrides)
    # killed during step 4: after the step-2 checkpoint, before step 4's
    train_killed_during_step(monkeypatch, 4, lambda: train(method, recipe, output=tmp_path / "killed",
                                                           overrides=overrides))
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-0000002"]

    with pytest.raises(DistillkitError, match="already holds a run .* pass --resume"):
        train(method, recipe, output=tmp_path / "killed", overrides=overrides)
    train(method, recipe, output=tmp_path / "killed", overrides=overrides, resume=True)

    final = "checkpoints/step-0000006/model.safetensors"
    assert_same_tensors(tmp_path / "straight" / final, tmp_path / "killed" / final)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1  # no duplicated records after resume


def test_batch_size_must_divide(recipe_file, tmp_path):
    with pytest.raises(DistillkitError, match="batch_size .* must be a multiple of .*micro_batch_size"):
        train("sft", str(recipe_file()), output=tmp_path / "x", overrides=["training.micro_batch_size=3"])


@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_teacher_and_student_with_differently_padded_output_matrices_train(method, recipe_file, tmp_path):
    overrides = ["teacher.config.vocab_size=413", "student.config.vocab_size=405"]  # tokenizer: at most 400
    train(method, str(recipe_file(steps=3, eval_every=3)), output=tmp_path / method, overrides=overrides)
    losses = _losses(tmp_path / method)
    assert len(losses) == 3 and all(loss == loss and abs(loss) < 1e3 for loss in losses)  # finite


# --- library use: options of the loop ------------------------------------------------


def _trainer(recipe_file, tokenizer, tmp_path, overrides=(), examples=None, **kwargs) -> Trainer:
    """An SFT trainer of the test recipe on ``examples`` (default: 6 short ones), no validation set."""
    from distillkit.config import load_recipe, resolve_run

    config = resolve_run(load_recipe(str(recipe_file(steps=3, eval_every=3)), list(overrides)), "sft")
    examples = examples or instruction_examples(tokenizer, texts=[f"Count to {n}." for n in range(6)])
    return Trainer(config, tiny_model(tokenizer, seed=5), tokenizer, examples, [], tmp_path / "run", **kwargs)


def _fed(trainer: Trainer, steps: int) -> list[str]:
    return [e.example.instruction for k in range(steps) for e in trainer.examples_for_step(k)]


FILE_ORDER = ["training.shuffle=false", "training.group_by_length=false", "training.batch_size=4",
              "training.micro_batch_size=2"]


def test_examples_are_fed_in_file_order_or_a_given_order(recipe_file, tokenizer, tmp_path):
    texts = [f"Count to {n}." for n in range(6)]
    in_file_order = _trainer(recipe_file, tokenizer, tmp_path, FILE_ORDER)
    assert _fed(in_file_order, 4) == texts + texts  # 2 steps per epoch (4 + 2 examples), every epoch alike
    shuffled = _trainer(recipe_file, tokenizer, tmp_path / "b", FILE_ORDER[2:])
    assert sorted(_fed(shuffled, 2)) == sorted(texts) and _fed(shuffled, 2) != texts
    backwards = _trainer(recipe_file, tokenizer, tmp_path / "c", FILE_ORDER[2:],
                         example_order=lambda epoch: list(range(5, -1, -1)) if epoch == 0 else list(range(6)))
    assert _fed(backwards, 4) == texts[::-1] + texts
    broken = _trainer(recipe_file, tokenizer, tmp_path / "d", FILE_ORDER[2:], example_order=lambda epoch: [0, 0, 1])
    with pytest.raises(DistillkitError, match=r"example_order\(0\) must return a permutation of range\(6\)"):
        broken.examples_for_step(0)
    with pytest.raises(DistillkitError, match="'training.group_by_length' must be false when shuffle is false"):
        _trainer(recipe_file, tokenizer, tmp_path / "e", ["training.shuffle=false"])  # the recipe groups by length


def test_sorted_micro_batches_pad_less_and_make_the_same_update(recipe_file, tokenizer, tmp_path):
    texts = [("Count to three. " * n).strip() for n in (1, 6, 2, 5, 3, 4)]  # lengths spread out within one step
    examples = instruction_examples(tokenizer, texts=texts)
    whole = FILE_ORDER[:2] + ["training.batch_size=6", "training.micro_batch_size=6"]
    one = _trainer(recipe_file, tokenizer, tmp_path / "one", whole, examples=examples)
    sorted_ = _trainer(recipe_file, tokenizer, tmp_path / "sorted", whole[:-1] + [
        "training.micro_batch_size=2", "training.sort_micro_batches=true"], examples=examples)
    for module in [*one.run.student.modules(), *sorted_.run.student.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # GPT-2's default dropout would draw different masks for other batch shapes
    widths = [b.input_ids.shape[1] for b in sorted_.micro_batches(sorted_.examples_for_step(0))]
    assert len(widths) == 3 and widths == sorted(widths) and widths[0] < widths[-1]  # pairs of similar length
    (whole_batch,) = one.micro_batches(one.examples_for_step(0))
    assert 2 * sum(widths) < whole_batch.input_ids.numel()  # fewer padded positions
    logs_one, logs_sorted = one.train_step(), sorted_.train_step()
    assert logs_sorted["loss"] == pytest.approx(logs_one["loss"], rel=1e-5)
    assert logs_sorted["grad_norm/student"] == pytest.approx(logs_one["grad_norm/student"], rel=1e-4)
    for a, b in zip(one.run.student.parameters(), sorted_.run.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # Adam's first step is about lr = 1e-3 per element


@pytest.mark.parametrize(("name", "fused", "foreach"), [("adamw", False, None), ("adamw_foreach", False, True),
                                                        ("adamw_fused", True, None)])
def test_the_optimizer_implementation_is_chosen_by_the_recipe(recipe_file, tokenizer, tmp_path, name, fused,
                                                              foreach):
    trainer = _trainer(recipe_file, tokenizer, tmp_path, [f"training.optimizer={name}"])
    optimizer = trainer.optimization.optimizers["student"]
    assert bool(optimizer.defaults.get("fused")) is fused and optimizer.defaults["foreach"] is foreach
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # the same groups whatever the kernel
    assert math.isfinite(trainer.train_step()["loss"])


def test_an_unknown_or_unusable_optimizer_is_a_one_line_error(recipe_file, tokenizer, tmp_path, monkeypatch):
    from distillkit.config import load_recipe
    from distillkit.training import optimizers

    with pytest.raises(DistillkitError, match="'training.optimizer' must be one of 'adamw', 'adamw_foreach', "
                                              "'adamw_fused', got 'adam'"):
        load_recipe(str(recipe_file()), ["training.optimizer=adam"])

    def no_fused_kernels(*args, **kwargs):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")

    monkeypatch.setattr(optimizers.torch.optim, "AdamW", no_fused_kernels)
    with pytest.raises(DistillkitError, match="training.optimizer = 'adamw_fused' cannot be used here .*; set "
                                              "training.optimizer = 'adamw'"):
        _trainer(recipe_file, tokenizer, tmp_path, ["training.optimizer=adamw_fused"])


@pytest.mark.parametrize("shown", [True, False])
def test_the_progress_bar_can_be_turned_off(recipe_file, tokenizer, tmp_path, shown):
    import io

    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    _trainer(recipe_file, tokenizer, tmp_path, [f"training.progress_bar={str(shown).lower()}"], console=console).fit()
    assert ("3/3" in screen.getvalue()) is shown and ("tok/s" in screen.getvalue()) is shown


def test_each_step_is_reported_to_the_step_callback(recipe_file, tokenizer, tmp_path):
    reports: list[StepReport] = []
    _trainer(recipe_file, tokenizer, tmp_path, on_step=reports.append).fit()
    assert [r.step for r in reports] == [1, 2, 3] and all(r.seconds > 0 for r in reports)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.values for r in reports] == [{k: v for k, v in r.items() if k != "step"} for r in records]
    assert {"loss", "grad_norm/student", "lr/student", "tokens_per_s"} <= reports[0].values.keys()


def test_the_final_checkpoint_can_be_left_out_and_the_run_resumed(recipe_file, tmp_path):
    recipe, run = str(recipe_file(steps=4, eval_every=2)), tmp_path / "run"
    train("sft", recipe, output=run, overrides=["training.final_checkpoint=false"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # save_every = eval_every = 2
    assert json.loads((run / "best" / "best.json").read_text())["step"] in (2, 4)
    train("sft", recipe, output=run, resume=True)  # final_checkpoint may change on resume
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1


def test_a_run_folder_from_before_a_new_key_resumes_with_its_default(recipe_file, tmp_path):
    """run.json of a run made before ``training.optimizer`` existed: it reads as
    the default, so the run resumes, and a run that sets another value is refused."""
    recipe, run = str(recipe_file(steps=2, eval_every=2)), tmp_path / "run"
    train("sft", recipe, output=run)
    manifest = json.loads((run / "run.json").read_text())
    for section in (manifest["training"], manifest["recipe"]["training"]):
        del section["optimizer"]
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(DistillkitError, match="training.optimizer is 'adamw' there, 'adamw_fused' now"):
        train("sft", recipe, output=run, resume=True, overrides=["training.optimizer=adamw_fused"])
    train("sft", recipe, output=run, resume=True, max_steps=3)
    assert json.loads((run / "run.json").read_text())["training"]["optimizer"] == "adamw"
    assert (run / "checkpoints" / "step-0000003").is_dir()


def test_replace_dir_swaps_a_folder_in_whole_or_not_at_all(tmp_path):
    from distillkit.files import replace_dir

    final = tmp_path / "best"
    replace_dir(final, lambda folder: (folder.mkdir(), (folder / "a.txt").write_text("old")))
    replace_dir(final, lambda folder: (folder.mkdir(), (folder / "b.txt").write_text("new")))
    assert [p.name for p in final.iterdir()] == ["b.txt"]  # replaced, nothing of the old one left

    def dies(folder: Path) -> None:
        folder.mkdir()
        (folder / "half.txt").write_text("half")
        raise Killed

    with pytest.raises(Killed):
        replace_dir(final, dies)
    assert [p.name for p in final.iterdir()] == ["b.txt"]  # a killed writer leaves the last good folder
    replace_dir(final, lambda folder: (folder.mkdir(), (folder / "c.txt").write_text("next")))  # leftover cleared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and [p.name for p in final.iterdir()] == ["c.txt"]


def test_a_damaged_run_file_is_a_one_line_error(recipe_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"method": "sft", "recipe": {"data": {"max_length": "long"}}}')
    with pytest.raises(DistillkitError, match=r"run.json cannot be read \('recipe.data.max_length' must be int"):
        train("sft", str(recipe_file()), output=run, resume=True)
    (run / "run.json").write_text('{"method": ')
    with pytest.raises(DistillkitError, match="run.json cannot be read") as err:
        train("sft", str(recipe_file()), output=run, resume=True)
    assert "\n" not in str(err.value)
