"""The comparison as text and picture: ``comparison.csv``, ``comparison.md`` and ``comparison.png``.

Rendering only: rows come from :func:`finetune.comparison.runs.report_rows`, nothing here reads a run
directory, so the same rows always render the same files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from finetune.comparison.runs import Run

__all__ = ["csv_text", "markdown", "plot"]

Row = Mapping[str, Any]

_MD_HEADERS = {
    "val_acc": "val top-1", "val_top5": "val top-5", "test_acc": "test top-1", "test_top5": "test top-5",
    "trainable_params": "trainable params", "train_time_s": "train time s", "train_images_per_s": "train images/s",
    "peak_memory_mb": "peak RSS MiB", "peak_gpu_memory_mb": "peak GPU MiB", "pruned_at_epoch": "pruned at epoch",
}


def csv_text(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The rows as CSV, values as in ``metrics.json`` (fractions, not percentages)."""
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


def markdown(columns: Sequence[str], rows: Sequence[Row], shared: Mapping[str, str], extra: Sequence[str] = ()) -> str:
    """A Markdown table, best accuracies in bold, with notes on failed runs, on ``shared`` settings, and ``extra``."""
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
    pruned = [r for r in rows if r.get("pruned_at_epoch", "") != ""]
    if pruned:
        notes.append(f"{len(pruned)} of {len(rows)} runs were pruned (stopped early as hopeless, then evaluated): "
                     + ", ".join(f"{r['run']} after epoch {r['pruned_at_epoch']}" for r in pruned) + ".")
    if shared:
        notes.append("Shared by every run: " + ", ".join(f"{k}={v}" for k, v in shared.items()) + ".")
    notes += list(extra)
    notes.append("Accuracies are of the weights each run evaluated (`evaluate=`); best in bold. "
                 "Train time and images/s include the per-epoch validation.")
    return "\n".join([*lines, "", *notes, "", "![comparison](comparison.png)", ""])


def _label(row: Row, swept: Sequence[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in swept if row[k] != "") or f"run {row['run']}"


def _line(row: Row) -> str:
    """Solid: a run that trained to its end; dashed: one pruned early; dotted: one that did not finish."""
    if row["status"] != "ok":
        return ":"
    return "--" if row.get("pruned_at_epoch", "") != "" else "-"


def plot(path: Path, rows: Sequence[Row], runs: Sequence[Run], swept: Sequence[str]) -> None:
    """Val accuracy per epoch, and final accuracy against trainable parameters and train time.

    Raises:
        ImportError: matplotlib is not installed.
    """
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
                           label=_label(row, swept), linestyle=_line(row))
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
