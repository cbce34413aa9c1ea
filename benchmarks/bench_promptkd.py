"""Cost of a PromptKD step relative to a GKD step, side by side, both through
distillkit's real ``Trainer.train_step``.

    python benchmarks/bench_promptkd.py [--repeats N] [--quick]

Same tiny-recipe setup for both (random-weight teacher and student built from
the recipe's configs, tokenized Dolly training rows, batch_size =
micro_batch_size = 8), same sampling settings (GKD with
``on_policy_fraction = 1.0``, so both sample the student every step), the
same prompts and RNG seed at step k.  Per step:

- GKD: sample; teacher forward (no grad); student forward + backward (JSD).
- PromptKD: sample once; prompt step = prompted teacher forward + backward to
  the soft prompt, student forward (no grad), plain teacher forward (no grad);
  student step = prompted teacher forward (no grad), student forward +
  backward (reverse KL).

The table splits each step into sampling, teacher forward passes and the rest
(student passes, divergences, every backward -- the prompt step's backward
through the teacher included -- and the optimizers).

A third arm, the PromptKD floor (``make_floor``), runs the same passes as
one would write them in plain PyTorch (full logits, the formulas inline,
AdamW for the prompt and for the student), sampling with the trainer's
row-keyed sampler, prompts, per-row limits and capped EOS ending, so it sees
the same tokens; distillkit's PromptKD step is compared with it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

GKD, PROMPTKD, FLOOR = "GKD (lambda = 1)", "PromptKD", "PromptKD floor (plain PyTorch)"


def make_floor(student, teacher, tokenizer, prompt, *, max_new_tokens: int, max_length: int, lr: float, seed: int,
               total_steps: int):
    """PromptKD's step written out: the prompt step (prompted teacher in train mode, with gradients to the
    prompt; the student and the plain teacher without), then the student step (the updated prompted teacher in
    eval mode as the target), both with reverse KLs on the response tokens and c_k = (K - k) / K, k 1-based."""
    import torch

    from distillkit.api import collate
    from distillkit.config import GenerationConfig
    from distillkit.engine.sampling import sample
    from distillkit.files import fingerprint

    pad, eos, length = tokenizer.pad_token_id, tokenizer.eos_token_id, prompt.shape[0]
    prompt = torch.nn.Parameter(prompt.detach().clone())
    teacher.eval().requires_grad_(False)
    student_optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    prompt_optimizer = torch.optim.AdamW([prompt], lr=lr, weight_decay=0.01)

    def reverse_kl(trainable: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_q, log_p = torch.log_softmax(trainable.float(), -1), torch.log_softmax(target.float(), -1)
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()

    def floor_step(prompts: list[list[int]], step: int) -> dict[str, float]:
        started = time.perf_counter()
        responses = sample(student, prompts, GenerationConfig(max_new_tokens=max_new_tokens), eos_token_id=eos,
                           pad_token_id=pad, vocab_size=len(tokenizer), max_length=max_length - length,
                           row_keys=[int(fingerprint(seed, step, p), 16) for p in prompts], capped_ending="eos")
        sampling = time.perf_counter() - started
        batch = collate(prompts, responses, pad)  # right-padded [x ‖ y] with its response mask
        ids, attention, mask = batch.input_ids, batch.attention_mask, batch.label_mask
        prompted_mask = torch.cat([torch.ones(len(prompts), length, dtype=attention.dtype), attention], 1)

        def prompted(grad: bool) -> torch.Tensor:
            teacher.train(grad)  # dropout in the prompt step, as the reference
            with torch.set_grad_enabled(grad):
                embeds = torch.cat([prompt.expand(len(prompts), -1, -1), teacher.get_input_embeddings()(ids)], 1)
                logits = teacher(inputs_embeds=embeds, attention_mask=prompted_mask).logits[:, length:-1][mask]
            teacher.eval()
            return logits

        # prompt step: L_kd + c_k L_reg, gradients to the prompt only
        p_logits = prompted(True)
        student.eval()
        with torch.no_grad():
            s_logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1][mask]
            plain = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1][mask]
        c_k = (total_steps - (step + 1)) / total_steps  # the linear schedule at k = step + 1 (1-based)
        (reverse_kl(p_logits, s_logits) + c_k * reverse_kl(p_logits, plain)).backward()
        torch.nn.utils.clip_grad_norm_([prompt], 1.0)
        prompt_optimizer.step()
        prompt_optimizer.zero_grad(set_to_none=True)
        # student step: KL(q || p_P) to the updated prompted teacher
        target = prompted(False)
        student.train()
        loss = reverse_kl(student(input_ids=ids, attention_mask=attention).logits[:, :-1][mask], target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        student_optimizer.step()
        student_optimizer.zero_grad(set_to_none=True)
        return {"sampling": sampling, "tokens": int(attention.sum()), "response_tokens": int(mask.sum())}

    return floor_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.on_policy_arguments(parser, repeats=8)
    args = parser.parse_args()
    setup = _common.on_policy_setup(args)
    import torch

    d_model = setup.teacher.config.n_embd
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        probes = {GKD: _common.StepProbe(_common.trainer_for(setup, "gkd", Path(tmp) / "gkd")),
                  PROMPTKD: _common.StepProbe(_common.trainer_for(setup, "promptkd", Path(tmp) / "promptkd"))}
        gkd, promptkd = probes[GKD].trainer, probes[PROMPTKD].trainer
        assert gkd.config.options.on_policy_fraction == 1.0
        for k in range(args.repeats + 1):  # the two trainers draw the same examples at every step
            prompts = [[e.prompt_ids for e in t.examples_for_step(k)] for t in (gkd, promptkd)]
            assert prompts[0] == prompts[1], f"the two trainers draw different examples at step {k}"
        prompt_params = sum(p.numel() for p in promptkd.run.teacher.trainable_parameters())
        prompt_length = promptkd.config.options.prompt_length
        teacher_time = {name: [] for name in probes}
        for name, probe in probes.items():  # seconds in teacher passes (instance-level wrapper, behaviour unchanged)
            stack.enter_context(_common.timed_calls(probe.trainer.run.teacher, "logits", teacher_time[name]))
        teacher_calls = {name: len(teacher_time[name]) for name in probes}
        teacher_per_step = {name: [] for name in probes}

        def arm(name: str):
            def run(k: int) -> None:
                before = len(teacher_time[name])
                probes[name].step(k)
                teacher_per_step[name].append(sum(teacher_time[name][before:]))
                teacher_calls[name] = len(teacher_time[name]) - before
            return run

        floor_step = make_floor(copy.deepcopy(setup.student), copy.deepcopy(setup.teacher), setup.tokenizer,
                                promptkd.run.teacher.prompt.weight, max_new_tokens=args.max_new_tokens,
                                max_length=setup.recipe.data.max_length, lr=setup.recipe.training.lr,
                                seed=promptkd.config.training.seed, total_steps=promptkd.run.total_steps)
        floor_stats: dict[str, list] = {"sampling": [], "tokens": [], "response_tokens": []}

        def floor(k: int) -> None:
            out = floor_step([e.prompt_ids for e in promptkd.examples_for_step(k)], k)
            for key in floor_stats:
                floor_stats[key].append(out[key])

        print(f"tiny recipe: teacher {_common.parameter_count(setup.teacher) / 1e6:.2f}M (d_model {d_model}), student "
              f"{_common.parameter_count(setup.student) / 1e6:.2f}M params (random weights); batch 8 Dolly train "
              f"prompts/step, max_new_tokens {args.max_new_tokens}; "
              f"repeats {args.repeats} (+1 warm-up)\n")
        times = _common.interleaved({**{name: arm(name) for name in probes}, FLOOR: floor}, args.repeats, warmup=1,
                                    before=lambda k: torch.manual_seed(args.seed * 1000 + k))

    rows = []
    for name, values in times.items():
        if name == FLOOR:
            s = _common.Summary.of(values)
            rows.append([name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}",
                         f"{statistics.median(floor_stats['sampling'][1:]):.3f}", "", "",
                         f"{statistics.fmean(floor_stats['tokens'][1:]):.0f}",
                         f"{statistics.fmean(floor_stats['response_tokens'][1:]):.0f}"])
            continue
        probe = probes[name]
        sampling, teacher = probe.sampling[1:], teacher_per_step[name][1:]
        rest = [t - s - u for t, s, u in zip(values, sampling, teacher)]
        s = _common.Summary.of(values)
        rows.append([name, f"{s.median:.3f}", f"{s.mean:.3f} ± {s.sd:.3f}", f"{statistics.median(sampling):.3f}",
                     f"{statistics.median(teacher):.3f} ({teacher_calls[name]})", f"{statistics.median(rest):.3f}",
                     f"{statistics.fmean(probe.tokens[1:]):.0f}", f"{statistics.fmean(probe.response_tokens[1:]):.0f}"])
    print(_common.table(["arm", "median s/step", "mean ± sd s", "sampling s", "teacher forwards s (calls)",
                         "rest s", "tokens/step", "response tokens/step"], rows))
    print()
    print(_common.ratio_line("ratio PromptKD / GKD (step time)", times[PROMPTKD], times[GKD], "<= 1.10; paper 1.06"))
    print(_common.ratio_line("ratio PromptKD / PromptKD floor (step time)", times[PROMPTKD], times[FLOOR], "<= 1.05"))
    same = sum(a == b for a, b in zip(zip(probes[PROMPTKD].tokens[1:], probes[PROMPTKD].response_tokens[1:]),
                                      zip(floor_stats["tokens"][1:], floor_stats["response_tokens"][1:])))
    print(f"check: same tokens and response tokens in PromptKD and its floor at {same}/{args.repeats} steps")
    print(f"soft prompt: {prompt_params} trainable parameters = {prompt_length} x d_model {d_model} "
          f"({'ok' if prompt_params == prompt_length * d_model else 'MISMATCH'})")


if __name__ == "__main__":
    main()
