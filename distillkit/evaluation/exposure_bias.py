"""Exposure bias (PromptKD §4.3, Eqs. 5-7, after Arora et al. 2022).

``R(l)`` sums over steps ``t <= l`` the exact KL(p || q) between the teacher p
and the student q at prefixes ``y_<t`` sampled from the student; ``E(l)`` is
the same with prefixes sampled from the teacher, and
``ExAccErr(l) = (R(l) - E(l)) / E(l) x 100``.  As in PromptKD's
``evaluate_exposure_bias.py``, the KL at step t counts for the samples still
running at t (no EOS in ``y_<t``), is averaged over them per prompt (0 when
none runs), then over prompts, and summed over steps.  Unlike it, step t
scores the distribution of ``y_t`` (the reference scores that of ``y_{t+1}``,
skipping t = 1), the per-prompt mean divides by the number of running
samples (the reference adds 1e-3), sampling does not block repeated 6-grams,
and logits are sliced to the tokenizer's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillkit.api import TokenizedExample, TrainBatch, collate
from distillkit.config import GenerationConfig
from distillkit.engine.losses import masked_token_divergences
from distillkit.errors import DistillkitError
from distillkit.evaluation.protocol import generate, load_model_dir
from distillkit.files import files_fingerprint
from distillkit.registry import registry


@dataclass(frozen=True)
class ExposureBias:
    """``r`` = R(l) and ``e`` = E(l) in nats, (L,) each: entry l-1 sums steps 1..l.
    ``r_running`` and ``e_running`` (L,): the share of the student's and of the
    teacher's samples still running at step l (a step where none of a prompt's
    samples runs adds 0 to the sums, so a model whose answers end sooner
    accumulates less)."""

    r: torch.Tensor
    e: torch.Tensor
    r_running: torch.Tensor
    e_running: torch.Tensor

    @property
    def ex_acc_err(self) -> torch.Tensor:
        """ExAccErr(l) in % (L,); 0 where R(l) = E(l), e.g. R = E = 0 for a
        student identical to the teacher (the plain formula gives NaN there)."""
        return torch.where(self.r == self.e, torch.zeros_like(self.r), (self.r - self.e) / self.e * 100)

    def to_json(self) -> dict[str, list[float]]:
        """``{"R", "E", "ExAccErr", "R_running", "E_running"}``: lists over l = 1..L."""
        return {"R": self.r.tolist(), "E": self.e.tolist(), "ExAccErr": self.ex_acc_err.tolist(),
                "R_running": self.r_running.tolist(), "E_running": self.e_running.tolist()}


def sample_prefixes(model: torch.nn.Module, tokenizer: Any, examples: list[TokenizedExample], *, steps: int,
                    samples: int, seed: int, batch_size: int) -> list[list[int]]:
    """``samples`` responses of at most ``steps`` tokens per example, with the
    paper's settings (top-k 0, top-p 1, temperature 1): N * samples lists,
    sample s of example i at index ``i * samples + s``."""
    repeated = [example for example in examples for _ in range(samples)]
    longest = max(len(example.prompt_ids) for example in examples)
    return generate(model, tokenizer, repeated, GenerationConfig(max_new_tokens=steps), seed=seed,
                    batch_size=batch_size, max_length=longest + steps)


def _logits(model: torch.nn.Module, batch: TrainBatch, vocab_size: int) -> torch.Tensor:
    """Next-token logits (B, T-1, V) aligned with ``batch.labels``."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab_size]


