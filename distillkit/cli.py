"""The ``distillkit`` command line: methods, recipes, train, eval."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distillkit.errors import DistillkitError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                  help="Plugin-based knowledge distillation for generative language models.")
out = Console()
err = Console(stderr=True)


SET_HELP = ("override the recipe, in order (repeatable): key=value sets a key (a TOML value), key={...} replaces "
            "a whole table, '~key' removes a key (e.g. --set '~teacher.config' --set teacher.path=gpt2)")
PUSH_HELP = "upload the student to this Hub model repository (OWNER/NAME, created if needed) with huggingface_hub"
REPORT_TO_HELP = ("comma-separated experiment trackers (tensorboard, mlflow, wandb, trackio, ...), the same as "
                  "--set logging.report_to=[...]")


def _setup_logging() -> None:
    # A deprecated or soon-removed API called from distillkit's own code stops the command (warnings are
    # attributed to the calling module); one deep inside a dependency stays a warning.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module=r"distillkit(\.|$)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False)])
    main_process = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, only rank 0 reports
    logging.getLogger("distillkit").setLevel(logging.INFO if main_process else logging.WARNING)
    err.quiet = not main_process
    # Tied input/output embeddings are saved once; accelerate warns about it on every checkpoint.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _at_least(option: str, value: int, minimum: int, meaning: str = "") -> None:
    """A one-line error for a count option below ``minimum``."""
    if value < minimum:
        raise DistillkitError(f"{option} must be >= {minimum}{meaning}, got {value}")


def _fail(error: DistillkitError) -> None:
    err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List registered methods with their plugin and description."""
    from distillkit.registry import registry

    try:
        category = registry().methods
    except DistillkitError as error:
        _fail(error)
    rows = [{"name": name, "plugin": category.entry(name).plugin, "description": category[name].description,
             "source": category[name].source, "teacher_adapter": category[name].teacher_adapter}
            for name in category.names()]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    # name and plugin never wrap; the description takes the rest of the terminal's width
    table = Table(title="registered methods", expand=True)
    table.add_column("method", no_wrap=True)
    table.add_column("plugin", no_wrap=True)
    table.add_column("description (pseudo-target source, teacher adapter)", ratio=1)
    for row in rows:
        table.add_row(row["name"], row["plugin"], f"{row['description']}\n[dim]source {row['source']}, teacher "
                                                  f"{row['teacher_adapter'] or 'none'}[/]")
    out.print(table)


