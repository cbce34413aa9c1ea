"""The model card of a saved student: ``README.md`` in the Hub's format
(huggingface_hub's ``ModelCard``: YAML metadata, then the method, models,
training data, evaluation, training cost and resolved recipe), and the note
of the teacher beside a saved teacher adapter (``teacher_adapter/teacher.json``).

Both are built from the run folder alone (``run.json``, the model folder's
``best.json``, the latest trainer state, the ``teacher`` link), so ``best/``
and ``distillkit export`` write the same card; the export adds the eval table
of its reports (:func:`distillkit.evaluation.protocol.evaluate_sets`' shape).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from distillkit.config import DataConfig, ModelConfig
from distillkit.config.run_folder import BEST_FILE, CARD_FILE, RunRecord, latest_trainer_state, read_run_file
from distillkit.data.loading import dataset_spec
from distillkit.engine.models import PACKAGE_PREFIX
from distillkit.errors import DistillkitError
from distillkit.files import write_json_atomic, write_text_atomic
from distillkit.registry import registry

ADAPTER_DIR = "teacher_adapter"  # a saved student's teacher adapter, in peft's format
TEACHER_NOTE = "teacher.json"
TEACHER_LINK = "teacher"  # the run folder's link to the prepared teacher


def hub_id(location: str, *, owner: bool = True) -> str | None:
    """``location`` when it names a Hub repository (``owner/name``; with
    ``owner=False`` also a name without owner, such as ``gpt2``), not a local
    path nor ``package:NAME``; else None."""
    slashes = location.count("/")
    if slashes > 1 or (owner and slashes == 0) or location.startswith(PACKAGE_PREFIX) \
            or Path(location).expanduser().exists():
        return None
    try:
        validate_repo_id(location)
    except HFValidationError:
        return None
    return location


def model_reference(spec: ModelConfig) -> str:
    """A model as the recipe gives it: its path (and GGUF file), else the
    model type its config builds."""
    if spec.path is not None:
        return f"{spec.path} ({spec.gguf_file})" if spec.gguf_file else spec.path
    return f"{(spec.config or {}).get('model_type', 'model')} built from the recipe's config"


def _origin(spec: ModelConfig, role: str) -> str:
    """How the recipe makes the ``role`` model, as a sentence part."""
    if spec.path is not None:
        kind = "Hub model" if hub_id(spec.path, owner=False) else "folder"
        return f"the {kind} `{model_reference(spec)}`"
    settings = json.dumps(spec.config, sort_keys=True)
    return f"randomly initialised weights (seed {spec.init_seed}) of the {role} config `{settings}`"


def _student(record: RunRecord) -> tuple[str | None, str]:
    """The card's ``base_model`` (None when the student comes from no named
    model) and the sentence on the student's initialisation."""
    recipe = record.recipe
    spec, teacher = recipe.student, recipe.teacher
    section = recipe.methods.get(record.method, {})
    default = registry().methods[record.method].student_init if record.method in registry().methods else "pretrained"
    sft = " It was fine-tuned on the training data first (`student_init = \"sft\"`)." \
        if section.get("student_init", default) == "sft" else ""
    if spec.init_from is not None:
        layers = f"{spec.num_layers} evenly spaced decoder layers" if spec.num_layers else "all decoder layers"
        base = hub_id(teacher.path, owner=False) if teacher.path is not None and teacher.gguf_file is None else None
        return base, f"The student was cut from the teacher ({layers} of {_origin(teacher, 'teacher')}).{sft}"
    base = hub_id(spec.path, owner=False) if spec.path is not None and spec.gguf_file is None else None
    return base, f"The student starts from {_origin(spec, 'student')}.{sft}"


def _datasets(data: DataConfig) -> tuple[list[str], str]:
    """The Hub ids of the training data (only where the dataset's
    registration or the recipe names one) and its description."""
    spec = dataset_spec(data.dataset)
    location = spec.location if spec is not None else data.dataset
    found = hub_id(location)
    if spec is not None:
        text = f"`{data.dataset}`: {spec.description} (from `{location}`)"
    else:
        text = f"`{data.dataset}`" + ("" if found else " (a local file or folder)")
    limit = f", the first {data.train_limit:,} training rows" if data.train_limit else ""
    return ([found] if found else []), f"{text}{limit}."


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _evaluation(reports: dict[str, dict[str, Any]], best: dict[str, Any], record: RunRecord) -> str:
    """ROUGE-L per set and seed (mean ± std) from eval reports, else the
    validation metrics of ``best.json``."""
    if reports:
        seeds = sorted({int(seed) for report in reports.values() for seed in report.get("rougeL", {})})
        rows = []
        for name, report in reports.items():
            if "missing" in report:
                rows.append([name, f"missing: {report['missing']}", *[""] * (len(seeds) + 1)])
                continue
            scores = [f"{report['rougeL'][str(s)]:.2f}" if str(s) in report["rougeL"] else "" for s in seeds]
            rows.append([name, f"{report['mean']:.2f} ± {report['std']:.2f}", *scores, f"{report['examples']:,}"])
        return ("ROUGE-L (F1 × 100, best reference, mean ± std over sampling seeds), `distillkit eval`:\n\n"
                + _table(["set", "mean ± std", *(f"seed {s}" for s in seeds), "examples"], rows))
    metrics = {key: value for key, value in best.items() if key not in ("step", "cost")}
    if not metrics:
        return "No evaluation recorded."
    limit = record.training.eval_limit
    return (f"Validation at step {best.get('step')} (the first {limit} validation examples), the metrics that "
            "selected this student; run `distillkit eval` and export with `--eval-report` for the test sets:\n\n"
            + _table(list(metrics), [[f"{value:.4g}" for value in metrics.values()]]))


