"""Correctness at scale, on CPU: two processes under ``accelerate launch``
train the same parameters as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, assert_same_tensors

TWO_CPU_PROCESSES = REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"
# Dropout off: its masks come from each process's RNG, which no layout can share.
NO_DROPOUT = [f"{role}.config.{name}=0.0" for role in ("teacher", "student")
              for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
STEPS = 3


DEEPSPEED_ZERO2_ONE_PROCESS = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 1
mixed_precision: 'no'
deepspeed_config:
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
"""


def _train(recipe: Path, method: str, output: Path, *, processes: int, micro_batch_size: int = 0,
           launch_config: Path = TWO_CPU_PROCESSES, extra: tuple[str, ...] = ()) -> None:
    """``distillkit train`` in a fresh interpreter, under ``accelerate launch`` for 2 processes
    (or a given ``launch_config``).  The global batch of 8 is split into other micro-batches in
    each layout (1 x [4, 4] vs 2 x [2, 2]), and samples fill up to ``data.max_length`` (each row's
    limit binds)."""
    micro_batch_size = micro_batch_size or 4 // processes
    settings = [*NO_DROPOUT, f"training.micro_batch_size={micro_batch_size}", "generation.max_new_tokens=0", *extra]
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    command = ["-m", "distillkit", "train", "--method", method, "--recipe", str(recipe), "--output", str(output),
               "--max-steps", str(STEPS), *overrides]
    if processes > 1 or launch_config != TWO_CPU_PROCESSES:
        command = ["-m", "accelerate.commands.launch", "--config_file", str(launch_config),
                   "--num_processes", str(processes), "--main_process_port", "0", *command]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / name)


# MiniLLM is left out by design: each process keeps its own rollout buffer and pass order.
@pytest.mark.parametrize("method", ["kd", "seqkd", "gkd", "promptkd"])
def test_two_processes_train_the_same_parameters_as_one(method, recipe_file, tmp_path):
    recipe = recipe_file(steps=STEPS, eval_every=STEPS)
    single, double = tmp_path / "one", tmp_path / "two"
    _train(recipe, method, single, processes=1)  # also prepares the cached teacher the second run reuses
    _train(recipe, method, double, processes=2)

    checkpoint = f"checkpoints/step-{STEPS:07d}"
    states = [json.loads((run / checkpoint / "trainer_state.json").read_text()) for run in (single, double)]
    assert states[0]["tokens"] == states[1]["tokens"] > 0  # the same examples, split over the processes
    assert states[0]["generated_tokens"] == states[1]["generated_tokens"]  # and the same samples
    files = [f"{checkpoint}/model.safetensors"]
    if method != "kd":
        assert states[0]["generated_tokens"] > 0
    if method == "promptkd":
        files.append("best/teacher_adapter/adapter_model.safetensors")
    for name in files:
        one, two = _weights(single, name), _weights(double, name)
        assert one.keys() == two.keys()
        for key in one:
            # atol: the attention key bias has an exactly-zero true gradient, so Adam turns
            # float round-off of a different summation order into updates of up to ~1e-5; an
            # entry whose gradient is near zero can move by ~1e-4 (seen: 1.2e-4 in one SeqKD
            # MLP weight of 4,096 while the step losses agree to 1e-7; 2.5e-4 in one entry once the
            # losses' chunks, which follow the micro-batch, sum their gradients in closed form)
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=3e-4, msg=f"{name}: {key}")
    metrics = [(run / "metrics.jsonl").read_text().splitlines() for run in (single, double)]
    losses = [[json.loads(line).get("student/loss", json.loads(line).get("loss")) for line in lines[:STEPS]]
              for lines in metrics]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # validation is split over the processes, with per-prompt sampling: the same scores
    validations = [[json.loads(line) for line in lines if "val/rougeL" in line] for lines in metrics]
    assert len(validations[0]) == len(validations[1]) == 1
    for key in ("val/rougeL", "val/loss"):
        assert validations[0][0][key] == pytest.approx(validations[1][0][key], rel=1e-5)


def test_two_processes_fill_the_top_k_cache_that_one_process_reads(recipe_file, tmp_path):
    """The two processes each compute half of the teacher's top-k signal and the main one writes it; a
    one-process run then finds every row and trains the same parameters (k = 20: no other test's cache)."""
    recipe = recipe_file(steps=STEPS, eval_every=STEPS)
    top_k = ("teacher_signal.top_k=20",)
    _train(recipe, "kd", tmp_path / "two", processes=2, extra=top_k)
    (manifest,) = [path for path in (Path(os.environ["DISTILLKIT_CACHE_DIR"]) / "teacher_signals").glob("*/manifest.json")
                   if json.loads(path.read_text())["k"] == 20]
    written = manifest.read_text()
    _train(recipe, "kd", tmp_path / "one", processes=1, extra=top_k)
    assert manifest.read_text() == written  # nothing left to compute
    name = f"checkpoints/step-{STEPS:07d}/model.safetensors"
    one, two = _weights(tmp_path / "one", name), _weights(tmp_path / "two", name)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-4, msg=key)


