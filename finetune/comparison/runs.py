"""Run directories as records: what each run was asked (overrides) and what it measured (metrics, epochs).

Everything is read back from the files a run leaves (``.hydra/overrides.yaml``, ``metrics.json``,
``epochs.csv``, ``config.yaml``), so a report built during the sweep and one rebuilt later agree. A run that
failed leaves a ``metrics.json`` too (:func:`write_failure`), so it is listed rather than missing.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from finetune.errors import FineTuneError

__all__ = [
    "METRIC_COLUMNS", "Run", "collect_runs", "first_line", "report_rows", "shared_settings", "swept_keys",
    "write_failure",
]

# After the run name and the swept values; peak_gpu_memory_mb joins where some run has it.
METRIC_COLUMNS = (
    "status", "val_acc", "val_top5", "test_acc", "test_top5", "trainable_params", "train_time_s",
    "train_images_per_s", "peak_memory_mb", "epochs", "error",
)


@dataclass
class Run:
    """What one run directory holds."""

    name: str  # path relative to the compared directory ("0", "1", ...)
    path: Path
    overrides: dict[str, str]  # task overrides by key, hydra.* left out
    metrics: dict[str, Any]
    val_acc_by_epoch: list[tuple[int, float]] = field(default_factory=list)

    @property
    def status(self) -> str:
        # Runs from before status was recorded have metrics but no status; no metrics.json: never finished.
        return str(self.metrics.get("status") or ("ok" if "val_acc" in self.metrics else "incomplete"))


def first_line(error: BaseException) -> str:
    """The one line a table can show; the type is kept for anything but the user-facing FineTuneError."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(error, FineTuneError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def write_failure(run_dir: Path, error: BaseException) -> None:
    """Leave ``metrics.json`` with ``status: failed`` so the report lists the run instead of missing it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": "failed", "error": first_line(error)}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")


def _natural_key(name: str) -> list[Any]:
    # Job numbers sort as numbers: 2 before 10.
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            out[key] = value
    return out


def _val_acc_by_epoch(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "epochs.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [(int(r["epoch"]), float(r["val/acc"])) for r in csv.DictReader(f) if r.get("val/acc")]


def collect_runs(root: str | Path) -> list[Run]:
    """Every run directory under ``root`` (``root`` itself included), in job-number order.

    A run directory is one with Hydra's ``.hydra/overrides.yaml`` or a ``metrics.json``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FineTuneError(f"'{root}' is not a directory")
    dirs = {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    dirs |= {p.parent for p in root.rglob("metrics.json")}
    if not dirs:
        raise FineTuneError(f"no run directories under '{root}' (none holds .hydra/overrides.yaml or metrics.json)")
    runs = []
    for d in sorted(dirs, key=lambda d: _natural_key(d.relative_to(root).as_posix())):
        metrics_path = d / "metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        except json.JSONDecodeError:
            metrics = {"status": "incomplete", "error": "metrics.json is not valid JSON"}
        name = d.relative_to(root).as_posix()
        runs.append(Run(name if name != "." else d.name, d, _overrides(d), metrics, _val_acc_by_epoch(d)))
    return runs


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """The override keys whose values differ between runs (all of one run's, for a single run)."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.overrides if k not in keys]
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def report_rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per run, values as in ``metrics.json`` (fractions, seconds, MiB)."""
    swept = swept_keys(runs)
    metric_cols = list(METRIC_COLUMNS)
    if any("peak_gpu_memory_mb" in r.metrics for r in runs):
        metric_cols.insert(metric_cols.index("peak_memory_mb") + 1, "peak_gpu_memory_mb")
    if any("pruned" in r.metrics for r in runs):  # +recipe=tune: trials its pruner stopped (finetune.callbacks.prune)
        metric_cols.insert(metric_cols.index("epochs") + 1, "pruned_at_epoch")
    columns = ["run", *swept, *metric_cols]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, **{k: r.overrides.get(k, "") for k in swept}}
        row.update({k: r.metrics.get(k, "") for k in metric_cols})
        if "pruned_at_epoch" in row:
            row["pruned_at_epoch"] = (r.metrics.get("pruned") or {}).get("epoch", "")
        row["status"] = r.status
        if row["epochs"] == "" and r.val_acc_by_epoch:
            row["epochs"] = len(r.val_acc_by_epoch)
        rows.append(row)
    return columns, rows


def shared_settings(runs: Sequence[Run]) -> dict[str, str]:
    """Settings every run used alike (from each run's resolved ``config.yaml``): what makes rows comparable."""
    configs = [OmegaConf.load(r.path / "config.yaml") for r in runs if (r.path / "config.yaml").exists()]
    out = {}
    for key in ("seed", "evaluate", "backbone.name", "data.source", "trainer.max_epochs"):
        values = {str(OmegaConf.select(c, key)) for c in configs}
        if len(values) == 1:
            out[key] = values.pop()
    return out
