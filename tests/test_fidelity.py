"""Fidelity to the reference implementations (issue 12): each method's stage
losses and gradients against a short, plain transcription of the reference
code's formula, on a tiny model with dropout on where the reference's choice
of train/eval mode matters.

References (read through the search tool; file and function cited per test):
gmkim-ai/PromptKD (``finetune.py``, ``train_promptkd.py``, ``tools/``),
microsoft/LMOps ``minillm/`` and huggingface/trl ``trl/trainer/gkd_trainer.py``.
Tolerances: float32 model outputs against float64 transcriptions, rel 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.api import InstructionExample, TrainBatch, collate
from distillkit.builtins.sources import retokenized
from distillkit.builtins.teacher_adapters import FrozenTeacher, SoftPromptTeacher
from distillkit.config import GenerationConfig, ModelConfig
from distillkit.data.templates import format_prompt
from distillkit.data.tokenization import tokenize
from distillkit.engine.models import load_model
from distillkit.engine.sampling import sample
from distillkit.plugins.minillm import advantages, rewards
from distillkit.plugins.minillm.rollouts import RolloutBatch
from distillkit.registry import registry
from distillkit.training.trainer import Trainer

from .conftest import instruction_examples, make_run

TOL = {"rel": 1e-5, "abs": 1e-6}


def _model(tokenizer, *, seed: int, n_embd: int = 32, dropout: float = 0.0) -> torch.nn.Module:
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": n_embd, "n_head": 2, "n_positions": 256,
              "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    return load_model(ModelConfig(config=config, init_seed=seed), tokenizer, "student")


def _batch(tokenizer) -> TrainBatch:
    examples = instruction_examples(tokenizer)
    return collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tokenizer.pad_token_id)


def _run(recipe_file, tokenizer, method: str, *, overrides=(), teacher: str = "frozen", dropout: float = 0.1):
    """A run of ``method`` with a dropout-0.1 student and a dropout-free teacher."""
    run = make_run(recipe_file, tokenizer, method=method, overrides=overrides)
    run.student = _model(tokenizer, seed=7, dropout=dropout)
    teacher_model = _model(tokenizer, seed=9, n_embd=48)
    adapter = registry().teacher_adapters[teacher]
    run.teacher = adapter.build(teacher_model, run, **registry().methods[method].teacher_adapter_options(run.options))
    return run


def _stage_terms(run, stage_index: int, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """A stage's loss terms with the student in the mode the trainer sets."""
    stage = registry().methods[run.config.method].stages[stage_index]
    run.student.train(stage.student_mode_for(run.options) == "train")
    return stage.loss(run, batch)


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [g.double() for g in torch.autograd.grad(loss, params, retain_graph=True)]


def _assert_same_grads(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- transcriptions of the reference formulas (float64) --------------------------


def ref_lm_loss(logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    """finetune.py: ``nn.CrossEntropyLoss(ignore_index=-100)`` over the labels."""
    labels = batch.labels.masked_fill(~batch.label_mask, -100)
    return F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), ignore_index=-100)


def ref_soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """finetune.py ``get_distil_loss``: -sum_v p_teacher log q, masked by isinf(logits), mean over tokens."""
    teacher_probs = F.softmax(teacher_logits.double(), dim=-1)
    logprobs = F.log_softmax(logits.double(), dim=-1)
    x = torch.masked_fill(teacher_probs * logprobs, torch.isinf(logits), 0).sum(-1)
    return -(x * mask).sum() / mask.sum()


