"""One table from several ``+recipe=compare_all`` sweeps: test top-1 per variant and dataset.

``python benchmarks/compare_all_table.py digits=DIR photos=DIR ...`` prints a Markdown table
built from each sweep's ``comparison.csv`` (val top-1 where a dataset has no test split), with the
trainable parameters and train time of the first sweep named. Not peak memory: a sweep's runs share one
process, whose peak only grows; ``benchmarks/freeze_cost.py`` measures each strategy's training memory.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _rows(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / "comparison.csv").open(newline="") as f:
        return {row["variant"]: row for row in csv.DictReader(f)}


def _pct(row: dict[str, str] | None) -> str:
    if row is None or row.get("status") != "ok":
        return "-"
    value = row["test_acc"] or row["val_acc"]
    return f"{100 * float(value):.2f}%"


def main(argv: list[str]) -> None:
    sweeps = {name: _rows(Path(path)) for name, _, path in (a.partition("=") for a in argv)}
    first = next(iter(sweeps.values()))
    names = list(sweeps)
    print("| variant | " + " | ".join(f"{n} test top-1" for n in names)
          + f" | trainable params | {names[0]} train s |")
    print("|---|" + "--:|" * (len(names) + 2))
    for variant in first:
        row = first[variant]
        best = [_pct(sweeps[n].get(variant)) for n in names]
        print(f"| {variant} | " + " | ".join(best)
              + f" | {int(row['trainable_params']):,} | {float(row['train_time_s']):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
