"""Stateful schedules, the per-step callback (``Method.after_step``) and TAID:
a third-party plugin's schedule state and callback survive a kill/resume bit
for bit; TAID's target, loss, gradients and t-update against a transcription
of SakanaAI/TAID ``src/distil_losses/taid.py``; TAID trains end to end with a
falling loss and resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distillkit import hookimpl
from distillkit.api import Method, Schedule, Stage, StepContext, TrainBatch
from distillkit.builtins.divergences import forward_kl
from distillkit.errors import DistillkitError
from distillkit.training.checkpoints import load_state
from distillkit.training.pipeline import train
from plugins.taid import TAIDOptions, cross_entropy, initial_state, taid_loss, update

from .conftest import assert_same_tensors, plugins_installed, train_killed_during_step
from .test_faults import _one_line_error

# --- a transcription of the reference (SakanaAI/TAID src/distil_losses/taid.py, fkl.py) --------------------------


class ReferenceTAID:
    """``TAID.update_t`` with its fp32 buffers on the CPU."""

    def __init__(self, t_start: float, t_end: float, alpha: float, beta: float) -> None:
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t = torch.tensor(t_start, dtype=torch.float32)
        self.prev_loss = torch.tensor(float("inf"), dtype=torch.float32)
        self.momentum = torch.zeros([], dtype=torch.float32)

    def update_t(self, loss: torch.Tensor, global_step: int, num_train_steps: int) -> None:
        if torch.isinf(self.prev_loss):
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        adaptive_delta = torch.sigmoid(self.momentum)
        progress = global_step / num_train_steps
        t_target = self.t_start + (self.t_end - self.t_start) * progress
        delta_t = self.alpha * adaptive_delta * (1 - self.t)
        t = min(self.t_end, max(t_target, self.t + delta_t))
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=self.t.dtype)
        self.t = t
        self.prev_loss = loss


def reference_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    """``TAID.compute_loss``: ``forward_kl`` with ``teacher_probs = softmax((1 - t) sg(z_q) + t z_p)``."""
    p_t = F.softmax((1 - t) * logits.detach() + t * teacher_logits, dim=-1, dtype=logits.dtype)
    student_logprobs = F.log_softmax(logits, dim=-1, dtype=logits.dtype)
    prod_probs = torch.masked_fill(p_t * student_logprobs, torch.isinf(logits), 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


# --- TAID's parts against the reference ----------------------------------------------------------------------------


def _logits(seed: int, zeros: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64) * 3
    if zeros:  # a zero student probability: the reference drops the term
        student[0, 1, 4] = student[1, 3, 0] = -math.inf
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    return student, teacher, mask


@pytest.mark.parametrize("t", [0.0, 0.4, 0.73, 1.0])
def test_taid_loss_and_gradients_match_the_reference(t):
    student, teacher, mask = _logits(0, zeros=t < 1)  # at t = 1, (1 - t) * -inf is NaN here as in the reference
    leaf = student.float().requires_grad_()
    calls = []

    def schedule(name, **params):
        calls.append((name, params))
        return t

    run = SimpleNamespace(options=TAIDOptions(t_start=0.2), schedule=schedule, student_logits=lambda batch: leaf,
                          teacher_logits=lambda batch: teacher.float())
    terms = taid_loss(run, SimpleNamespace(label_mask=mask))
    terms["loss"].backward()
    reference_leaf = student.clone().requires_grad_()
    expected = reference_loss(reference_leaf, teacher, mask, t)
    expected.backward()
    assert calls == [("taid", {"t_start": 0.2, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99})]
    assert float(terms["t"]) == pytest.approx(t)
    torch.testing.assert_close(terms["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, rtol=1e-4, atol=1e-6)


def test_taid_objective_is_kl_to_p_t_plus_its_entropy():
    """-sum p_t log q = KL(p_t || q) + H(p_t): KL's gradients, the reference's value."""
    generator = torch.Generator().manual_seed(1)
    trainable = torch.randn(7, 13, generator=generator, dtype=torch.float64).log_softmax(-1).requires_grad_()
    target = torch.randn(7, 13, generator=generator, dtype=torch.float64).log_softmax(-1)
    entropy = -(target.exp() * target).sum(-1)
    ce = cross_entropy(trainable, target)
    torch.testing.assert_close(ce, forward_kl(trainable, target) + entropy)
    (grad_ce,) = torch.autograd.grad(ce.sum(), trainable)
    (grad_kl,) = torch.autograd.grad(forward_kl(trainable, target).sum(), trainable)
    torch.testing.assert_close(grad_ce, grad_kl)
    torch.testing.assert_close(cross_entropy(target, target), entropy)  # identical inputs: the entropy, KL = 0


@pytest.mark.parametrize(("t_start", "t_end", "alpha", "beta"), [
    (0.4, 1.0, 5e-4, 0.99),  # the defaults: t follows t_linear
    (0.2, 0.9, 0.5, 0.5),  # a fast adaptive step that overtakes t_linear and stops at t_end
])
def test_taid_t_update_matches_the_reference_bit_for_bit(t_start, t_end, alpha, beta):
    total = 12
    losses = [5.0, 4.5, 4.6, 3.9, 3.1, 3.3, 2.0, 1.5, 1.49, 1.7, 0.9, 0.4]
    reference = ReferenceTAID(t_start, t_end, alpha, beta)
    params = {"t_start": t_start, "t_end": t_end, "alpha": alpha, "beta": beta}
    state, ts = initial_state(**params), []
    for k, loss in enumerate(losses, start=1):  # the reference's global_step is k - 1 during step k
        assert torch.equal(state["t"], reference.t)
        ts.append(float(state["t"]))
        reference.update_t(torch.tensor(loss, dtype=torch.float32), k - 1, total)
        state = update(state, k, total, {"loss": loss}, **params)
        assert torch.equal(state["momentum"], reference.momentum)
        assert torch.equal(state["prev_loss"], reference.prev_loss)
    assert ts[0] == ts[1] == pytest.approx(t_start)  # the first step only records its loss
    assert ts == sorted(ts) and all(t_start - 1e-7 <= t <= t_end for t in ts)
    if alpha == 0.5:
        assert ts[-1] == pytest.approx(t_end) and ts[2] > t_start + (t_end - t_start) * 2 / total  # adaptive wins


# --- a third-party plugin: a stateful schedule and the step callback -----------------------------------------------


def _ema_initial(decay: float) -> dict:
    return {"ema": torch.tensor(1.0, dtype=torch.float64), "updates": 0}


def _ema_update(state: dict, k: int, total: int, logs: dict[str, float], decay: float) -> dict:
    return {"ema": decay * state["ema"] + (1 - decay) * logs["loss"], "updates": state["updates"] + 1}


def _ema_value(k: int, total: int, state: dict, decay: float) -> float:
    return 1.0 + 0.1 * float(state["ema"])


def _weighted_kl(run: StepContext, batch: TrainBatch) -> dict[str, torch.Tensor]:
    weight = run.schedule("x-ema", decay=0.5)
    kl = run.divergence("forward_kl", run.student_logits(batch), run.teacher_logits(batch), batch)
    return {"loss": weight * kl, "weight": torch.tensor(weight, dtype=torch.float64)}


def _after_step(run: StepContext, logs: dict[str, float]) -> None:
    logs["x/after_step"] = run.step  # k, the step just taken
    logs["x/next_weight"] = run.schedule("x-ema", decay=0.5)  # read after the schedule's update of step k


class StatefulPlugin:
    @hookimpl
    def distillkit_register_schedules(self):
        return [Schedule("x-ema", "1 + 0.1 * an EMA of the logged loss", _ema_value, {"decay": 0.9},
                         initial_state=_ema_initial, update=_ema_update)]

    @hookimpl
    def distillkit_register_methods(self):
        return [Method("x-ema-kd", "KD weighted by a stateful schedule", stages=(Stage("student", _weighted_kl),),
                       source="dataset", teacher_adapter="frozen", schedules=("x-ema",), after_step=_after_step),
                Method("x-undeclared", "evaluates a stateful schedule it does not declare",
                       stages=(Stage("student", _weighted_kl),), source="dataset", teacher_adapter="frozen")]


@pytest.fixture
def stateful_plugin(monkeypatch):
    with plugins_installed(monkeypatch, {"stateful": StatefulPlugin()}):
        yield


def _records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if "val/rougeL" not in r]


def _assert_resumed_exactly(straight: Path, killed: Path, final: str) -> dict:
    assert_same_tensors(straight / final / "model.safetensors", killed / final / "model.safetensors")
    states = [load_state(run / final / "run_state_0")["schedules"] for run in (straight, killed)]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert states[0][name]["params"] == states[1][name]["params"]
        for key, value in states[0][name]["state"].items():
            other = states[1][name]["state"][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert _records(straight) == _records(killed)  # the same losses, weights and callback logs, step by step
    return states[0]


def test_a_plugin_schedule_state_and_step_callback_survive_a_kill_bit_for_bit(stateful_plugin, recipe_file,
                                                                               tmp_path, monkeypatch):
    recipe = str(recipe_file(steps=6, eval_every=2))
    train("x-ema-kd", recipe, output=tmp_path / "straight")
    records = _records(tmp_path / "straight")
    assert [r["x/after_step"] for r in records] == [1, 2, 3, 4, 5, 6]  # once per step, before its log record
    assert records[0]["weight"] == 1.1  # the initial state
    # updated before the callback; the logged weight is the token-weighted sum over micro-batches (last-ulp rounding)
    assert all(b["weight"] == pytest.approx(a["x/next_weight"], rel=1e-12, abs=0) for a, b in zip(records, records[1:]))
    assert len({r["weight"] for r in records}) == 6  # the state moves with the logged loss

    train_killed_during_step(monkeypatch, 4, lambda: train("x-ema-kd", recipe, output=tmp_path / "killed"))
    train("x-ema-kd", recipe, output=tmp_path / "killed", resume=True)  # from the step-2 checkpoint
    state = _assert_resumed_exactly(tmp_path / "straight", tmp_path / "killed", "checkpoints/step-0000006")
    assert state["x-ema"]["params"] == {"decay": 0.5} and state["x-ema"]["state"]["updates"] == 6


def test_an_undeclared_stateful_schedule_is_an_error(stateful_plugin, recipe_file, tmp_path):
    with pytest.raises(DistillkitError, match="evaluates the schedule 'x-ema', which keeps state, without declaring"):
        train("x-undeclared", str(recipe_file(steps=2, eval_every=2)), output=tmp_path / "run")


# --- TAID end to end -------------------------------------------------------------------------------------------------


def test_taid_trains_with_falling_loss_and_resumes_exactly(recipe_file, tmp_path, monkeypatch):
    recipe = str(recipe_file(steps=10, eval_every=5))
    train("taid", recipe, output=tmp_path / "straight")
    records = _records(tmp_path / "straight")
    losses = [r["loss"] for r in records]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses

    final = "checkpoints/step-0000010"
    state = load_state(tmp_path / "straight" / final / "run_state_0")["schedules"]["taid"]
    reference = ReferenceTAID(0.4, 1.0, 5e-4, 0.99)  # recipe_file has no [methods.taid]: the defaults
    for k, loss in enumerate(losses, start=1):  # the reference's update, replayed on the logged objective
        assert float(reference.t) == pytest.approx(records[k - 1]["t"], abs=1e-6)
        reference.update_t(torch.tensor(loss, dtype=torch.float32), k - 1, 10)
    assert torch.equal(state["state"]["t"], reference.t) and torch.equal(state["state"]["momentum"], reference.momentum)
    assert float(reference.t) > 0.9  # t moved towards the teacher

    train_killed_during_step(monkeypatch, 7, lambda: train("taid", recipe, output=tmp_path / "killed"))
    train("taid", recipe, output=tmp_path / "killed", resume=True)  # from the step-5 checkpoint
    _assert_resumed_exactly(tmp_path / "straight", tmp_path / "killed", final)


@pytest.mark.parametrize(("setting", "message"), [
    ("methods.taid.t_start=1.0", "'methods.taid.t_start' must be in [0, 1), got 1.0"),
    ("methods.taid.t_end=0.1", "'methods.taid.t_end' must be in [0.4, 1] (from t_start to 1), got 0.1"),
    ("methods.taid.beta=1.0", "'methods.taid.beta' must be in [0, 1), got 1.0"),
])
def test_taid_options_are_checked_at_assembly(recipe_file, monkeypatch, setting, message):
    error = _one_line_error(["train", "--method", "taid", "--recipe", str(recipe_file()), "--set", setting],
                            monkeypatch)
    assert message in error, error
