"""Runs side by side: ``comparison.csv``, ``comparison.md`` and ``comparison.png`` in a sweep directory.

``python -m finetune --multirun ...`` writes them when the sweep ends, through :class:`CompareCallback`
(a Hydra callback, so any launcher); ``python -m finetune.compare DIR`` rebuilds them from the run
directories under DIR, e.g. after adding runs or after an interrupted sweep. Everything is read from
the run directories (``.hydra/overrides.yaml``, ``metrics.json``, ``epochs.csv``), so both give the same
files. Reading them is :mod:`finetune.comparison.runs`, writing the files :mod:`finetune.comparison.render`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.comparison.render import csv_text, markdown, plot
from finetune.comparison.runs import (
    METRIC_COLUMNS, Run, collect_runs, first_line, report_rows, shared_settings, swept_keys, write_failure,
)
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


def _best_run(root: Path, runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> list[str]:
    """A note naming the run with the best val accuracy and the checkpoint it evaluated: a search's answer."""
    done = [(run, row) for run, row in zip(runs, rows) if row["status"] == "ok" and row["val_acc"] != ""]
    if len(done) < 2:
        return []
    run, row = max(done, key=lambda pair: float(pair[1]["val_acc"]))
    best = run.metrics.get("best_checkpoint") if run.metrics.get("evaluated") == "best" else None
    ckpt = Path(best) if best else run.path / "checkpoints" / "last.ckpt"
    shown = ckpt.relative_to(root) if ckpt.is_relative_to(root) else ckpt
    return [f"Best val accuracy: run {run.name} ({100 * float(row['val_acc']):.2f}%), checkpoint `{shown}`."]


def write_report(root: str | Path, soup: bool = False) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``root``.

    Args:
        soup: also make a greedy soup of the runs (:mod:`finetune.soup`) and add its row.

    Returns:
        The paths written, by kind (``png`` is missing where matplotlib is not installed).
    """
    root = Path(root).expanduser()
    runs = collect_runs(root)
    columns, rows = report_rows(runs)
    notes: list[str] = []
    if soup:
        from finetune.soup import soup_row

        row, notes = soup_row(root, runs, columns)
        rows.append(row)
    notes = [*_best_run(root, runs, rows), *notes]
    out = {"csv": root / "comparison.csv", "md": root / "comparison.md", "png": root / "comparison.png"}
    out["csv"].write_text(csv_text(columns, rows))
    out["md"].write_text(markdown(columns, rows, shared_settings(runs), notes))
    try:
        plot(out["png"], rows, runs, swept_keys(runs))
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

    parser = argparse.ArgumentParser(
        prog="python -m finetune.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="python -m finetune.compare: rebuild comparison.csv, comparison.md and comparison.png\n"
                    "from the run directories under DIR (a sweep writes them itself when it ends).",
        epilog="example:\n  python -m finetune.compare multirun/2026-01-01/12-00-00\n"
               "  python -m finetune.compare multirun/2026-01-01/12-00-00 --soup")
    parser.add_argument("dir", help="a sweep directory (multirun/DATE/TIME) or any folder of run directories")
    parser.add_argument("--soup", action="store_true",
                        help="also average the runs that share a start, greedily by val accuracy (Wortsman et al. "
                             "2022), into soup.ckpt, and add a soup row")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.dir, soup=args.soup)
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out["md"].read_text())
    print("written: " + ", ".join(str(p) for p in out.values()))


if __name__ == "__main__":
    main()
