"""Runs side by side: ``comparison.csv``, ``comparison.md`` and ``comparison.png`` in a sweep directory.

``python -m finetune --multirun ...`` writes them when the sweep ends, through :class:`CompareCallback`
(a Hydra callback, so any launcher); ``python -m finetune.compare DIR`` rebuilds them from the run
directories under DIR, e.g. after adding runs or after an interrupted sweep. Everything is read from
the run directories (``.hydra/overrides.yaml``, ``metrics.json``, ``epochs.csv``), so both give the same
files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.errors import FineTuneError

__all__ = [
    "METRIC_COLUMNS",
    "CompareCallback",
    "Run",
    "collect_runs",
    "first_line",
    "main",
    "report_rows",
    "swept_keys",
    "write_failure",
    "write_report",
]

log = logging.getLogger(__name__)

# After the run name and the swept values; peak_gpu_memory_mb joins where some run has it.
METRIC_COLUMNS = (
    "status", "val_acc", "val_top5", "test_acc", "test_top5", "trainable_params", "train_time_s",
    "train_images_per_s", "peak_memory_mb", "epochs", "error",
)
_MD_HEADERS = {
    "val_acc": "val top-1", "val_top5": "val top-5", "test_acc": "test top-1", "test_top5": "test top-5",
    "trainable_params": "trainable params", "train_time_s": "train time s", "train_images_per_s": "train images/s",
    "peak_memory_mb": "peak RSS MiB", "peak_gpu_memory_mb": "peak GPU MiB",
}


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
    columns = ["run", *swept, *metric_cols]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, **{k: r.overrides.get(k, "") for k in swept}}
        row.update({k: r.metrics.get(k, "") for k in metric_cols})
        row["status"] = r.status
        if row["epochs"] == "" and r.val_acc_by_epoch:
            row["epochs"] = len(r.val_acc_by_epoch)
        rows.append(row)
    return columns, rows


def _label(row: dict[str, Any], swept: Sequence[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in swept if row[k] != "") or f"run {row['run']}"


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _cell(key: str, value: Any) -> str:
    if value == "" or value is None:
        return "-"
    if key in ("val_acc", "val_top5", "test_acc", "test_top5"):
        return f"{100 * float(value):.2f}%"
    if key == "trainable_params":
        return f"{int(value):,}"
    if key in ("train_time_s", "train_images_per_s"):
        return f"{float(value):.1f}"
    if key in ("peak_memory_mb", "peak_gpu_memory_mb"):
        return f"{float(value):.0f}"
    return str(value).replace("|", "\\|")


def _markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]], runs: Sequence[Run]) -> str:
    # The error column only when something failed: otherwise it is an empty column as wide as its header.
    shown = [c for c in columns if c != "error" or any(r["error"] for r in rows)]
    best = {}
    for key in ("val_acc", "test_acc"):
        values = [float(r[key]) for r in rows if r["status"] == "ok" and r[key] != ""]
        best[key] = max(values) if values else None
    lines = [
        f"# Comparison of {len(rows)} runs",
        "",
        "| " + " | ".join(_MD_HEADERS.get(c, c) for c in shown) + " |",
        "|" + "|".join("--:" if c in _MD_HEADERS or c == "epochs" else "---" for c in shown) + "|",
    ]
    for r in rows:
        cells = []
        for c in shown:
            text = _cell(c, r[c])
            if c in best and r[c] != "" and r["status"] == "ok" and float(r[c]) == best[c] and len(rows) > 1:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        notes.append(f"{len(failed)} of {len(rows)} runs did not finish: " + ", ".join(
            f"{r['run']} ({r['status']})" for r in failed) + ".")
    shared = _shared_settings(runs)
    if shared:
        notes.append("Shared by every run: " + ", ".join(f"{k}={v}" for k, v in shared.items()) + ".")
    notes.append("Accuracies are of the weights each run evaluated (`evaluate=`); best in bold. "
                 "Train time and images/s include the per-epoch validation.")
    return "\n".join([*lines, "", *notes, "", "![comparison](comparison.png)", ""])


def _shared_settings(runs: Sequence[Run]) -> dict[str, str]:
    """Settings every run used alike (from each run's resolved ``config.yaml``): what makes rows comparable."""
    configs = [OmegaConf.load(r.path / "config.yaml") for r in runs if (r.path / "config.yaml").exists()]
    out = {}
    for key in ("seed", "evaluate", "backbone.name", "data.source", "trainer.max_epochs"):
        values = {str(OmegaConf.select(c, key)) for c in configs}
        if len(values) == 1:
            out[key] = values.pop()
    return out


def _plot(path: Path, rows: Sequence[dict[str, Any]], runs: Sequence[Run], swept: Sequence[str]) -> None:
    # Figure without pyplot: no global backend state, works headless and inside any process.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_epochs, ax_params, ax_time = fig.subplots(1, 3)
    ok = [(i, r) for i, r in enumerate(rows) if r["status"] == "ok"]
    test = bool(ok) and all(r["test_acc"] != "" for _, r in ok)
    acc_key, acc_name = ("test_acc", "test top-1") if test else ("val_acc", "val top-1")
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for i, (row, run) in enumerate(zip(rows, runs)):
        if run.val_acc_by_epoch:
            epochs, accs = zip(*run.val_acc_by_epoch)
            ax_epochs.plot(epochs, [100 * a for a in accs], marker="o", ms=3, color=colors[i],
                           label=_label(row, swept), linestyle="-" if row["status"] == "ok" else ":")
    for ax, key, xlabel in ((ax_params, "trainable_params", "trainable parameters"),
                            (ax_time, "train_time_s", "train time (s)")):
        for i, r in ok:
            if r[key] == "" or r[acc_key] == "":
                continue
            x, y = float(r[key]), 100 * float(r[acc_key])
            ax.scatter([x], [y], color=colors[i])
            ax.annotate(_label(r, swept), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final {acc_name} (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.15)  # room for the labels of the outermost points
    if any(r["trainable_params"] not in ("", 0) for _, r in ok):
        ax_params.set_xscale("log")
    ax_epochs.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_epochs.set_xlabel("epoch")
    ax_epochs.set_ylabel("val top-1 (%)")
    ax_epochs.set_title("validation accuracy per epoch")
    ax_params.set_title(f"{acc_name} vs trainable parameters")
    ax_time.set_title(f"{acc_name} vs train time")
    ax_epochs.grid(alpha=0.3)
    if ax_epochs.lines:
        ax_epochs.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def write_report(root: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``root``.

    Returns:
        The paths written, by kind (``png`` is missing where matplotlib is not installed).
    """
    root = Path(root).expanduser()
    runs = collect_runs(root)
    columns, rows = report_rows(runs)
    out = {"csv": root / "comparison.csv", "md": root / "comparison.md", "png": root / "comparison.png"}
    out["csv"].write_text(_csv_text(columns, rows))
    out["md"].write_text(_markdown(columns, rows, runs))
    try:
        _plot(out["png"], rows, runs, swept_keys(runs))
    except ImportError:
        log.warning("matplotlib is not installed: comparison.png not written")
        del out["png"]
    return out


class CompareCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): the comparison once a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            out = write_report(sweep_dir)
        except Exception as e:  # the runs are done and saved; a broken report must not read as a failed sweep
            log.error(f"no comparison ({first_line(e)}); retry with: python -m finetune.compare {sweep_dir}")
            return
        print(out["md"].read_text(), flush=True)
        print("comparison written: " + ", ".join(str(p) for p in out.values()), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.compare DIR``: rebuild the comparison from the run directories under DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune.compare", description=main.__doc__)
    parser.add_argument("dir", help="a sweep directory (multirun/DATE/TIME) or any folder of run directories")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.dir)
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out["md"].read_text())
    print("written: " + ", ".join(str(p) for p in out.values()))


if __name__ == "__main__":
    main()
