"""``distillkit bench``: methods side by side on one recipe.

Every method trains from the same prepared starting checkpoints (the cached
SFT teacher and SFT student) with the recipe's budget, each in its own
process (``distillkit train --resume``, log in ``METHOD/train.log``), so its
peak memory is its own, and is then evaluated on the test sets with the
same seeds as the teacher (cached per set and seed).  Output folder:

- ``METHOD/``: the run folders; ``results.json``: every finished cell, so a
  killed bench resumes and skips them.  A method is trained and evaluated
  before the next one starts, so its row survives a kill; copied into a
  fresh output folder (another machine), ``results.json`` keeps the
  finished rows, and a method trained but not evaluated on every set is
  trained again and evaluated on all of them;
- ``quality.{md,csv}`` (shaped like the paper's Table 1: mean ROUGE-L over
  seeds, best student per set in bold), ``cost.{md,csv}`` (like Table 3:
  training time, peak memory, tokens generated, trainable parameters),
  ``tables.json``, ``quality.png`` and ``quality_vs_cost.png``.
- ``mlflow.db``: the methods' MLflow runs, with ``--report-to mlflow`` and no
  ``MLFLOW_TRACKING_URI`` (the trackers' project: the bench folder's name).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from distillkit.config import RunConfig, load_recipe, resolve_run
from distillkit.config.run_folder import latest_trainer_state, read_metrics, read_run_file, run_record
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.files import write_json_atomic
from distillkit.registry import registry
from distillkit.training.outputs import changed_settings, describe_changes


@dataclass
class BenchConfig:
    recipe: str  # a recipe name or .toml path
    methods: list[str]
    sets: list[str]
    seeds: list[int]
    output: Path
    limit: int = 0  # evaluate on the first N examples of each set (0: all)
    overrides: list[str] = field(default_factory=list)
    subsets: dict[str, int] = field(default_factory=dict)  # set -> size of its seeded random subset

    def covers(self, name: str, reports: dict[str, dict[str, Any]]) -> bool:
        """Whether ``reports`` (one model's) hold set ``name`` as this bench
        evaluates it: a report of another selection (another ``--limit`` or
        ``--subset``) is evaluated again rather than mixed into the tables;
        a set whose data is missing is done."""
        report = reports.get(name)
        if report is None or "missing" in report:
            return report is not None
        # reports written before subsets existed carry only limit (0: all examples)
        return (report.get("limit", 0), report.get("subset", {}).get("size", 0)) == \
            (self.limit, self.subsets.get(name, 0))

    def validate(self) -> None:
        """Fail before any work on an unknown method or set name."""
        methods, datasets = registry().methods, registry().datasets
        for name in self.methods:
            methods[name]  # raises with a "did you mean"
        for name in self.sets:
            if name not in datasets.names() and not Path(name).is_file():
                raise DistillkitError(f"unknown test set '{name}'{did_you_mean(name, datasets.names())}; "
                                      f"registered: {', '.join(datasets.names())} (or give a data file)")
        from distillkit.evaluation.protocol import check_subsets

        check_subsets(self.subsets, self.sets)


class Results:
    """``results.json``: finished cells, rewritten atomically after each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
        if path.is_file():
            self.data.update(json.loads(path.read_text()))

    def save(self) -> None:
        write_json_atomic(self.path, self.data, indent=2)


def cost_record(run_dir: Path) -> dict[str, Any]:
    """Training cost of a finished run, from its manifest and last checkpoint,
    and the run's settings (to tell a row of other settings later)."""
    record, state = read_run_file(run_dir), latest_trainer_state(run_dir)
    if record is None or state is None:
        raise DistillkitError(f"{run_dir} has no finished checkpoint; see {run_dir / 'train.log'}")
    return {"steps": state.step, "total_steps": record.total_steps, "train_s": state.elapsed_s,
            "peak_memory_mb": state.peak_memory_mb, "generated_tokens": state.generated_tokens,
            "trainable_parameters": sum(record.trainable_parameters.values()) or None,
            "curve": training_curve(run_dir), "settings": record.settings}


def check_row(config: BenchConfig, results: Results, run: RunConfig, console: Console) -> None:
    """Before any work: drop ``run``'s method's finished row (training and
    evaluation) when it was trained with other settings (an edited recipe,
    another ``--set``), so it is trained and evaluated again, and refuse a
    run folder of other settings left in the bench folder."""
    method, run_dir = run.method, config.output / run.method
    recorded = read_run_file(run_dir)
    if recorded is not None and (changed := changed_settings(recorded, run)):
        raise DistillkitError(f"{run_dir} holds a {method} run with other settings ({describe_changes(changed)}); "
                              f"move it away to train {method} again with the settings now")
    row = results.data["train"].get(method)
    if row is None:
        return
    if "settings" not in row:
        console.print(f"[dim]{method}: its row predates recorded settings, so it is kept unchecked[/]")
    elif changed := changed_settings(run_record(row["settings"]), run):
        console.print(f"{method}: its row was trained with other settings ({describe_changes(changed)}): "
                      "training and evaluating it again")
        results.data["train"].pop(method)
        results.data["eval"].pop(method, None)


CURVE_KEYS = {"loss": "loss", "student/loss": "loss", "val/rougeL": "val/rougeL", "val/loss": "val/loss"}


def training_curve(run_dir: Path) -> list[dict[str, float]]:
    """The run's logged training loss (a two-stage method's student loss)
    and validation ROUGE-L and loss, per step, from ``metrics.jsonl``."""
    points = []
    for record in read_metrics(run_dir):
        point = {CURVE_KEYS[key]: value for key, value in record.items() if key in CURVE_KEYS}
        if point:
            points.append({"step": record["step"], **point})
    return points


def train_command(config: BenchConfig, method: str) -> list[str]:
    """``distillkit train --resume`` of ``method`` into its run folder: the
    experiment trackers' project is the bench folder's name and the run is
    named after the method (unless the bench's overrides, applied after,
    set them), so that a tracker shows the methods side by side."""
    names = [f"logging.project={json.dumps(config.output.resolve().name)}", f"logging.run_name={json.dumps(method)}"]
    return [sys.executable, "-m", "distillkit", "train", "--method", method, "--recipe", config.recipe,
            "--output", str(config.output / method), "--resume",
            *(arg for o in [*names, *config.overrides] for arg in ("--set", o))]


def train_method(config: BenchConfig, method: str) -> dict[str, Any]:
    """Train (or finish) ``method`` in a child process; returns its cost record.
    Without ``MLFLOW_TRACKING_URI``, MLflow's runs of all methods go to one
    store, the bench folder's ``mlflow.db``."""
    run_dir = config.output / method
    run_dir.mkdir(parents=True, exist_ok=True)
    environment = {"MLFLOW_TRACKING_URI": f"sqlite:///{(config.output / 'mlflow.db').resolve()}", **os.environ}
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        code = run_child(train_command(config, method), stdout=log, stderr=subprocess.STDOUT, env=environment)
    if code != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:]
        raise DistillkitError(f"training {method} failed (exit {code}): {' '.join(tail)}; see {run_dir / 'train.log'}")
    return cost_record(run_dir)