@app.command()
def recipes(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List the shipped (and plugin-provided) recipes."""
    from distillkit.config import load_raw_recipe, recipe_files

    try:
        rows = [{"name": name, "path": str(path), "description": load_raw_recipe(name).get("description", "")}
                for name, path in sorted(recipe_files().items())]
    except DistillkitError as error:
        _fail(error)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("recipe", "description", title="recipes")
    for row in rows:
        table.add_row(row["name"], row["description"])
    out.print(table)


@app.command()
def train(
    method: Annotated[str, typer.Option(help="registered method name (see `distillkit methods`)")],
    recipe: Annotated[str, typer.Option(help="recipe name (see `distillkit recipes`) or path to a .toml")],
    output: Annotated[Path | None, typer.Option(help="run folder [default: runs/RECIPE/METHOD]")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    report_to: Annotated[str | None, typer.Option(help=REPORT_TO_HELP)] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after N optimizer steps")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --output from its latest checkpoint")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the per-device memory plan and whether it fits; "
                                                            "train nothing, load no weights")] = False,
    accelerate_config: Annotated[str | None, typer.Option(
        help="with --dry-run: the layout to plan for, an accelerate config file or a shipped one's name (fsdp, ddp, "
             "zero2, zero3-offload, ...); default: the accelerate launch environment, else one device")] = None,
    device_memory: Annotated[float | None, typer.Option(
        "--device-memory", metavar="GIB", help="with --dry-run: memory per device in GiB; default: the first CUDA "
                                               "device's free memory, else available CPU RAM")] = None,
    push_to_hub: Annotated[str | None, typer.Option(metavar="REPO", help=PUSH_HELP + "; checked before training, "
                                                                         "best/ is uploaded at the end")] = None,
) -> None:
    """Distill (or fine-tune) a student with METHOD on RECIPE."""
    _setup_logging()
    overrides = _overrides(set_, report_to)
    if dry_run:
        import os

        from distillkit.planning import dry_run as plan_run

        try:
            if os.environ.get("RANK", "0") == "0":  # under accelerate launch, one process prints
                plan_run(method, recipe, overrides=overrides, accelerate_config=accelerate_config,
                         device_memory_gib=device_memory, console=out)
        except DistillkitError as error:
            _fail(error)
        return
    from distillkit.training.pipeline import train as run_training

    try:
        run_training(method, recipe, output=output, overrides=overrides, max_steps=max_steps, resume=resume,
                     console=err, push_to_hub=push_to_hub)
    except DistillkitError as error:
        _fail(error)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run folder (the --output of `distillkit train`)")],
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="new or empty folder to export into")],
    eval_report: Annotated[list[Path] | None, typer.Option(
        metavar="FILE", help="a JSON file of `distillkit eval --output` for the card's eval table (repeatable)")] = None,
    push_to_hub: Annotated[str | None, typer.Option(metavar="REPO", help=PUSH_HELP)] = None,
) -> None:
    """Copy RUN's best student into DIR as a Hub-ready model folder: weights,
    config, generation config, tokenizer, model card (README.md), the teacher
    adapter in peft's format and run.json; the run folder is only read."""
    _setup_logging()
    from distillkit.training.export import check_export, check_repo_id, export_run, push_folder, read_eval_reports

    try:
        check_export(run, folder)
        if push_to_hub is not None:
            check_repo_id(push_to_hub)
        export_run(run, folder, read_eval_reports(eval_report or []))
        out.print(f"exported {run} to {folder}")
        if push_to_hub is not None:
            out.print(f"pushed: {push_folder(folder, push_to_hub)}")
    except DistillkitError as error:
        _fail(error)


SUBSET_HELP = ("SET=N: evaluate SET on a fixed random subset of N examples, the same for every model "
               "(repeatable; a reduced protocol that still spans the set)")


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option(help="model folder, or a run folder (its best checkpoint is used)")],
    data: Annotated[str, typer.Option(help="comma-separated test sets: registered dataset names (their test split, "
                                           "e.g. dolly,selfinst,vicuna,sni,unni) or data files")],
    seeds: Annotated[str | None, typer.Option(help="comma-separated sampling seeds [default: the run's recipe's, "
                                                   "else 10,20,30,40,50]")] = None,
    limit: Annotated[int, typer.Option(help="evaluate only the first N examples of each set (0: all)")] = 0,
    subset: Annotated[list[str] | None, typer.Option(help=SUBSET_HELP)] = None,
    output: Annotated[Path | None, typer.Option(help="write the reports to this JSON file")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per generation batch")] = 0,
) -> None:
    """Generate responses and report ROUGE-L per set and seed, with mean ± std
    over seeds (cached per set and seed: a rerun computes only new cells)."""
    _setup_logging()
    from distillkit.evaluation.protocol import check_subsets, evaluate_sets, recipe_seeds

    sets = _names(data)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        _at_least("--limit", limit, 0, " (0: all)")
        _at_least("--batch-size", batch_size, 0, " (0: the recipe's)")
        subsets = _subsets(subset)
        check_subsets(subsets, sets)
        seed_list = _seed_list(seeds) if seeds else recipe_seeds(model)
        with Progress(*columns, console=err) as progress:
            task = progress.add_task(f"eval {', '.join(sets)}", total=None)
            reports = evaluate_sets(model, sets, seeds=seed_list, limit=limit, subsets=subsets,
                                    batch_size=batch_size,
                                    progress=lambda done, total: progress.update(task, completed=done, total=total),
                                    notice=err.print)
    except DistillkitError as error:
        _fail(error)
    out.print(_eval_table(reports, seed_list, model))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        written = reports[sets[0]] if len(reports) == 1 else reports
        output.write_text(json.dumps(written, indent=2) + "\n")


