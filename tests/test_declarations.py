"""Components declare what the planner and the run assembly need: memory
footprints (read by the memory planner, which names no component) and
option checks (run when the recipe loads, before any model loads)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from distillkit import hookimpl
from distillkit.api import (
    Buffer,
    Logits,
    Method,
    PlanContext,
    SourceFactory,
    SourceFootprint,
    Stage,
    StageFootprint,
    collate,
    require,
)
from distillkit.builtins.teacher_adapters import LoraTeacher
from distillkit.cli import app
from distillkit.config import load_recipe, resolve_run
from distillkit.engine.layout import Layout, layout_from_config
from distillkit.planning import estimate, model_shape

from .conftest import make_run, plugins_installed
from .test_faults import _one_line_error

MiB = 2**20
CUDA_BF16 = Layout(mixed_precision="bf16", device="cuda")


# --- a third-party plugin: a source with a footprint and a check, one without, a stage footprint, LoRA -------------


@dataclass(frozen=True)
class SlotOptions:
    slots: int = 64  # rows of the source's buffer

    def __post_init__(self) -> None:
        require(self.slots >= 1, "slots", "be >= 1", self.slots)


def check_slots(config, options: SlotOptions) -> None:
    limit = config.recipe.data.max_length
    require(options.slots <= limit, "slots", f"be at most data.max_length ({limit})", options.slots)


def slot_footprint(plan: PlanContext, options: SlotOptions) -> SourceFootprint:
    """A device buffer of each process's share of the slots (int64 tokens), and student samples, 3 at a time."""
    share = plan.share(options.slots)
    return SourceFootprint(samples_from=("student",), batch=3,
                           buffers=(Buffer("slot buffer", share * plan.config.recipe.data.max_length * 8,
                                           f"{share} slots", in_cpu_ram=False),))


def _dataset(run, **options):
    return lambda examples: collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                                    run.tokenizer.pad_token_id)


def _loss(run, batch):
    return {"loss": run.cross_entropy(run.student_logits(batch), batch)}


@dataclass(frozen=True)
class SlotKDOptions:
    slot_count: int = 64


@dataclass(frozen=True)
class LoraKDOptions:
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0


class ThirdParty:
    @hookimpl
    def distillkit_register_sources(self):
        return [SourceFactory("x-slots", "a buffered source", _dataset, options=SlotOptions, check=check_slots,
                              footprint=slot_footprint),
                SourceFactory("x-plain", "a source that declares nothing", _dataset)]

    @hookimpl
    def distillkit_register_methods(self):
        return [
            Method("x-slot-kd", "t", stages=(Stage("student", _loss),), source="x-slots", teacher_adapter="frozen",
                   options=SlotKDOptions, source_options=lambda o: {"slots": o.slot_count}),
            Method("x-plain-kd", "t", stages=(Stage("student", _loss),), source="x-plain", teacher_adapter="frozen"),
            Method("x-wide-kd", "t", source="dataset", teacher_adapter="frozen", stages=(Stage(
                "student", _loss, footprint=lambda plan, o: StageFootprint(Logits(full=1, gathered=2), 3)),)),
            Method("x-lora", "t", stages=(Stage("teacher_adapter", _loss), Stage("student", _loss)),
                   source="dataset", teacher_adapter="lora", options=LoraKDOptions,
                   teacher_adapter_options=lambda o: {"rank": o.lora_rank, "alpha": o.lora_alpha,
                                                      "dropout": o.lora_dropout}),
        ]


@pytest.fixture
def third_party(monkeypatch):
    """The registry with the ThirdParty plugin loaded next to the installed ones."""
    with plugins_installed(monkeypatch, {"third-party": ThirdParty()}):
        yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- footprints -------------------------------------------------------------------------------


def _rows(plan) -> dict[str, tuple[float, float, str]]:
    return {row.name: (row.device, row.cpu, row.note) for row in plan.rows}