def ref_reverse_kl(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """train_promptkd.py ``get_distil_loss`` (the "reverse" branch):
    sum_v q log q - q log p over the vocabulary, mean over the loss mask."""
    probs = F.softmax(logits.double(), dim=-1)
    target_logprobs = F.log_softmax(target_logits.double(), dim=-1)
    cross = torch.masked_fill(probs * target_logprobs, torch.isinf(target_logits), 0)
    own = torch.masked_fill(probs * F.log_softmax(logits.double(), dim=-1), torch.isinf(logits), 0)
    return ((own - cross).sum(-1) * mask).sum() / mask.sum()


def ref_generalized_jsd(student_logits, teacher_logits, mask, beta: float) -> torch.Tensor:
    """trl ``GKDTrainer.generalized_jsd_loss`` (temperature 1.0, as ``compute_loss`` calls it; reduction batchmean)."""
    s, t = F.log_softmax(student_logits.double(), -1), F.log_softmax(teacher_logits.double(), -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        jsd = beta * F.kl_div(m, t, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            m, s, reduction="none", log_target=True)
    return jsd.sum(-1)[mask].sum() / mask.sum()


# --- SFT and KD (gmkim-ai/PromptKD finetune.py) ------------------------------------


def test_sft_is_the_reference_lm_loss(recipe_file, tokenizer):
    run, batch = _run(recipe_file, tokenizer, "sft"), _batch(tokenizer)
    torch.manual_seed(0)
    got = _stage_terms(run, 0, batch)["loss"]
    torch.manual_seed(0)  # the same dropout masks: the reference trains SFT in train mode too
    want = ref_lm_loss(run.student_logits(batch), batch)
    assert got.item() == pytest.approx(want.item(), **TOL)


def test_kd_matches_the_reference_loss_up_to_the_teacher_entropy(recipe_file, tokenizer):
    """finetune.py: (1 - kd_ratio) * lm_loss + kd_ratio * distil_loss, where
    distil_loss is the soft cross-entropy; distillkit's KL adds the teacher's
    entropy (a constant), so the gradients are the reference's."""
    run, batch = _run(recipe_file, tokenizer, "kd"), _batch(tokenizer)
    params = [p for p in run.student.parameters() if p.requires_grad]
    torch.manual_seed(0)
    got = _stage_terms(run, 0, batch)["loss"]
    torch.manual_seed(0)
    logits, teacher_logits = run.student_logits(batch), run.teacher_logits(batch)
    mask = batch.label_mask
    want = 0.5 * ref_lm_loss(logits, batch) + 0.5 * ref_soft_cross_entropy(logits, teacher_logits, mask)
    teacher_entropy = -(F.softmax(teacher_logits.double(), -1) * F.log_softmax(teacher_logits.double(), -1)).sum(-1)
    assert got.item() == pytest.approx(want.item() - 0.5 * teacher_entropy[mask].mean().item(), **TOL)
    _assert_same_grads(_grads(got, params), _grads(want, params))


# --- SeqKD (gmkim-ai/PromptKD generate.py + tools/process_data_dolly.py) ---------


def test_seqkd_targets_are_the_decoded_text_re_tokenized_with_eos(recipe_file, tokenizer):
    examples = [InstructionExample("Name a colour.", "", ("Red.",)), InstructionExample("Say hi", "", ("Hi.",))]
    tokenized, _ = tokenize(examples, tokenizer, max_prompt_length=96, max_length=128, long_prompts="drop")
    run = make_run(recipe_file, tokenizer, method="seqkd", examples=tokenized)
    eos = tokenizer.eos_token_id
    sampled = [tokenizer(" Blue, or green")["input_ids"] + [eos], tokenizer(" Hello there and")["input_ids"]]  # capped
    got = retokenized(run, tokenized, sampled)
    for example, ids, response in zip(examples, sampled, got):
        text = tokenizer.decode(ids, skip_special_tokens=True)  # generate.py: batch_decode(skip_special_tokens=True)
        prompt = format_prompt(example)
        prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)  # process_data_dolly.py Encoder.encode
        full_tokens = tokenizer.encode(prompt + text, add_special_tokens=False) + [eos]
        assert response == full_tokens[len(prompt_tokens):]
        assert response[-1] == eos  # the capped sample too
    assert registry().methods["seqkd"].source_options(run.options) == {"seed": 10, "targets": "text"}


# --- GKD (huggingface/trl gkd_trainer.py) ------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_matches_trl_generalized_jsd_without_dropout(recipe_file, tokenizer, beta):
    """TRL disables the student's dropout (GKDConfig.disable_dropout) and its
    loss runs at temperature 1 whatever the sampling temperature is."""
    run = _run(recipe_file, tokenizer, "gkd", overrides=[f"methods.gkd.beta={beta}", "generation.temperature=0.7"])
    batch = _batch(tokenizer)
    params = [p for p in run.student.parameters() if p.requires_grad]
    got = _stage_terms(run, 0, batch)["loss"]
    assert not run.student.training  # dropout off, deterministic
    want = ref_generalized_jsd(run.student_logits(batch), run.teacher_logits(batch), batch.label_mask, beta)
    assert got.item() == pytest.approx(want.item(), **TOL)
    _assert_same_grads(_grads(got, params), _grads(want, params))


def test_gkd_student_dropout_and_loss_temperature_are_options(recipe_file, tokenizer):
    run = _run(recipe_file, tokenizer, "gkd", overrides=["methods.gkd.student_dropout=true",
                                                         "methods.gkd.loss_temperature=2.0"])
    stage = registry().methods["gkd"].stages[0]
    assert stage.student_mode_for(run.options) == "train"
    run.student.eval()  # compare the temperature alone, on a deterministic forward
    terms = stage.loss(run, _batch(tokenizer))
    batch = _batch(tokenizer)
    want = ref_generalized_jsd(run.student_logits(batch) / 2.0, run.teacher_logits(batch) / 2.0, batch.label_mask,
                               run.options.beta)
    assert terms["loss"].item() == pytest.approx(want.item(), **TOL)


# --- PromptKD (gmkim-ai/PromptKD train_promptkd.py finetune) -----------------------


def test_promptkd_prompt_step_matches_the_reference(recipe_file, tokenizer):
    """teacher_loss = (1 - global_step / total_iters) * base_coef * L_base + L_teacher,
    global_step counting from 1; the student target in eval mode (get_distil_loss
    calls .eval() on it), the prompt-free teacher in eval mode."""
    run, batch = _run(recipe_file, tokenizer, "promptkd", teacher="soft_prompt"), _batch(tokenizer)
    assert isinstance(run.teacher, SoftPromptTeacher)
    prompt = run.teacher.prompt.weight
    got = _stage_terms(run, 0, batch)["loss"]  # run.step = 0: the first optimizer step
    assert not run.student.training
    prompted = run.teacher.logits(batch, grad=True)
    with torch.no_grad():
        run.student.eval()
        student = run.student_logits(batch)
        plain = run.teacher_logits(batch, adapted=False)
    mask = batch.label_mask
    base_ratio = 1 / run.total_steps  # global_step 1 of total_iters
    want = (1 - base_ratio) * ref_reverse_kl(prompted, plain, mask) + ref_reverse_kl(prompted, student, mask)
    assert got.item() == pytest.approx(want.item(), **TOL)
    _assert_same_grads(_grads(got, [prompt]), _grads(want, [prompt]))
    # the test can tell, at the precision it checks with: a student target in train mode (dropout 0.1)
    # is another loss (about 1e-3 away relative on this tiny model)
    run.student.train()
    noisy = registry().methods["promptkd"].stages[0].loss(run, batch)["loss"]
    assert noisy.item() != pytest.approx(want.item(), rel=100 * TOL["rel"])


def test_promptkd_student_step_matches_the_reference(recipe_file, tokenizer):
    """distil_loss = reverse KL(q_theta in train mode || p(.|P, x) in eval mode)."""
    run, batch = _run(recipe_file, tokenizer, "promptkd", teacher="soft_prompt"), _batch(tokenizer)
    params = [p for p in run.student.parameters() if p.requires_grad]
    torch.manual_seed(0)
    got = _stage_terms(run, 1, batch)["loss"]
    assert run.student.training
    torch.manual_seed(0)
    logits = run.student_logits(batch)
    want = ref_reverse_kl(logits, run.teacher_logits(batch), batch.label_mask)
    assert got.item() == pytest.approx(want.item(), **TOL)
    _assert_same_grads(_grads(got, params), _grads(want, params))


def test_reg_weight_counts_steps_from_one(recipe_file, tokenizer):
    """base_ratio = global_step / total_iters with global_step = 1 at the first step."""
    run = make_run(recipe_file, tokenizer)
    run.step = 0
    assert run.schedule("linear") == pytest.approx(1 - 1 / run.total_steps)
    run.step = run.total_steps - 1
    assert run.schedule("linear") == 0.0


def test_capped_student_samples_end_with_eos(tokenizer):
    """train_promptkd.py: ``response_ids[:, -1] = pad_token_id`` (pad = EOS) on
    samples padded to their 256-token limit, then the response runs through the
    first pad: a capped sample's last token becomes EOS; others are unchanged."""
    model, eos = _model(tokenizer, seed=3), tokenizer.eos_token_id
    prompts = [e.prompt_ids for e in instruction_examples(tokenizer)]
    kwargs = dict(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                  row_keys=[11, 12, 13])
    open_ = sample(model, prompts, GenerationConfig(max_new_tokens=5), **kwargs)
    closed = sample(model, prompts, GenerationConfig(max_new_tokens=5), capped_ending="eos", **kwargs)
    assert any(len(r) == 5 and eos not in r for r in open_)  # some sample was capped
    for a, b in zip(open_, closed):
        capped = eos not in a
        assert b == (a[:-1] + [eos] if capped else a)
    assert registry().methods["promptkd"].source_options(make_opts("promptkd")) == {"capped_ending": "eos"}


def make_opts(method: str):
    return registry().methods[method].options()


# --- the trainer sets each stage's student mode -----------------------------------


@pytest.mark.parametrize(("method", "teacher", "expected"), [
    ("promptkd", "soft_prompt", {(False, False), (True, True)}),  # prompt step's target in eval mode (no grad)
    ("gkd", "frozen", {(False, False), (False, True)}),  # GKD: no dropout, also when training
])
def test_trainer_runs_each_stage_in_the_reference_mode(recipe_file, tokenizer, tmp_path, method, teacher, expected):
    """Every student forward of one training step, as (train mode, grad)."""
    overrides = ["training.batch_size=3", "training.micro_batch_size=3", "methods.gkd.on_policy_fraction=1.0"]
    run = _run(recipe_file, tokenizer, method, overrides=overrides, teacher=teacher)
    examples = instruction_examples(tokenizer)
    trainer = Trainer(run.config, run.student, tokenizer, examples, [], tmp_path / "run",
                      teacher=_model(tokenizer, seed=9, n_embd=48), teacher_id="t")
    seen = set()
    trainer.run.student.register_forward_pre_hook(lambda m, args: seen.add((m.training, torch.is_grad_enabled())))
    trainer.train_step()
    assert seen == expected


# --- MiniLLM (microsoft/LMOps minillm/minillm/losses.py) ----------------------------


def test_minillm_loss_is_pg_plus_single_step_plus_pt(recipe_file, tokenizer):
    """trainer.py ``train``: loss = rl_loss + lm_coef * pt_loss, rl_loss = pg_loss +
    reg_loss (single_step_reg), pt_loss = (1 - kd_ratio) lm_loss + kd_ratio distil_loss."""
    run = make_run(recipe_file, tokenizer, method="minillm")
    run.teacher = FrozenTeacher(_model(tokenizer, seed=9, n_embd=48), run)
    run.student.eval()
    batch = _batch(tokenizer)
    mask = batch.label_mask
    with torch.no_grad():
        lp = run.student_logits(batch).log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0] * mask
        teacher_logits = run.teacher_logits(batch)
        tlp = teacher_logits.log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0] * mask
    rollout = RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_mask, lp, tlp, teacher_logits, batch)
    terms = registry().methods["minillm"].stages[0].loss(run, rollout)
    opts = run.options
    logits = run.student_logits(batch)
    # losses.py _reg_loss: sum (xent(q, p) - H(q)) * mask / mask.sum() = reverse KL
    single_step = ref_reverse_kl(logits, teacher_logits, mask)
    # losses.py pt_loss (finetune-style soft cross-entropy; distillkit's KL adds the constant teacher entropy)
    entropy = -(F.softmax(teacher_logits.double(), -1) * F.log_softmax(teacher_logits.double(), -1)).sum(-1)[mask]
    pt = (1 - opts.kd_ratio) * ref_lm_loss(logits, batch) + opts.kd_ratio * (
        ref_soft_cross_entropy(logits, teacher_logits, mask) - entropy.mean())
    # ratio = exp(logq - old) * w with old = logq here: rho = w; the surrogate's value is -mean(A * w)
    w = (lp[mask].double() - torch.logaddexp(lp[mask].double() + math.log(1 - opts.teacher_mix),
                                             tlp[mask].double() + math.log(opts.teacher_mix))).exp()
    data = run.config.recipe.data
    adv = advantages(rewards(rollout, opts), mask, opts.gamma, block_width=data.max_length - data.max_prompt_length)
    clipped = w.clamp(1 - opts.clip_ratio, 1 + opts.clip_ratio)
    pg = torch.maximum(-adv.double() * w, -adv.double() * clipped).mean()
    assert terms["pg"].item() == pytest.approx(pg.item(), **TOL)
    assert terms["single_step"].item() == pytest.approx(single_step.item(), **TOL)
    assert terms["pt"].item() == pytest.approx(pt.item(), **TOL)
    assert terms["loss"].item() == pytest.approx((pg + single_step + opts.lm_coef * pt).item(), **TOL)