def run_child(command: list[str], **popen: Any) -> int:
    """Run ``command`` to its end and return its exit code.  A SIGTERM to
    this process (``kill``, a job scheduler's stop) stops the child first,
    so no training outlives the bench; the run resumes from its last
    checkpoint.  (Ctrl-C reaches the child anyway: it shares the terminal's
    process group.)"""
    with subprocess.Popen(command, **popen) as child:
        if threading.current_thread() is not threading.main_thread():
            return child.wait()  # signal handlers belong to the main thread

        stopped: list[int] = []

        def stop(signum: int, frame: object) -> None:
            stopped.append(signum)
            child.terminate()  # the wait below then returns
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if stopped:
            raise SystemExit(128 + stopped[0])
        return code


def teacher_dir(config: BenchConfig) -> Path | None:
    """The teacher's folder the runs used (their ``teacher`` link)."""
    links = [config.output / m / "teacher" for m in config.methods]
    return next((link.resolve() for link in links if link.exists()), None)


# --- tables ------------------------------------------------------------------


def selection_notes(config: BenchConfig, results: Results) -> list[str]:
    """One line per reduced set: how many of its examples were evaluated."""
    notes = []
    for name in config.sets:
        reports = [r[name] for r in results.data["eval"].values() if config.covers(name, r) and "subset" in r[name]]
        if reports:
            subset = reports[0]["subset"]
            notes.append(f"- {name}: a fixed random subset of {reports[0]['examples']} of its {subset['of']} "
                         f"examples (seed {subset['seed']}, the same for every model)")
    if config.limit:
        notes.append(f"- every set: its first {config.limit} examples")
    return notes


