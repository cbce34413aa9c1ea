"""Hub-ready students (issue 18): a saved student is a plain transformers
folder with a generation config and a Hub model card; ``distillkit export``
copies it with the eval table and the teacher adapter in peft's format;
``--push-to-hub`` fails in one line where the Hub cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from distillkit.builtins.teacher_adapters import LoraTeacher
from distillkit.engine.prefix import prefix_embeddings, with_prefix_slots
from distillkit.errors import DistillkitError
from distillkit.evaluation.protocol import evaluate_sets
from distillkit.files import files_fingerprint
from distillkit.training.checkpoints import load_state
from distillkit.training.export import export_run, read_eval_reports
from distillkit.training.pipeline import train

from .conftest import REPO, TINY_RECIPE, make_run, tiny_model

STEPS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PromptKD run of the tiny recipe, STEPS steps, validated at the last (its best)."""
    folder = tmp_path_factory.mktemp("promptkd")
    recipe = folder / "test-tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=STEPS, eval_every=STEPS))
    with pytest.MonkeyPatch.context() as patch:  # the cache the function-scoped tests use
        patch.setenv("DISTILLKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        train("promptkd", str(recipe), output=folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def report_file(run_dir: Path) -> Path:
    """The JSON ``distillkit eval --model RUN --data dolly --seeds 10,20 --limit 2 --output F`` writes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILLKIT_CACHE_DIR", str(run_dir.parents[1] / "cache"))
        report = evaluate_sets(run_dir, ["dolly"], seeds=[10, 20], limit=2, notice=lambda _: None)["dolly"]
    path = run_dir.parent / "eval-dolly.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _tree(folder: Path) -> str:
    """A fingerprint of every file (and link target) under ``folder``."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return files_fingerprint(paths) + str(sorted(os.readlink(p) for p in folder.rglob("*") if p.is_symlink()))


def _exported(run_dir: Path, report_file: Path, dest: Path) -> Path:
    export_run(run_dir, dest, read_eval_reports([report_file]))
    return dest


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillkit", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "400", **env}, timeout=300)


def test_export_is_a_plain_transformers_folder_with_the_best_students_logits(run_dir, report_file, tmp_path):
    before = _tree(run_dir)
    folder = _exported(run_dir, report_file, tmp_path / "export")
    assert _tree(run_dir) == before, "the run folder must not change"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    best = AutoModelForCausalLM.from_pretrained(run_dir / "best").eval()
    text = "### Instruction:\nName a colour.\n\n### Response:\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids.tolist() == [AutoTokenizer.from_pretrained(run_dir / "best")(text)["input_ids"]]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, best(input_ids=ids).logits)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    # the recipe's evaluation sampling: temperature 1, top-k off (written out: transformers' default is 50),
    # [generation]'s 8 new tokens, [eval]'s no_repeat_ngram_size 6
    assert (generation.do_sample, generation.top_k, generation.top_p, generation.max_new_tokens,
            generation.no_repeat_ngram_size) == (True, 0, 1.0, 8, 6)
    out = model.generate(ids, generation_config=generation, attention_mask=torch.ones_like(ids))
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 8
    assert json.loads((folder / "run.json").read_text())["method"] == "promptkd"


def test_model_card_metadata_eval_table_and_recipe(run_dir, report_file, tmp_path):
    folder = _exported(run_dir, report_file, tmp_path / "export")
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["distillation", "distillkit", "promptkd"]
    assert data["teacher"] == "gpt2 built from the recipe's config"
    # both models are built from config, and 'dolly' is read from a local folder: no Hub ids to name
    assert "base_model" not in data and "datasets" not in data
    report = json.loads(report_file.read_text())
    row = (f"| dolly | {report['mean']:.2f} ± {report['std']:.2f} | {report['rougeL']['10']:.2f} | "
           f"{report['rougeL']['20']:.2f} | 2 |")
    assert "| set | mean ± std | seed 10 | seed 20 | examples |" in card.text and row in card.text
    assert "soft prompt on the teacher" in card.text  # the method's registered description
    state = json.loads((run_dir / f"checkpoints/step-{STEPS:07d}/trainer_state.json").read_text())
    assert f"| this student | {STEPS} of {STEPS} | {state['elapsed_s']:.1f} |" in card.text
    trainable = json.loads((run_dir / "run.json").read_text())["trainable_parameters"]
    assert f"{state['generated_tokens']:,} |" in card.text and f"student {trainable['student']:,}" in card.text
    recipe = card.text.split("```json\n")[1].split("\n```")[0]
    assert json.loads(recipe) == {k: v for k, v in json.loads((run_dir / "run.json").read_text()).items()
                                  if k in ("method", "recipe", "options", "training")}
    # best/'s own card: the validation metrics that selected it, no eval table
    best_card = ModelCard.load(run_dir / "best" / "README.md")
    assert best_card.data.to_dict() == data
    validation = json.loads((run_dir / "best" / "best.json").read_text())
    assert f"| {validation['rougeL']:.4g} | {validation['loss']:.4g} |" in best_card.text
    assert "seed 10" not in best_card.text


def test_promptkd_adapter_loads_in_peft_as_the_trained_prompt(run_dir, report_file, tmp_path):
    folder = _exported(run_dir, report_file, tmp_path / "export") / "teacher_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"], config["token_dim"],
            config["num_transformer_submodules"]) == ("PROMPT_TUNING", "CAUSAL_LM", 7, 48, 1)
    teacher_dir = (run_dir / "teacher").resolve()
    assert config["base_model_name_or_path"] == str(teacher_dir)
    assert json.loads((folder / "teacher.json").read_text())["prepared"] == str(teacher_dir)
    peft_teacher = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(teacher_dir), folder).eval()
    trained = load_state(run_dir / f"checkpoints/step-{STEPS:07d}/run_state_0")["teacher_adapter/0"]["weight"]
    saved = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(saved, trained)
    assert torch.equal(peft_teacher.get_prompt_embedding_to_save("default"), trained)
    # peft's prompted teacher gives the run's adapted teacher's logits (distillkit's prefix slots)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    slots, mask = with_prefix_slots(ids, torch.ones_like(ids), 7)
    with torch.no_grad(), prefix_embeddings(teacher, trained):
        expected = teacher(input_ids=slots, attention_mask=mask).logits[:, 7:]
    with torch.no_grad():
        torch.testing.assert_close(peft_teacher(input_ids=ids).logits[:, 7:], expected)