def _eval_table(reports: dict[str, dict], seeds: list[int], model: Path) -> Table:
    """Rows: test sets; columns: mean ± std, ROUGE-L per seed, examples, tokens generated."""
    table = Table("set", "mean ± std", *(f"seed {s}" for s in seeds), "examples", "generated tokens",
                  title=f"ROUGE-L of {model}")
    for name, report in reports.items():
        if "missing" in report:
            table.add_row(name, f"missing: {report['missing']}", *[""] * (len(seeds) + 2), style="dim")
            continue
        table.add_row(name, f"{report['mean']:.2f} ± {report['std']:.2f}",
                      *(f"{report['rougeL'][str(s)]:.2f}" for s in seeds), str(report["examples"]),
                      f"{report['generated_tokens']:,}")
    return table


def _read_json(path: Path) -> dict:
    """A JSON file written earlier, or one line naming the file and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DistillkitError(f"{path} is not readable JSON ({error}); move it away or give another --output") \
            from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _overrides(set_: list[str] | None, report_to: str | None) -> list[str]:
    """The ``--set`` assignments, then ``--report-to``'s ``logging.report_to``."""
    return [*(set_ or []), *([] if report_to is None else [f"logging.report_to={json.dumps(_names(report_to))}"])]


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in _names(text)]
    except ValueError:
        raise DistillkitError(f"--seeds expects comma-separated integers, got '{text}'") from None


def _subsets(items: list[str] | None) -> dict[str, int]:
    """``--subset SET=N`` options as {SET: N}."""
    subsets = {}
    for item in items or []:
        name, _, size = item.partition("=")
        if not name or not size.strip().isdigit():
            raise DistillkitError(f"--subset expects SET=N (e.g. sni=100), got '{item}'")
        subsets[name.strip()] = int(size)
    return subsets