def test_a_declared_source_footprint_becomes_rows_and_an_undeclared_one_none(third_party):
    recipe = load_recipe("gpt2-xl_to_gpt2-base")
    shapes = {"teacher": model_shape(recipe, "teacher"), "student": model_shape(recipe, "student")}
    fsdp = layout_from_config("fsdp")
    slots = estimate(recipe, "x-slot-kd", fsdp, shapes=shapes)
    rows = _rows(slots)
    assert rows["slot buffer"] == (16 * 512 * 8 / MiB, 0.0, "16 slots")  # 64 slots over 4 processes
    student = shapes["student"]
    assert rows["KV cache"][0] == 3 * 512 * student.layers * 2 * student.kv_width * 2 / MiB  # bf16 compute
    assert rows["KV cache"][2].startswith("student: 3 x 512 x 12 layers")
    assert "sampling" in slots.phases()
    plain, kd = estimate(recipe, "x-plain-kd", fsdp, shapes=shapes), estimate(recipe, "kd", fsdp, shapes=shapes)
    assert plain.rows == kd.rows  # no footprint: the core's rows only, as for the dataset source
    result = CliRunner().invoke(app, ["train", "--method", "x-slot-kd", "--recipe", "gpt2-xl_to_gpt2-base",
                                      "--dry-run", "--accelerate-config", "fsdp", "--device-memory", "80"])
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if "slot buffer" in line or "KV cache" in line]
    assert len(table) == 2 and "16 slots" in table[0] and "student: 3 x 512" in table[1], result.output
    result = CliRunner().invoke(app, ["train", "--method", "x-plain-kd", "--recipe", "gpt2-xl_to_gpt2-base",
                                      "--dry-run", "--accelerate-config", "fsdp", "--device-memory", "80"])
    assert result.exit_code == 0 and "memory plan" in result.output and "KV cache" not in result.output


def test_a_stage_footprint_adds_logits_copies_and_student_graphs(third_party):
    recipe = load_recipe("gpt2-xl_to_gpt2-base")
    shapes = {"teacher": model_shape(recipe, "teacher"), "student": model_shape(recipe, "student")}
    wide, kd = _rows(estimate(recipe, "x-wide-kd", CUDA_BF16, shapes=shapes)), _rows(estimate(recipe, "kd", CUDA_BF16,
                                                                                             shapes=shapes))
    micro = min(recipe.training.micro_batch_size, recipe.training.batch_size)
    sequence, vocab = recipe.data.max_length, shapes["teacher"].vocab
    extra = (1 * micro * sequence + 2 * micro * sequence) * vocab * 4 / MiB  # N = B T response rows
    assert wide["logits"][0] == pytest.approx(kd["logits"][0] + extra)
    assert wide["activations"][0] == pytest.approx(3 * kd["activations"][0])
    assert wide["activations"][2].startswith("student: 3 batches x ")


def test_the_planner_row_of_lora_counts_what_peft_trains(third_party, recipe_file, tokenizer):
    from distillkit.engine.models import load_model

    recipe = load_recipe(str(recipe_file()), ["methods.x-lora.lora_rank=2"])
    run = make_run(recipe_file, tokenizer, method="kd")
    trained = LoraTeacher(load_model(recipe.teacher, tokenizer, "teacher"), run, rank=2).trainable_parameters()
    count = sum(p.numel() for p in trained)
    plan = estimate(recipe, "x-lora", Layout(), tokenizer=tokenizer)
    assert count > 0 and _rows(plan)["trainable adapter"] == (count * 16 / MiB, 0.0, f"LoRA rank 2: {count:,} "
                                                                                   "values, fp32 + gradients + AdamW")


# --- option checks at assembly, before any model loads ---------------------------------------


def _error(recipe_file, monkeypatch, method: str, *settings: str) -> str:
    args = ["train", "--method", method, "--recipe", str(recipe_file())]
    for setting in settings:
        args += ["--set", setting]
    return _one_line_error(args, monkeypatch)