@pytest.mark.parametrize("method", ["kd", "promptkd"])
def test_deepspeed_zero2_accumulates_like_distillkit(method, recipe_file, tmp_path):
    """Under DeepSpeed the engine accumulates the student's micro-batches, clips and steps
    (PromptKD's soft prompt keeps a plain torch optimizer): 4 micro-batches of 2 in a ZeRO-2
    engine give the parameters of distillkit's own loop over 2 micro-batches of 4.  Needs the
    deepspeed package, which CI does not install (it runs on CPU with DS_ACCELERATOR=cpu)."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero2.yaml"
    config.write_text(DEEPSPEED_ZERO2_ONE_PROCESS)
    recipe = recipe_file(steps=STEPS, eval_every=STEPS)
    _train(recipe, method, tmp_path / "plain", processes=1)
    _train(recipe, method, tmp_path / "zero2", processes=1, micro_batch_size=2, launch_config=config)
    files = ["best/model.safetensors"] + (["best/teacher_adapter/adapter_model.safetensors"] if method == "promptkd"
                                          else [])
    for name in files:
        plain, engine = _weights(tmp_path / "plain", name), _weights(tmp_path / "zero2", name)
        assert engine.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(engine[key], plain[key], rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")


def test_global_batch_must_split_evenly_over_processes(recipe_file, tmp_path):
    """6 examples per step cannot split into 2 processes x micro-batches of 2."""
    overrides = ["--set", "training.batch_size=6", "--set", "training.micro_batch_size=2"]
    command = ["-m", "accelerate.commands.launch", "--config_file", str(TWO_CPU_PROCESSES), "--main_process_port",
               "0", "-m", "distillkit", "train", "--method", "sft", "--recipe", str(recipe_file()), "--output",
               str(tmp_path / "run"), *overrides]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "must be a multiple of 2 process(es) x training.micro_batch_size (2)" in result.stderr


def test_teacher_placement_shard_needs_a_sharded_layout(recipe_file, tmp_path):
    from typer.testing import CliRunner

    from distillkit.cli import app

    result = CliRunner().invoke(app, ["train", "--method", "kd", "--recipe", str(recipe_file(steps=1)), "--output",
                                      str(tmp_path / "run"), "--set", "teacher.placement=shard"])
    assert result.exit_code == 2
    assert "teacher.placement = 'shard' needs an FSDP accelerate config" in " ".join(result.output.split())


def test_teacher_placement_offload_trains_on_cpu(recipe_file, tmp_path, monkeypatch):
    """On a CPU device the weights already live in CPU memory: offload keeps the frozen teacher there as it
    is (accelerate's ``cpu_offload`` hooks, which stream layers to a GPU, are not installed), so the run
    trains bit for bit what the replicate placement trains."""
    import accelerate

    from distillkit.training.pipeline import train
    from distillkit.training.trainer import Trainer

    def no_hooks(*args, **kwargs):
        raise AssertionError("cpu_offload must not wrap a teacher that already lives on the CPU device")

    monkeypatch.setattr(accelerate, "cpu_offload", no_hooks)
    teachers, fit = {}, Trainer.fit

    def fit_and_keep_teacher(self):
        best = fit(self)
        if self.run.teacher is not None:  # the KD run, not the teacher's SFT
            teachers[self.config.recipe.teacher.placement] = self.run.teacher.sampling_inputs()[0]
        return best

    monkeypatch.setattr(Trainer, "fit", fit_and_keep_teacher)
    recipe = str(recipe_file(steps=2, eval_every=2))
    runs = {placement: train("kd", recipe, output=tmp_path / placement, overrides=[f"teacher.placement={placement}"])
            for placement in ("replicate", "offload")}
    teacher = teachers["offload"]
    assert all(p.device.type == "cpu" and not p.requires_grad for p in teacher.parameters())
    assert not hasattr(teacher, "_hf_hook")
    assert_same_tensors(runs["replicate"] / "model.safetensors", runs["offload"] / "model.safetensors")
    losses = [[json.loads(line)["loss"] for line in (tmp_path / placement / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for placement in ("replicate", "offload")]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