def missing_sets(results: Results) -> dict[str, str]:
    """Test sets whose data is not available, with the reason."""
    return {name: report["missing"] for reports in results.data["eval"].values()
            for name, report in reports.items() if "missing" in report}


def quality_rows(results: Results, models: list[str], sets: list[str]) -> list[dict[str, Any]]:
    """One row per model: mean and std of ROUGE-L per set, and the average of
    the means over the available sets (None until all of them are evaluated)."""
    available = [s for s in sets if s not in missing_sets(results)]
    rows = []
    for model in models:
        reports = results.data["eval"].get(model, {})
        row: dict[str, Any] = {"model": model}
        for name in sets:
            report = reports.get(name, {})
            row[name] = None if "mean" not in report else {"mean": report["mean"], "std": report["std"]}
        means = [row[s]["mean"] for s in available if row[s] is not None]
        row["average"] = statistics.fmean(means) if means and len(means) == len(available) else None
        rows.append(row)
    return rows


def cost_rows(results: Results, methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        train = {k: v for k, v in results.data["train"].get(method, {}).items() if k != "settings"}
        per_step = train["train_s"] / train["steps"] if train.get("steps") else None
        reports = results.data["eval"].get(method)
        generated = sum(r.get("generated_tokens", 0) for r in reports.values()) if reports else None
        rows.append({"method": method, **train, "seconds_per_step": per_step, "eval_generated_tokens": generated})
    return rows


def _best_students(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, str]:
    best = {}
    for column in columns:
        scored = [(r[column]["mean"] if isinstance(r[column], dict) else r[column], r["model"])
                  for r in rows if r["model"] != "teacher" and r[column] is not None]
        if scored:
            best[column] = max(scored)[1]
    return best


def quality_markdown(rows: list[dict[str, Any]], sets: list[str], missing: dict[str, str]) -> str:
    columns = [*sets, "average"]
    best = _best_students(rows, columns)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if value is None:
                cells.append("missing" if column in missing else "—")
                continue
            text = f"{value['mean']:.2f} ± {value['std']:.2f}" if isinstance(value, dict) else f"{value:.2f}"
            cells.append(f"**{text}**" if best.get(column) == row["model"] else text)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    notes = [f"- average: over {', '.join(s for s in sets if s not in missing)}"]
    notes += [f"- {name}: missing ({reason})" for name, reason in missing.items()]
    return "\n".join([*lines, "", *notes])


COST_COLUMNS = [("train_s", "train time (s, steps only)", "{:.0f}"), ("seconds_per_step", "s/step", "{:.2f}"),
                ("peak_memory_mb", "peak memory (MB)", "{:.0f}"), ("generated_tokens", "tokens generated", "{:,}"),
                ("trainable_parameters", "trainable parameters", "{:,}"),
                ("eval_generated_tokens", "eval tokens generated", "{:,}")]


def cost_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | " + " | ".join(h for _, h, _ in COST_COLUMNS) + " |", "|---|" + "---|" * len(COST_COLUMNS)]
    for row in rows:
        cells = ["—" if row.get(k) is None else f.format(row[k]) for k, _, f in COST_COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    flat = [{k: (v["mean"] if isinstance(v, dict) else v) for k, v in row.items()} for row in rows]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)


def write_plots(output: Path, quality: list[dict[str, Any]], cost: list[dict[str, Any]], sets: list[str]) -> None:
    """``quality.png``: ROUGE-L per set and model (error bars: std over
    seeds); ``quality_vs_cost.png``: average ROUGE-L against training time;
    ``curves.png``: each method's training loss and validation ROUGE-L per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [s for s in sets if any(r[s] is not None for r in quality)]
    width = 0.8 / max(len(quality), 1)
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(present) + 2), 4))
    for index, row in enumerate(quality):
        values = [row[s]["mean"] if row[s] else 0.0 for s in present]
        errors = [row[s]["std"] if row[s] else 0.0 for s in present]
        axes.bar([i + index * width for i in range(len(present))], values, width, yerr=errors, label=row["model"])
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(present))], present)
    axes.set_ylabel("ROUGE-L")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(output / "quality.png", dpi=120)
    figure, axes = plt.subplots(figsize=(6, 4))
    averages = {r["model"]: r["average"] for r in quality}
    for row in cost:
        if row.get("train_s") is not None and averages.get(row["method"]) is not None:
            axes.scatter(row["train_s"], averages[row["method"]])
            axes.annotate(row["method"], (row["train_s"], averages[row["method"]]))
    axes.set_xlabel("training time (s, steps only)")
    axes.set_ylabel("average ROUGE-L over the sets")
    figure.tight_layout()
    figure.savefig(output / "quality_vs_cost.png", dpi=120)
    panels = {"loss": "training loss (each method's own)", "val/loss": "validation loss (cross-entropy)",
              "val/rougeL": "validation ROUGE-L"}
    figure, axes_row = plt.subplots(1, len(panels), figsize=(14, 4))
    for axes, (key, label) in zip(axes_row, panels.items()):
        for row in cost:
            points = [(p["step"], p[key]) for p in row.get("curve") or [] if key in p]
            if points:
                axes.plot(*zip(*points), marker="." if key == "loss" else "o", label=row["method"])
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(label)
        if axes.lines:
            axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output / "curves.png", dpi=120)
    plt.close("all")


def answers(results: Results, models: list[str], sets: list[str], seed: int) -> list[dict[str, Any]]:
    """The first evaluated set's first prompts (the samples an eval report
    keeps) with each model's response at ``seed``: one dict per prompt with
    ``set``, ``instruction``, ``input``, ``reference`` and ``responses``
    (model -> text)."""
    for name in sets:
        reported = {m: results.data["eval"].get(m, {}).get(name, {}).get("samples") for m in models}
        reported = {m: samples for m, samples in reported.items() if samples}
        if reported:
            first = next(iter(reported.values()))
            return [{"set": name, "instruction": sample["instruction"], "input": sample["input"],
                     "reference": sample["references"][0],
                     "responses": {m: samples[i]["responses"].get(str(seed), "") for m, samples in reported.items()
                                   if i < len(samples)}}
                    for i, sample in enumerate(first)]
    return []


def answers_markdown(shown: list[dict[str, Any]], seed: int) -> str:
    lines = []
    for index, item in enumerate(shown, 1):
        lines += [f"### {item['set']} test prompt {index}: {_prompt(item)}", "", "| model | response (seed "
                  f"{seed}) |", "|---|---|", f"| reference | {_cell_text(item['reference'])} |"]
        lines += [f"| {model} | {_cell_text(text)} |" for model, text in item["responses"].items()]
        lines.append("")
    return "\n".join(lines)


def _prompt(item: dict[str, Any]) -> str:
    return item["instruction"] + (f" [{item['input']}]" if item["input"] else "")


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(empty)"


def _cell_text(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def answers_tables(shown: list[dict[str, Any]], seed: int, width: int = 400) -> Group:
    """One rich table per prompt: the reference and each model's response
    (cut to ``width`` characters), for the terminal's width."""
    tables = []
    for index, item in enumerate(shown, 1):
        table = Table(title=f"{item['set']} test prompt {index}: {_prompt(item)}", expand=True, show_lines=True,
                      title_justify="left")
        table.add_column("model", no_wrap=True, style="bold")
        table.add_column(f"response (seed {seed})", ratio=1)
        for model, text in {"reference": item["reference"], **item["responses"]}.items():
            flat = _one_line(text)
            table.add_row(model, flat if len(flat) <= width else flat[:width] + " …",
                          style="dim" if model == "reference" else None)
        tables.append(table)
    return Group(*tables)