@app.command()
def bench(
    recipe: Annotated[str, typer.Option(help="recipe name (see `distillkit recipes`) or path to a .toml")],
    methods: Annotated[str, typer.Option(help="comma-separated method names, or 'all' (every registered "
                                              "method, plugins' included)")] = "all",
    data: Annotated[str, typer.Option(help="comma-separated test sets")] = "dolly,selfinst,vicuna,sni,unni",
    seeds: Annotated[str | None, typer.Option(help="comma-separated sampling seeds [default: the recipe's]")] = None,
    output: Annotated[Path | None, typer.Option(help="bench folder [default: runs/bench/RECIPE]")] = None,
    limit: Annotated[int, typer.Option(help="evaluate on the first N examples of each set (0: all)")] = 0,
    subset: Annotated[list[str] | None, typer.Option(help=SUBSET_HELP)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    report_to: Annotated[str | None, typer.Option(help=REPORT_TO_HELP + "; one project (the bench folder's "
                                                       "name), one run per method")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and memory estimate; train nothing")] = False,
    time_steps: Annotated[int, typer.Option(help="with --dry-run: also time N training steps per method and one "
                                                 "sampling batch per test set, and print the estimated time of "
                                                 "the bench (0: no timing, no weights loaded)")] = 0,
) -> None:
    """Train METHODS on RECIPE side by side, evaluate them on the test sets,
    and write the quality and cost tables and plots (resumable)."""
    _setup_logging()
    from distillkit.bench import BenchConfig, answers_view, run_bench
    from distillkit.bench import dry_run as print_plan
    from distillkit.config import load_recipe

    try:
        _at_least("--limit", limit, 0, " (0: all)")
        _at_least("--time-steps", time_steps, 0, " (0: no timing)")
        if time_steps and not dry_run:
            raise DistillkitError("--time-steps measures for a dry run only; add --dry-run (a real bench "
                                  "records its measured cost in cost.md)")
        overrides = _overrides(set_, report_to)
        loaded = load_recipe(recipe, overrides)
        from distillkit.registry import registry

        names = registry().methods.names() if methods == "all" else _names(methods)
        config = BenchConfig(recipe, names, _names(data),
                             _seed_list(seeds) if seeds else list(loaded.eval.seeds),
                             output or Path("runs") / "bench" / loaded.name, limit, overrides, _subsets(subset))
        if dry_run:
            print_plan(config, out, time_steps=time_steps)
            return
        tables = run_bench(config, err)
    except DistillkitError as error:
        _fail(error)
    out.print(answers_view(config))
    typer.echo(f"\n{tables['quality']}\n\n{tables['cost']}\n")  # unwrapped, to paste as Markdown
    written = ", ".join(f"{name}.png" for name in ("quality", "quality_vs_cost", "curves"))
    typer.echo(f"tables (quality and cost .md/.csv, answers.md) and plots ({written}) in {config.output}")


analyze = typer.Typer(no_args_is_help=True, help="Analyses of distilled students.")
app.add_typer(analyze, name="analyze")


@analyze.command("exposure-bias")
def exposure_bias(
    teacher: Annotated[Path, typer.Option(help="the fixed teacher's model folder (e.g. runs/tiny/kd/teacher)")],
    student: Annotated[list[Path], typer.Option(help="a student's model or run folder (repeatable)")],
    label: Annotated[list[str] | None, typer.Option(help="a name per --student (default: its folder name)")] = None,
    data: Annotated[str, typer.Option(help="registered dataset name (its test split) or a data file")] = "dolly",
    limit: Annotated[int, typer.Option(help="use the first N prompts (0: all)")] = 100,
    max_length: Annotated[int, typer.Option(min=1, help="longest generation length l, in tokens")] = 50,
    samples: Annotated[int, typer.Option(min=1, help="sampled responses per prompt and model")] = 3,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 10,
    output: Annotated[Path, typer.Option(help="folder for exposure_bias.json and .png")] = Path("runs/exposure-bias"),
    batch_size: Annotated[int, typer.Option(help="sequences per batch (0: the teacher run's)")] = 0,
) -> None:
    """ExAccErr(l): the excess KL(teacher || student) accumulated over l steps
    on the student's own prefixes over the teacher's (PromptKD Eqs. 5-7)."""
    _setup_logging()
    from distillkit.evaluation.exposure_bias import exposure_bias_report, plot_exposure_bias
    from distillkit.files import write_json_atomic

    labels = label or [folder.name for folder in student]
    path = output / "exposure_bias.json"
    try:
        _at_least("--limit", limit, 0, " (0: all)")
        _at_least("--batch-size", batch_size, 0, " (0: the teacher run's)")
        if len(labels) != len(student) or len(set(labels)) < len(labels):
            raise DistillkitError(f"labels {labels} for {len(student)} --student folder(s); "
                                  "give one distinct --label per --student")
        earlier = _read_json(path) if path.is_file() else None
        report = exposure_bias_report(teacher, dict(zip(labels, student)), data, limit=limit, steps=max_length,
                                      samples=samples, seed=seed, batch_size=batch_size, earlier=earlier,
                                      notice=err.print)
    except DistillkitError as error:
        _fail(error)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report, indent=2)
    plot_exposure_bias(report, output / "exposure_bias.png")
    lengths = sorted({*range(10, max_length + 1, 10), max_length})
    table = Table("student", *(f"l = {length}" for length in lengths),
                  title=f"ExAccErr (%) on {data}, {report['examples']} prompts x {samples} samples")
    for name, result in report["students"].items():
        table.add_row(name, *(f"{result['ExAccErr'][length - 1]:.1f}" for length in lengths))
        if "R_running" in result:  # not in reports written before the running shares were measured
            table.add_row("  running: own / teacher",
                          *(f"{result['R_running'][length - 1]:.0%} / {result['E_running'][length - 1]:.0%}"
                            for length in lengths), style="dim")
    out.print(table)
    out.print(f"written to {output}/exposure_bias.json and .png")


def main() -> None:
    app()