@pytest.mark.parametrize(("method", "setting", "message"), [
    # sft: its section's keys, training overrides and start
    ("sft", "methods.sft.kd_ratio=1", "unknown key 'methods.sft.kd_ratio'; valid keys here: "),
    ("sft", "methods.sft.training.lr=-1", "'methods.sft.training.lr' must be a finite number >= 0, got -1"),
    ("sft", 'methods.sft.student_init="teacher"', "'methods.sft.student_init' must be 'pretrained' or 'sft'"),
    # kd: its options
    ("kd", "methods.kd.kd_ratio=2", "'methods.kd.kd_ratio' must be in [0, 1], got 2.0"),
    ("kd", 'methods.kd.divergence="fkl"', "'methods.kd.divergence' must name a registered divergence"),
    # seqkd: its options and the teacher_cache source's
    ("seqkd", 'methods.seqkd.targets="tokens"', "'methods.seqkd.targets' must be one of 'text', 'ids'"),
    ("seqkd", 'methods.seqkd.generation_seed="ten"', "'methods.seqkd.generation_seed' must be int"),
    # gkd: its options and the mixture source's
    ("gkd", "methods.gkd.beta=2", "'methods.gkd.beta' must be in [0, 1], got 2.0"),
    ("gkd", "methods.gkd.on_policy_fraction=1.5", "'methods.gkd.on_policy_fraction' must be in [0, 1], got 1.5"),
    ("gkd", 'methods.gkd.on_policy_schedule="lin"',
     "'methods.gkd.on_policy_schedule' must name a registered schedule"),
    ("gkd", 'methods.gkd.capped_ending="cut"', "'methods.gkd.capped_ending' must be one of 'open', 'eos'"),
    # promptkd: its options and the soft_prompt adapter's
    ("promptkd", "methods.promptkd.prompt_length=0", "'methods.promptkd.prompt_length' must be >= 1, got 0"),
    ("promptkd", 'methods.promptkd.prompt_init="zeros"',
     "'methods.promptkd.prompt_init' must be one of 'text', 'padding', 'random'"),
    ("promptkd", 'methods.promptkd.prompt_init_text=" "',
     "'methods.promptkd.prompt_init_text' must be non-empty text when the prompt starts from text"),
    ("promptkd", "methods.promptkd.teacher_adapter_lr=0", "'methods.promptkd.teacher_adapter_lr' must be > 0"),
    # minillm: its options, the rollouts source's, and the source's checks against the run
    ("minillm", "methods.minillm.gamma=3", "'methods.minillm.gamma' must be in [0, 1], got 3.0"),
    ("minillm", "methods.minillm.rollout_size=0", "'methods.minillm.rollout_size' must be >= 1, got 0"),
    ("minillm", "methods.minillm.ppo_epochs=0", "'methods.minillm.ppo_epochs' must be >= 1, got 0"),
    ("minillm", "methods.minillm.teacher_mix=2", "'methods.minillm.teacher_mix' must be in [0, 1], got 2.0"),
    ("minillm", "methods.minillm.rollout_size=12",
     "'methods.minillm.rollout_size' must be a multiple of training.batch_size (8), so that no optimizer step "
     "spans two rollout collections, got 12; change it in the recipe or with --set methods.minillm.rollout_size="),
    ("minillm", "generation.top_p=0.9", "teacher-mixed rollouts (minillm) need plain sampling"),
    ("minillm", "generation.no_repeat_ngram_size=3", "set generation.no_repeat_ngram_size = 0"),
    # opd: its on-policy estimate needs samples from the student's own distribution
    ("opd", "generation.temperature=0.7", "opd needs plain sampling (its loss reads the samples' log-probabilities "
     "under the unfiltered student): set generation.temperature = 1.0"),
    # the model specs a run uses
    ("kd", 'student.init_from="teacher"', "student: set exactly one of 'student.path' (a model), 'student.config'"),
    ("sft", "student.num_layers=1", "'student.num_layers' only applies with student.init_from"),
])
def test_builtin_option_errors_are_raised_at_assembly(recipe_file, monkeypatch, method, setting, message):
    assert message in _error(recipe_file, monkeypatch, method, setting)


@pytest.mark.parametrize(("method", "setting", "message"), [
    ("x-slot-kd", "methods.x-slot-kd.slot_count=0", "'methods.x-slot-kd.slot_count' must be >= 1, got 0"),
    ("x-slot-kd", "methods.x-slot-kd.slot_count=1000",
     "'methods.x-slot-kd.slot_count' must be at most data.max_length (128), got 1000"),
    ("x-lora", "methods.x-lora.lora_rank=0", "'methods.x-lora.lora_rank' must be >= 1, got 0"),
    ("x-lora", "methods.x-lora.lora_alpha=0", "'methods.x-lora.lora_alpha' must be > 0, got 0"),
    ("x-lora", "methods.x-lora.lora_dropout=1", "'methods.x-lora.lora_dropout' must be in [0, 1), got 1.0"),
])
def test_third_party_and_lora_option_errors_are_raised_at_assembly(third_party, recipe_file, monkeypatch, method,
                                                                   setting, message):
    assert message in _error(recipe_file, monkeypatch, method, setting)


def test_checks_against_the_run_apply_to_the_method_being_run(recipe_file, monkeypatch):
    """Loading the recipe checks every section's values; how a method's
    source fits the rest of the recipe only when that method runs."""
    recipe = load_recipe(str(recipe_file()), ["generation.top_p=0.9", "methods.minillm.rollout_size=12"])
    assert resolve_run(recipe, "gkd").recipe.generation.top_p == 0.9  # GKD may sample with top-p
    assert resolve_run(recipe, "promptkd").recipe.generation.top_p == 0.9  # so may PromptKD's student source
    assert "plain sampling" in _error(recipe_file, monkeypatch, "minillm", "generation.top_p=0.9")