@torch.no_grad()
def step_kl(teacher: torch.nn.Module, student: torch.nn.Module, prompts: list[list[int]],
            responses: list[list[int]], *, steps: int, pad_token_id: int, vocab_size: int,
            batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact KL(p || q) in nats at each step of each ``[x ‖ y]`` from one
    teacher-forced pass of each model (put in eval mode), and whether the
    step was scored: (N, steps) each.  Column t-1 is the distribution of
    ``y_t`` given ``x, y_<t``; steps past the response are 0 and False."""
    teacher.eval()
    student.eval()
    forward_kl = registry().divergences["forward_kl"]  # trainable = student q, target = teacher p
    kl = torch.zeros(len(prompts), steps)
    scored = torch.zeros(len(prompts), steps, dtype=torch.bool)
    device = next(student.parameters()).device
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        batch = collate(prompts[start:end], responses[start:end], pad_token_id).to(device)
        mask = batch.label_mask
        values = masked_token_divergences(forward_kl, _logits(student, batch, vocab_size),
                                          _logits(teacher, batch, vocab_size), mask)
        rows = mask.nonzero(as_tuple=True)[0].cpu() + start
        columns = (mask.cumsum(-1) - 1)[mask].cpu()
        kl[rows, columns] = values.cpu()
        scored[rows, columns] = True
    return kl, scored


def accumulate(kl: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """R(l) or E(l) (L,) from per-step KL and scored flags (N, S, L): the
    mean over the scored samples of each prompt (0 when none is), the mean
    over prompts, and the cumulative sum over steps."""
    per_prompt = (kl * scored).sum(1) / scored.sum(1).clamp(min=1)
    return per_prompt.mean(0).cumsum(-1)


def measure(teacher: torch.nn.Module, student: torch.nn.Module, tokenizer: Any, examples: list[TokenizedExample],
            teacher_prefixes: list[list[int]], *, steps: int, samples: int, seed: int,
            batch_size: int) -> ExposureBias:
    """R and E of ``student``; ``teacher_prefixes`` come from
    :func:`sample_prefixes` on the teacher (shared by all students)."""
    prompts = [example.prompt_ids for example in examples for _ in range(samples)]
    student_prefixes = sample_prefixes(student, tokenizer, examples, steps=steps, samples=samples, seed=seed,
                                       batch_size=batch_size)

    def accumulated(responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum over steps, and the running share per step (L,) each."""
        kl, scored = step_kl(teacher, student, prompts, responses, steps=steps, pad_token_id=tokenizer.pad_token_id,
                             vocab_size=len(tokenizer), batch_size=batch_size)
        shape = (len(examples), samples, steps)
        return accumulate(kl.view(shape), scored.view(shape)), scored.float().mean(0)

    (r, r_running), (e, e_running) = accumulated(student_prefixes), accumulated(teacher_prefixes)
    return ExposureBias(r, e, r_running, e_running)


def check_comparable(report: dict[str, Any], settings: dict[str, Any]) -> None:
    """Raise unless an earlier ``report`` was measured with ``settings``
    (teacher, data, limit, samples, seed, max_length), so that its students
    share the new ones' teacher prefixes.  The teacher is compared by its
    weights (``teacher_weights``), wherever its folder is now; a report
    written before they were recorded, by its folder."""
    ignored = "teacher" if "teacher_weights" in report else "teacher_weights"
    differ = [f"{key} {report.get(key)!r} there, {value!r} now"
              for key, value in settings.items() if key != ignored and report.get(key) != value]
    if differ:
        raise DistillkitError(f"the report in --output was measured with other settings ({', '.join(differ)}); "
                              "give another --output, or its settings to add students to it")


def exposure_bias_report(teacher_dir: Path, students: dict[str, Path], data: str, *, limit: int, steps: int,
                         samples: int, seed: int, batch_size: int = 0, earlier: dict[str, Any] | None = None,
                         notice: Callable[[str], None] = print) -> dict[str, Any]:
    """``distillkit analyze exposure-bias``: R, E and ExAccErr of each
    student (label -> model or run folder) against the teacher on the first
    ``limit`` prompts of ``data``; prompts are cut (keeping their end) so
    that prompt + ``steps`` fits the teacher.  Returns a JSON-ready report,
    with the students of an ``earlier`` report of the same settings
    (:func:`check_comparable`) that it does not measure again (refused, before any
    sampling, when its settings differ)."""
    from distillkit.data.loading import load_eval_set
    from distillkit.data.tokenization import tokenize
    from distillkit.engine.models import check_shared_vocabulary, max_positions

    teacher, tokenizer, recipe = load_model_dir(teacher_dir)
    folder = Path(teacher.name_or_path)
    weights = [folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")]
    header = {"teacher": teacher.name_or_path, "teacher_weights": files_fingerprint(weights), "data": data,
              "limit": limit, "samples": samples, "seed": seed, "max_length": steps}
    if earlier is not None:
        check_comparable(earlier, header)
    positions = max_positions(teacher) or 2**31
    room = min(recipe.data.max_prompt_length, positions - steps)
    if room < 1:
        raise DistillkitError(f"--max-length {steps} leaves no room for a prompt in the teacher's {positions} "
                              "positions; lower --max-length")
    examples, _ = tokenize(load_eval_set(data)[: limit or None], tokenizer, max_prompt_length=room,
                           max_length=room + steps, long_prompts="cut_left")
    batch_size = batch_size or recipe.generation.batch_size
    settings = {"steps": steps, "samples": samples, "seed": seed, "batch_size": batch_size}
    notice(f"sampling {samples} teacher responses for each of {len(examples)} prompts")
    teacher_prefixes = sample_prefixes(teacher, tokenizer, examples, **settings)
    longest = max(len(example.prompt_ids) for example in examples) + steps
    results = {}
    for label, folder in students.items():
        notice(f"measuring {label}")
        student, student_tokenizer, _ = load_model_dir(folder)
        check_shared_vocabulary(tokenizer, student_tokenizer)
        if (max_positions(student) or longest) < longest:
            raise DistillkitError(f"prompt + --max-length ({longest} tokens) exceed the {max_positions(student)} "
                                  f"positions of student '{label}'; lower --max-length")
        result = measure(teacher, student, tokenizer, examples, teacher_prefixes, **settings)
        results[label] = {"model": student.name_or_path, **result.to_json()}
    if earlier is not None:
        results = {**earlier["students"], **results}  # the earlier students first; one measured again is replaced
    return {**header, "examples": len(examples), "students": results}


def plot_exposure_bias(report: dict[str, Any], path: Path) -> None:
    """ExAccErr (%) against the generation length l, one line per student (PNG)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for label, result in report["students"].items():
        axes.plot(range(1, len(result["ExAccErr"]) + 1), result["ExAccErr"], label=label)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set(xlabel="generation length l (tokens)", ylabel="ExAccErr (%)",
             title=f"exposure bias on {report['data']} ({report['examples']} prompts x {report['samples']} samples)")
    axes.legend()
    figure.savefig(path, dpi=150)
