"""Byte-identical images across splits: a val or test image that is a copy of a train image scores too well.

Cheap first: files are grouped by size, arrays by shape, dtype and Python's hash of their
bytes (in memory already: no I/O), and only groups with members in two or more splits are
hashed with BLAKE2b (the file's bytes, or the array's). A file listed in two splits is the same bytes, so it is found too. The image of the
earliest split (train, then val, then test) is the original; its copies in later splits are
the duplicates, which ``on_duplicate=drop`` leaves out: train is never changed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import numpy as np

from finetune.data.sources import DataSplits, Split
from finetune.errors import FineTuneError

__all__ = ["ON_DUPLICATE", "Duplicate", "check_duplicates", "check_on_duplicate", "find_duplicates"]

ON_DUPLICATE = ("warn", "error", "drop")
_RANK = {"train": 0, "val": 1, "test": 2}


def check_on_duplicate(value: str) -> str:
    """``value`` if it is a known ``on_duplicate`` policy; else a one-line error."""
    if value not in ON_DUPLICATE:
        raise FineTuneError(f"on_duplicate must be one of {', '.join(ON_DUPLICATE)}, got '{value}'")
    return value


@dataclass(frozen=True)
class Duplicate:
    """Item ``index`` of ``split`` has the bytes of item ``same_index`` of the earlier ``same_split``."""

    split: str
    index: int
    same_split: str
    same_index: int
    path: str | None = None  # for file items
    same_path: str | None = None

    def __str__(self) -> str:
        def name(split: str, index: int, path: str | None) -> str:
            return f"{split} '{path}'" if path is not None else f"{split} image #{index}"

        return f"{name(self.split, self.index, self.path)} = {name(self.same_split, self.same_index, self.same_path)}"


def _coarse_key(item: Any) -> Hashable | None:
    """What two items must share to be identical: a file's size; an array's shape, dtype and a fast hash."""
    if isinstance(item, np.ndarray):
        return ("array", item.shape, item.dtype.str, hash(item.tobytes()))
    if isinstance(item, (str, os.PathLike)):
        try:
            return ("file", os.stat(item).st_size)
        except OSError:
            return None  # unreadable: the scan reports it, not this check
    return None


def _digest(item: Any) -> bytes | None:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(item, np.ndarray):
        h.update(np.ascontiguousarray(item))
        return h.digest()
    try:
        h.update(Path(item).read_bytes())
    except OSError:
        return None
    return h.digest()


def find_duplicates(splits: DataSplits) -> list[Duplicate]:
    """Every item of a later split whose bytes equal an item's of an earlier split, with that item."""
    names = sorted(splits.splits, key=lambda n: (_RANK.get(n, len(_RANK)), n))
    rank = {n: r for r, n in enumerate(names)}
    coarse: dict[Hashable, list[tuple[str, int]]] = {}
    for name in names:
        for i, item in enumerate(splits.splits[name].items):
            key = _coarse_key(item)
            if key is not None:
                coarse.setdefault(key, []).append((name, i))
    fine: dict[tuple[Hashable, bytes], list[tuple[str, int]]] = {}
    for key, members in coarse.items():
        if len({n for n, _ in members}) < 2:
            continue  # all in one split: copies within a split are not a leak
        for name, i in members:
            digest = _digest(splits.splits[name].items[i])
            if digest is not None:
                fine.setdefault((key, digest), []).append((name, i))
    found: list[Duplicate] = []
    for members in fine.values():
        first_split, first = min(members, key=lambda m: (rank[m[0]], m[1]))
        for name, i in members:
            if rank[name] > rank[first_split]:
                found.append(Duplicate(name, i, first_split, first, _path(splits.splits[name].items[i]),
                                       _path(splits.splits[first_split].items[first])))
    return sorted(found, key=lambda d: (rank[d.split], d.index))


def _path(item: Any) -> str | None:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def check_duplicates(splits: DataSplits, on_duplicate: str = "warn") -> tuple[DataSplits, list[Duplicate]]:
    """Find copies across splits and apply ``on_duplicate``.

    Args:
        splits: the splits to check (file and array items).
        on_duplicate: ``warn`` (a note with the count), ``error`` (raise, naming the first copy)
            or ``drop`` (leave the copies out of val/test, with a note).

    Returns:
        The splits (without the copies for ``drop``) and the copies found.
    """
    check_on_duplicate(on_duplicate)
    found = find_duplicates(splits)
    if not found:
        return splits, []
    n, first = len(found), found[0]
    if on_duplicate == "error":
        raise FineTuneError(
            f"{first.split} image is byte-identical to a {first.same_split} image: {first} ({n} such image(s) "
            "in val/test; data.on_duplicate=drop leaves them out, warn keeps them)"
        )
    if on_duplicate == "warn":
        note = (f"warning: {n} val/test image(s) are byte-identical to images of an earlier split (first: {first}); "
                "scores on them are optimistic (data.on_duplicate=drop leaves them out)")
        return DataSplits(splits.name, splits.classes, splits.splits, [*splits.notes, note]), found
    drop: dict[str, set[int]] = {}
    for d in found:
        drop.setdefault(d.split, set()).add(d.index)
    kept: dict[str, Split] = {}
    for name, s in splits.splits.items():
        gone = drop.get(name, set())
        if gone and len(gone) == len(s):
            raise FineTuneError(f"every image of the {name} split is a copy of one in an earlier split (first: {first})")
        kept[name] = s.subset(np.asarray([i for i in range(len(s)) if i not in gone], dtype=np.int64)) if gone else s
    note = f"left out {n} val/test image(s) byte-identical to images of an earlier split (data.on_duplicate=drop)"
    return DataSplits(splits.name, splits.classes, kept, [*splits.notes, note]), found
