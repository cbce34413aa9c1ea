"""``distillkit export`` and ``--push-to-hub``: a run's best student as a
standalone Hub-ready folder (the transformers model folder, its model card
with the eval table of the given reports, the teacher adapter as its own
save wrote it, and ``run.json``, so ``distillkit eval`` on the folder keeps
the run's lengths and sampling), and its upload through huggingface_hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distillkit.config.run_folder import BEST, RUN_FILE
from distillkit.errors import DistillkitError
from distillkit.files import replace_dir
from distillkit.training.model_card import write_model_card

REPORT_KEYS = {"rougeL", "mean", "std", "examples"}


def read_eval_reports(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Reports per test set from files ``distillkit eval --output`` wrote
    (one set's report, or a report per set); a later file's set replaces an
    earlier one's."""
    reports: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DistillkitError(f"--eval-report {path} cannot be read ({str(err).splitlines()[0]}); pass a file "
                                  "that `distillkit eval --output` wrote") from None
        single = isinstance(data, dict) and ("missing" in data or REPORT_KEYS <= data.keys())
        found = {data.get("data", path.stem): data} if single else data
        if not isinstance(found, dict) or not found or not all(
                isinstance(r, dict) and ("missing" in r or REPORT_KEYS <= r.keys()) for r in found.values()):
            raise DistillkitError(f"--eval-report {path} is not an eval report (expected {', '.join(sorted(REPORT_KEYS))}"
                                  " per set); pass a file that `distillkit eval --output` wrote")
        reports.update(found)
    return reports


def check_export(run_dir: Path, dest: Path) -> Path:
    """Before anything is written: the run's ``best/`` (returned), and a
    destination that does not exist or is empty."""
    best = run_dir / BEST
    if not (best / "config.json").is_file() or not (run_dir / RUN_FILE).is_file():
        raise DistillkitError(f"{run_dir} is not a run folder with a best student (best/config.json and run.json); "
                              "pass the --output folder of `distillkit train`")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DistillkitError(f"{dest} exists and is not empty; choose a new or empty folder to export into")
    if dest.resolve().is_relative_to(run_dir.resolve()):
        raise DistillkitError(f"{dest} is inside the run folder {run_dir}; export outside it (the run is never "
                              "changed)")
    return best


def export_run(run_dir: Path, dest: Path, reports: dict[str, dict[str, Any]]) -> None:
    """Copy the run's best student into ``dest`` with ``run.json`` and its
    model card (with the eval table of ``reports``); the run folder is only
    read.  ``dest`` appears complete or not at all."""
    best = check_export(run_dir, dest)

    def write(scratch: Path) -> None:
        shutil.copytree(best, scratch)
        shutil.copy2(run_dir / RUN_FILE, scratch / RUN_FILE)
        write_model_card(scratch, run_dir, reports)

    replace_dir(dest, write)


HUB_FIX = ("log in with `hf auth login` (or set HF_TOKEN), unset HF_HUB_OFFLINE and check HF_ENDPOINT, or leave out "
           "--push-to-hub")


def check_repo_id(repo: str) -> None:
    """``repo`` is a Hub repository id (checked offline)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise DistillkitError(f"--push-to-hub '{repo}' is not a Hub repository id; use OWNER/NAME") from None


def check_hub(repo: str) -> None:
    """That a push to ``repo`` can work: a valid repository id and a Hub that
    answers ``whoami`` with this machine's token (no upload, no model loaded)."""
    from huggingface_hub import whoami

    check_repo_id(repo)
    try:
        whoami()
    except Exception as err:  # noqa: BLE001 - offline, no token, refused connection: one line
        raise DistillkitError(f"--push-to-hub {repo}: the Hub cannot be reached ({_reason(err)}); {HUB_FIX}") from None


def push_folder(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo`` (created if
    needed); returns the commit URL.  ``folder`` is only read."""
    from huggingface_hub import create_repo, upload_folder

    later = f"{folder} is complete and kept: push it later with `hf upload {repo} {folder}`"
    try:
        check_hub(repo)
    except DistillkitError as err:
        raise DistillkitError(f"{err}; {later}") from None
    try:
        create_repo(repo, exist_ok=True)
        return str(upload_folder(repo_id=repo, folder_path=folder, commit_message="distillkit export"))
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes one line
        raise DistillkitError(f"--push-to-hub {repo}: the upload failed ({_reason(err)}); {later}") from None


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}"
