"""Model loading and the shared-vocabulary check."""

from __future__ import annotations

import pytest
import torch

from distillkit.config import ModelConfig
from distillkit.engine.models import check_shared_vocabulary, load_model, save_model, train_bpe_tokenizer
from distillkit.errors import DistillkitError

from .conftest import tiny_model


def test_padded_vocabulary_is_accepted_and_sliced(tokenizer):
    padded = tiny_model(tokenizer, vocab_size=len(tokenizer) + 13)  # like OPT's 50272 rows for 50265 tokens
    assert padded.get_output_embeddings().weight.shape[0] == len(tokenizer) + 13
    check_shared_vocabulary(tokenizer, tokenizer)


def test_different_tokenizers_are_refused(tokenizer):
    other = train_bpe_tokenizer(["completely different text " * 50, "another corpus entirely"], 300)
    with pytest.raises(DistillkitError, match="teacher and student vocabularies differ .*teacher_signal.alignment"):
        check_shared_vocabulary(tokenizer, other)


def test_tokenizer_with_equal_vocab_but_other_eos_is_refused(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    from distillkit.engine.models import load_tokenizer

    copy = load_tokenizer(str(tmp_path))
    check_shared_vocabulary(tokenizer, copy)  # equal content, different objects: fine
    copy.eos_token = "Ġthe"
    with pytest.raises(DistillkitError, match="disagree on eos_token_id"):
        check_shared_vocabulary(tokenizer, copy)


def test_too_small_model_for_tokenizer(tokenizer):
    with pytest.raises(DistillkitError, match="output rows but the tokenizer has"):
        tiny_model(tokenizer, vocab_size=len(tokenizer) - 1)


def test_model_spec_errors(tokenizer):
    with pytest.raises(DistillkitError, match="set exactly one of 'student.path'"):
        load_model(ModelConfig(), tokenizer, "student")
    with pytest.raises(DistillkitError, match="needs a model_type"):
        load_model(ModelConfig(config={"n_layer": 1}), tokenizer, "student")
    with pytest.raises(DistillkitError, match="/nonexistent/model does not exist; check 'teacher.path'"):
        load_model(ModelConfig(path="/nonexistent/model"), tokenizer, "teacher")


def test_saved_model_reloads_identically(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=5)
    save_model(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = load_model(ModelConfig(path=str(tmp_path / "m")), tokenizer, "student")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_padded_output_matrices_of_different_sizes_work_for_every_divergence(recipe_file, tokenizer):
    """Teacher and student share the tokenizer but pad their output matrices differently (like OPT 50272 vs
    GPT-2 50257): every registered divergence compares the real vocabulary only, whatever the padded rows say."""
    from distillkit.api import collate
    from distillkit.builtins.teacher_adapters import FrozenTeacher
    from distillkit.engine.losses import masked_divergence
    from distillkit.registry import registry

    from .conftest import instruction_examples, make_run

    run = make_run(recipe_file, tokenizer, method="kd")
    run.student = tiny_model(tokenizer, vocab_size=len(tokenizer) + 5, seed=1).eval()
    teacher = tiny_model(tokenizer, vocab_size=len(tokenizer) + 13, seed=2)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[len(tokenizer):] = 50.0  # padded rows that would dominate a softmax
    run.teacher = FrozenTeacher(teacher, run)
    examples = instruction_examples(tokenizer)
    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tokenizer.pad_token_id)
    student, target = run.student_logits(batch), run.teacher_logits(batch)
    assert student.shape == target.shape and student.shape[-1] == len(tokenizer)
    with torch.no_grad():
        real = len(tokenizer)
        plain_student = run.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :real]
        plain_teacher = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :real]
    for name in registry().divergences.names():
        value = run.divergence(name, student, target, batch)
        assert torch.isfinite(value), name
        expected = masked_divergence(registry().divergences[name], plain_student, plain_teacher, batch.label_mask)
        assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7), name