def _models(config: BenchConfig, results: Results) -> list[str]:
    return (["teacher"] if "teacher" in results.data["eval"] else []) + config.methods


def answers_view(config: BenchConfig) -> Group:
    """:func:`answers_tables` of a finished bench's ``results.json``."""
    seed = config.seeds[0]
    results = Results(config.output / "results.json")
    return answers_tables(answers(results, _models(config, results), config.sets, seed), seed)


def write_tables(config: BenchConfig, results: Results) -> dict[str, str]:
    models = _models(config, results)
    quality = quality_rows(results, models, config.sets)
    missing = missing_sets(results)
    cost = cost_rows(results, config.methods)
    quality_text = "\n".join([quality_markdown(quality, config.sets, missing), *selection_notes(config, results)])
    tables = {"quality": quality_text, "cost": cost_markdown(cost),
              "answers": answers_markdown(answers(results, models, config.sets, config.seeds[0]), config.seeds[0])}
    for name, text in tables.items():
        (config.output / f"{name}.md").write_text(text + "\n")
    write_csv(config.output / "quality.csv", quality)
    write_csv(config.output / "cost.csv", cost)
    (config.output / "tables.json").write_text(json.dumps(
        {"recipe": config.recipe, "seeds": config.seeds, "limit": config.limit, "subsets": config.subsets,
         "quality": quality, "cost": cost},
        indent=2) + "\n")
    write_plots(config.output, quality, cost, config.sets)
    return tables