def test_lora_adapter_loads_in_peft(recipe_file, tokenizer, tmp_path):
    adapter = LoraTeacher(tiny_model(tokenizer, seed=4), make_run(recipe_file, tokenizer), rank=2)
    with torch.no_grad():
        for parameter in adapter.trainable_parameters():
            parameter.normal_()  # LoRA's B starts at zero: make the adapter change the logits
    adapter.save(tmp_path / "lora")
    loaded = PeftModel.from_pretrained(tiny_model(tokenizer, seed=4), tmp_path / "lora").eval()
    ids = torch.tensor([[3, 8, 21, 40]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapter.model(input_ids=ids).logits)
        assert not torch.allclose(loaded(input_ids=ids).logits, tiny_model(tokenizer, seed=4)(input_ids=ids).logits)


def test_export_refuses_a_non_empty_folder_and_a_bad_report(run_dir, report_file, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    with pytest.raises(DistillkitError, match="exists and is not empty") as error:
        export_run(run_dir, taken, {})
    assert "\n" not in str(error.value) and (taken / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    with pytest.raises(DistillkitError, match="inside the run folder"):
        export_run(run_dir, run_dir / "export", {})
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"step": 2, "loss": 1.0}))
    with pytest.raises(DistillkitError, match="is not an eval report"):
        read_eval_reports([bad])
    (tmp_path / "empty").mkdir()
    export_run(run_dir, tmp_path / "empty", {})  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()


@pytest.mark.parametrize("hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_push_without_a_hub_fails_in_one_line_and_keeps_the_export(hub, run_dir, report_file, tmp_path):
    env = {**hub, "HF_TOKEN": "hf_not_a_real_token"}
    dest = tmp_path / "export"
    result = _cli("export", str(run_dir), str(dest), "--eval-report", str(report_file), "--push-to-hub", "me/tiny",
                  env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Hub cannot be reached" in lines[0] and str(dest) in lines[0], result.stderr
    assert AutoModelForCausalLM.from_pretrained(dest) is not None and (dest / "README.md").is_file()
    assert (dest / "teacher_adapter" / "adapter_model.safetensors").is_file()


def test_train_checks_the_hub_before_loading_anything(run_dir, tmp_path):
    recipe = tmp_path / "test-tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=STEPS, eval_every=STEPS))
    output = tmp_path / "run"
    result = _cli("train", "--method", "kd", "--recipe", str(recipe), "--output", str(output), "--push-to-hub",
                  "me/tiny", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token",
                                  "DISTILLKIT_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Hub cannot be reached" in lines[0] and "OfflineModeIsEnabled" in lines[0]
    assert not output.exists() and not (tmp_path / "empty-cache").exists()  # no run, no tokenizer, no teacher


@pytest.mark.parametrize("student, base_model, says", [
    (["student.path=openai-community/gpt2"], "openai-community/gpt2", "the Hub model `openai-community/gpt2`"),
    (["student.path={local}"], None, "the folder `{local}`"),
    (["student.init_from=teacher", "student.num_layers=2"], "gpt2-xl",
     "cut from the teacher (2 evenly spaced decoder layers of the Hub model `gpt2-xl`)"),
])
def test_card_names_only_hub_models_and_datasets(student, base_model, says, recipe_file, tmp_path):
    """base_model is the student's Hub initialisation (none for a local folder), datasets a registered Hub id."""
    from distillkit.config import load_recipe, resolve_run
    from distillkit.config.run_folder import write_run_file
    from distillkit.training.model_card import model_card

    local = tmp_path / "student"
    local.mkdir()
    overrides = ["~student.config", "~teacher.config", "~teacher.sft", "teacher.path=gpt2-xl", "data.dataset=dolly-raw",
                 *(item.format(local=local) for item in student)]
    write_run_file(tmp_path, resolve_run(load_recipe(str(recipe_file()), overrides), "kd"), total_steps=4,
                   trainable_parameters={"student": 1})
    card = model_card(tmp_path, tmp_path)
    data = card.data.to_dict()
    assert data.get("base_model") == base_model and data["teacher"] == "gpt2-xl"
    assert data["datasets"] == ["databricks/databricks-dolly-15k"]  # dolly-raw's registered location
    assert says.format(local=local) in card.text
