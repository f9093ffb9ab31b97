"""``data=csv``: images listed in a CSV with columns ``path,label`` and optional ``split``."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from finetune.data.sources.base import DataSplits, Source, Split, hold_out, register
from finetune.errors import FineTuneError

__all__ = ["CSV_SPLITS", "CsvListing", "csv_source"]

CSV_SPLITS = ("train", "val", "test")
_Entry = tuple[int, Path, str]  # (row number, image file, label)


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(row number, row)`` pairs; rows are numbered as a spreadsheet shows them (header = 1)."""
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark, which would otherwise stick to 'path'.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = []
            for row in reader:
                extra = [v for v in row.get(None) or [] if v.strip()]  # DictReader's place for fields past the header
                if extra:
                    raise FineTuneError(
                        f"CSV file '{path}' row {reader.line_num} has {len(header) + len(row[None])} fields, its header "
                        f"{len(header)} ({','.join(header)}): quote a value that holds a comma, e.g. \"red, fox\""
                    )
                if any((v or "").strip() for k, v in row.items() if k is not None):  # skip blank lines
                    rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FineTuneError(f"cannot read CSV '{path}': {e}") from None
    return header, rows


def _entries_by_split(path: Path) -> tuple[bool, dict[str, list[_Entry]]]:
    """Whether the CSV has a ``split`` column, and its rows by split; every listed file must exist."""
    header, rows = _read_rows(path)
    if not header:
        raise FineTuneError(f"CSV file '{path}' is empty; it needs a header row path,label[,split]")
    missing_cols = [c for c in ("path", "label") if c not in header]
    if missing_cols:
        raise FineTuneError(
            f"CSV file '{path}' lacks column(s) {', '.join(missing_cols)} (has: {', '.join(header)}); "
            "it needs path,label and optionally split"
        )
    if not rows:
        raise FineTuneError(f"CSV file '{path}' has a header but no rows")
    has_split = "split" in header
    by_split: dict[str, list[_Entry]] = {s: [] for s in CSV_SPLITS}
    missing: list[tuple[int, Path]] = []
    for n, row in rows:
        split = row.get("split", "") if has_split else "train"
        if split not in by_split:
            raise FineTuneError(f"CSV file '{path}' row {n}: split '{split}' is not one of train, val, test")
        if not row["path"] or not row["label"]:
            raise FineTuneError(f"CSV file '{path}' row {n}: empty {'path' if not row['path'] else 'label'}")
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            missing.append((n, file))
        by_split[split].append((n, file, row["label"]))
    if missing:
        n, file = missing[0]
        raise FineTuneError(
            f"CSV file '{path}' row {n}: image '{file}' does not exist "
            f"({len(missing)} of {len(rows)} listed images are missing)"
        )
    return has_split, by_split


@register("csv")
@dataclass
class CsvListing(Source):
    """Images listed in a CSV: columns ``path,label`` and optional ``split`` (train/val/test).

    Relative paths are relative to the CSV's folder. Classes are the sorted training labels.

    Attributes:
        path: the CSV file (required).
        val_fraction: without val rows, the stratified, seeded fraction of the training rows held out.
    """

    source: str = "csv"
    path: Optional[str] = None
    val_fraction: float = 0.2

    def load(self, seed: int) -> DataSplits:
        if self.path is None or str(self.path) == "":
            raise FineTuneError("data.path is not set; pass data.path=FILE.csv")
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise FineTuneError(f"CSV file '{path}' does not exist (data.path)")
        has_split, by_split = _entries_by_split(path)
        if not by_split["train"]:
            raise FineTuneError(f"CSV file '{path}' has no rows with split 'train'")
        classes = sorted({label for _, _, label in by_split["train"]})
        if len(classes) < 2:
            raise FineTuneError(f"CSV file '{path}' has {len(classes)} training class(es); need at least 2")
        index = {c: i for i, c in enumerate(classes)}
        for split in ("val", "test"):
            for n, _, label in by_split[split]:
                if label not in index:
                    raise FineTuneError(
                        f"CSV file '{path}' row {n}: {split} label '{label}' is not among the training classes"
                    )

        def to_split(entries: list[_Entry]) -> Split:
            return Split([f for _, f, _ in entries], np.asarray([index[lbl] for _, _, lbl in entries], np.int64))

        train = to_split(by_split["train"])
        notes: list[str] = []
        if by_split["val"]:
            splits = {"train": train, "val": to_split(by_split["val"])}
        else:
            kept, held = hold_out(train, self.val_fraction, seed)
            splits = {"train": kept, "val": held}
            if has_split:
                notes.append(f"no val rows in the CSV: held out val_fraction {self.val_fraction} of train")
        if by_split["test"]:
            splits["test"] = to_split(by_split["test"])
        # A file in two splits is usually a listing mistake, and it inflates val/test scores; but a
        # deliberate sanity check does it too, so it is reported rather than refused.
        seen: dict[Path, set[str]] = {}
        for split, entries in by_split.items():
            for _, file, _ in entries:
                seen.setdefault(file.resolve(), set()).add(split)
        shared = sum(len(s) > 1 for s in seen.values())
        if shared:
            notes.append(
                f"warning: {shared} file(s) appear in more than one split; val/test scores on them are optimistic"
            )
        return DataSplits(f"csv:{path}", classes, splits, notes)


def csv_source(path: str | os.PathLike[str] | None = None, *, seed: int = 0, **fields: Any) -> DataSplits:
    """``CsvListing(path=path, **fields).load(seed)``."""
    return CsvListing(path=path, **fields).load(seed)  # type: ignore[arg-type]