# --- running -----------------------------------------------------------------


class LiveView:
    """A rich table of the cells and their status, redrawn as they change."""

    def __init__(self, cells: list[str]) -> None:
        self.status = dict.fromkeys(cells, "pending")
        self.detail = ""

    def __rich__(self) -> Group:
        table = Table("cell", "status", title="distillkit bench")
        styles = {"running": "bold yellow", "done": "green", "failed": "red", "skipped": "dim"}
        for cell, status in self.status.items():
            table.add_row(cell, status, style=styles.get(status.split(" ")[0]))
        return Group(table, self.detail)


def run_bench(config: BenchConfig, console: Console) -> dict[str, str]:
    """Train and evaluate every cell not done yet; write and return the tables."""
    from distillkit.evaluation.protocol import evaluate_sets

    config.validate()
    config.output.mkdir(parents=True, exist_ok=True)
    results = Results(config.output / "results.json")
    recipe = load_recipe(config.recipe, config.overrides)
    for method in config.methods:
        check_row(config, results, resolve_run(recipe, method), console)
    cells = ["eval teacher", *(f"{step} {m}" for m in config.methods for step in ("train", "eval"))]
    view = LiveView(cells)
    failures = []

    def cell(name: str, done: bool, work: Callable[[], None]) -> None:
        if done:
            view.status[name] = "skipped (done before)"
            return
        view.status[name] = "running"
        started = time.perf_counter()
        try:
            work()
            view.status[name] = f"done ({time.perf_counter() - started:.0f} s)"
        except DistillkitError as error:
            view.status[name] = "failed"
            failures.append(f"{name}: {error}")
        results.save()

    def evaluate(model: str, folder: Path | None) -> None:
        todo = [s for s in config.sets if not config.covers(s, results.data["eval"].get(model, {}))]

        def work() -> None:
            if folder is None:  # evaluate_sets reports a folder without a model itself
                raise DistillkitError(f"no trained {model} to evaluate")

            def progress(n: int, total: int) -> None:
                view.detail = f"eval {model}: {n}/{total} generations"

            # a teacher's folder may hold no run of its own (a teacher without teacher.sft): the bench's settings
            recipe = load_recipe(config.recipe, config.overrides) if model == "teacher" else None
            reports = evaluate_sets(folder, todo, seeds=config.seeds, limit=config.limit, subsets=config.subsets,
                                    progress=progress, notice=lambda text: None, recipe=recipe)
            results.data["eval"].setdefault(model, {}).update(reports)
        cell(f"eval {model}", not todo, work)

    with Live(view, console=console, refresh_per_second=2):
        for method in config.methods:  # each method trained, then evaluated: a finished row survives a kill
            evaluated = all(config.covers(s, results.data["eval"].get(method, {})) for s in config.sets)
            if not evaluated and not (config.output / method / "best").is_dir():
                # its run folder is gone (e.g. another machine): retrain it, and evaluate the new weights on every
                # set (training again need not give the same weights to the last bit, and a row mixes no two runs)
                results.data["train"].pop(method, None)
                results.data["eval"].pop(method, None)

            def train(method: str = method) -> None:
                results.data["train"][method] = train_method(config, method)
            cell(f"train {method}", method in results.data["train"], train)
            if view.status["eval teacher"] == "pending" and teacher_dir(config) is not None:
                evaluate("teacher", teacher_dir(config))
            evaluate(method, config.output / method)
        if view.status["eval teacher"] == "pending":
            evaluate("teacher", teacher_dir(config))
        view.detail = ""
    tables = write_tables(config, results)
    if failures:
        raise DistillkitError("; ".join(failures))
    return tables