def _cost(best: dict[str, Any], run_dir: Path, record: RunRecord) -> str:
    """Steps, seconds, peak memory and generated tokens at the saved step
    and, once the run went further, for the whole run; trainable parameters."""
    rows = []
    saved = best.get("cost")
    if saved is not None:
        rows.append(["this student", f"{best['step']} of {record.total_steps}", f"{saved['elapsed_s']:.1f}",
                     f"{saved['peak_memory_mb']:,.0f}", f"{saved['generated_tokens']:,}"])
    state = latest_trainer_state(run_dir)
    if state is not None and state.step > best.get("step", -1):
        rows.append(["whole run", f"{state.step} of {record.total_steps}", f"{state.elapsed_s:.1f}",
                     f"{state.peak_memory_mb:,.0f}", f"{state.generated_tokens:,}"])
    trainable = ", ".join(f"{group} {count:,}" for group, count in record.trainable_parameters.items())
    table = _table(["", "steps", "training seconds", "peak memory (MB)", "generated tokens"], rows) if rows else ""
    return "\n\n".join(part for part in (table, f"Trainable parameters: {trainable or 'not recorded'}.") if part)


def _teacher_adapter(model_dir: Path, adapter: str) -> str:
    config = json.loads((model_dir / ADAPTER_DIR / "adapter_config.json").read_text(encoding="utf-8")) \
        if (model_dir / ADAPTER_DIR / "adapter_config.json").is_file() else {}
    base = config.get("base_model_name_or_path")
    return (f"`{ADAPTER_DIR}/` holds the trained teacher adapter `{adapter}` "
            f"({registry().teacher_adapters[adapter].description}) in peft's format, trained on the teacher "
            f"`{base or 'of the recipe'}` (see `{ADAPTER_DIR}/{TEACHER_NOTE}`):\n\n"
            "```python\nfrom peft import PeftModel\n\n"
            f"teacher = PeftModel.from_pretrained(teacher, \"{ADAPTER_DIR}\")\n```")


def _prepared_teacher(run_dir: Path) -> str | None:
    link = run_dir / TEACHER_LINK
    return str(link.resolve()) if link.exists() else None


def model_card(model_dir: Path, run_dir: Path, reports: dict[str, dict[str, Any]] | None = None) -> ModelCard:
    """The card of the student in ``model_dir`` made by the run in ``run_dir``;
    ``reports``: eval reports per test set (empty: the validation metrics)."""
    record = read_run_file(run_dir)
    if record is None:
        raise DistillkitError(f"{run_dir} holds no run.json; pass the run folder that `distillkit train` wrote")
    best = json.loads((model_dir / BEST_FILE).read_text(encoding="utf-8")) if (model_dir / BEST_FILE).is_file() else {}
    method = registry().methods[record.method] if record.method in registry().methods else None
    base_model, student = _student(record)
    datasets, data = _datasets(record.recipe.data)
    metadata: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                                "tags": ["distillation", "distillkit", record.method]}
    if base_model is not None:
        metadata["base_model"] = base_model
    uses_teacher = method is not None and method.teacher_adapter is not None
    if uses_teacher:
        metadata["teacher"] = model_reference(record.recipe.teacher)
    if datasets:
        metadata["datasets"] = datasets
    description = f": {method.description}" if method is not None else ""
    models = [f"- Student: {student}"]
    if uses_teacher:
        sft = ", fine-tuned on the training data first (`teacher.sft`)" if record.recipe.teacher.sft is not None else ""
        prepared = _prepared_teacher(run_dir)
        models.append(f"- Teacher: {_origin(record.recipe.teacher, 'teacher')}{sft}"
                      + (f"; the prepared teacher of this run: `{prepared}`." if prepared else "."))
    sections = [
        f"# {record.method} student ({record.recipe.name or 'recipe'})",
        f"Distilled with distillkit's method `{record.method}`{description}.",
        "## Models\n\n" + "\n".join(models),
        "## Training data\n\n" + data + " Prompts follow the run's template (`data.prompt = "
        f"\"{record.recipe.data.prompt}\"`); `generation_config.json` holds the evaluation's sampling settings.",
        "## Evaluation\n\n" + _evaluation(reports or {}, best, record),
        "## Training cost\n\n" + _cost(best, run_dir, record),
    ]
    if uses_teacher and (model_dir / ADAPTER_DIR).is_dir():
        sections.append("## Teacher adapter\n\n" + _teacher_adapter(model_dir, method.teacher_adapter))
    sections.append("## Recipe\n\n<details>\n<summary>The resolved recipe, method options and training settings "
                    "(run.json)</summary>\n\n```json\n" + json.dumps(record.settings, indent=2) + "\n```\n\n</details>")
    yaml = ModelCardData(**metadata).to_yaml()
    return ModelCard(f"---\n{yaml}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(model_dir: Path, run_dir: Path, reports: dict[str, dict[str, Any]] | None = None) -> None:
    """``model_dir/README.md`` (:func:`model_card`) and, beside a saved teacher
    adapter, ``teacher.json``: the teacher as the recipe gives it and the
    prepared teacher folder it was trained on; written atomically."""
    card = model_card(model_dir, run_dir, reports)
    write_text_atomic(model_dir / CARD_FILE, str(card))
    if (model_dir / ADAPTER_DIR).is_dir():
        write_json_atomic(model_dir / ADAPTER_DIR / TEACHER_NOTE,
                          {"teacher": card.data.get("teacher"), "prepared": _prepared_teacher(run_dir)}, indent=2)