def dry_run(config: BenchConfig, console: Console, *, time_steps: int = 0) -> None:
    """Print the cells and each method's memory plan per device (see
    :mod:`distillkit.planning`), and whether it fits; with ``time_steps`` N
    > 0 also the measured time estimate (N timed steps per method, see
    :mod:`distillkit.planning.timing`), written to ``OUTPUT/estimate.json``
    to compare with the bench's measured cost."""
    from distillkit.engine.layout import resolve_layout
    from distillkit.planning import available_memory, estimate, verdict

    config.validate()
    recipe = load_recipe(config.recipe, config.overrides)
    plan = Table("cell", "what", title=f"bench plan: recipe {recipe.name} -> {config.output}")
    for method in config.methods:
        method_spec = registry().methods[method]
        plan.add_row(f"train {method}", f"source {method_spec.source}, teacher adapter {method_spec.teacher_adapter}, "
                                        f"from {method_spec.student_init} student")
    for model in ["teacher", *config.methods]:
        plan.add_row(f"eval {model}", f"{', '.join(config.sets)} x seeds {config.seeds}"
                                      + (f", first {config.limit} examples" if config.limit else "")
                                      + "".join(f", {n} of {name} (seeded subset)" for name, n in config.subsets.items()))
    console.print(plan)
    layout = resolve_layout()
    device, free = available_memory(layout)
    memory = Table("method", "peak (MiB)", "largest phase", "verdict",
                   title=f"memory estimate (training, per device; {layout.describe()})")
    shapes: dict = {}
    for method in config.methods:
        estimated = estimate(recipe, method, layout, shapes=shapes)
        shapes = {"student": estimated.student, **({"teacher": estimated.teacher} if estimated.teacher else {})}
        memory.add_row(method, f"{estimated.needed():,.0f}", estimated.peak_phase(), verdict(estimated, free)[1])
    console.print(memory)
    console.print(f"{device}: {free:,.0f} MiB; `distillkit train --method M --recipe {recipe.name} --dry-run` "
                  "itemises a method's plan")
    if time_steps:
        from distillkit.planning.timing import estimate_tables, estimate_time

        estimated_time = estimate_time(recipe, config.methods, sets=config.sets, seeds=config.seeds,
                                       limit=config.limit, subsets=config.subsets, time_steps=time_steps,
                                       console=console)
        write_json_atomic(config.output / "estimate.json", estimated_time, indent=2)
        console.print(estimate_tables(estimated_time))
        console.print(f"written to {config.output / 'estimate.json'}", soft_wrap=True)
