"""The source registry, the fields every source shares, and the splitting helpers.

A source returns :class:`DataSplits`: class names plus, per split, items (decoded uint8
RGB arrays, or image file paths read lazily) and integer labels. Splits are stratified and
seeded, so every run of a sweep sees the same images.

A source is a dataclass: its fields are its knobs and their defaults, and the class is stored
in Hydra's ConfigStore as option ``data=NAME`` (see :mod:`finetune.config`), so the same
values serve the CLI and the Python API. Field types are the ones OmegaConf checks (``int``,
``float``, ``bool``, ``str``, ``Optional``/``List`` from :mod:`typing`). Adding one is one file::

    @register("my_source")
    @dataclass
    class MySource(Source):
        source: str = "my_source"
        root: Optional[str] = None
        val_fraction: float = 0.2

        def load(self, seed: int) -> DataSplits:
            everything = ...  # a Split of all labelled images
            train, val = hold_out(everything, self.val_fraction, seed, "validation")
            return DataSplits("my_source", classes, {"train": train, "val": val})

Nothing here imports a source module; ``finetune.data.sources`` imports them all.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from finetune.errors import FineTuneError
from finetune.registry import registrar

__all__ = [
    "SOURCES", "DataSplits", "Source", "Split", "build_source", "check_fields", "hold_out", "register",
    "per_class_subset", "rgb_split", "stratified_split", "train_val_test",
]


@dataclass
class Split:
    """Items (arrays or paths) and their integer labels."""

    items: list[Any]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split([self.items[i] for i in idx], self.labels[idx])

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class DataSplits:
    """Class names, splits by name (``train``, ``val``, optional ``test``) and notes for the summary."""

    name: str
    classes: list[str]
    splits: dict[str, Split]
    notes: list[str] = field(default_factory=list)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, split off) with ``fraction`` of each class split off."""
    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        raise FineTuneError(f"cannot split off a {what} set: some class has only 1 image (need at least 2 per class)")
    from sklearn.model_selection import train_test_split  # a second to import; only splitting needs it

    try:
        kept, split = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as e:
        raise FineTuneError(f"cannot split off a {what} set of fraction {fraction}: {e}") from None
    return np.sort(kept), np.sort(split)


def hold_out(split: Split, fraction: float, seed: int, what: str = "validation") -> tuple[Split, Split]:
    """``split`` as (kept, held out), with a stratified, seeded ``fraction`` of each class held out."""
    kept, held = stratified_split(split.labels, fraction, seed, what)
    return split.subset(kept), split.subset(held)


def per_class_subset(split: Split, n: int | None, seed: int, num_classes: int) -> tuple[Split, list[str]]:
    """A seeded random ``n`` images of each class of ``split`` (a smaller ``n`` picks a subset of a larger one),
    and the summary's note; ``None``: all of it (``data.train_per_class``).

    Raises:
        FineTuneError: ``n`` below 1.
    """
    if n is None:
        return split, []
    if n < 1:
        raise FineTuneError(f"train_per_class must be at least 1 (or null for all), got {n}")
    order = np.random.default_rng(seed).permutation(len(split))
    per_class = [order[split.labels[order] == c][:n] for c in range(num_classes)]
    return split.subset(np.sort(np.concatenate(per_class))), [f"train: {n} image(s) per class kept (train_per_class)"]


def train_val_test(everything: Split, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Stratified test, then val, held out of one pool; both fractions are of the whole pool."""
    rest, test = hold_out(everything, test_fraction, seed, "test")
    train, val = hold_out(rest, val_fraction / (1 - test_fraction), seed, "validation")
    return {"train": train, "val": val, **({"test": test} if len(test) else {})}


def rgb_split(gray: np.ndarray, labels: np.ndarray) -> Split:
    """``(N, H, W)`` uint8 gray images repeated into RGB, as one contiguous block.

    Items are views into the block: tens of thousands of separate arrays would be slower to build.
    """
    return Split(list(np.repeat(gray[..., None], 3, axis=-1)), labels)


@dataclass
class Source:
    """Where labelled images come from, and how they are fed: the fields every source shares.

    The defaults here are the generic ones (timm's); a source overrides those that differ for
    its images, saying why.

    Attributes:
        source: the registered name (``data=NAME``).
        image_size: input size in pixels (square); None: the backbone's pretrained input size.
        scale, ratio: the train-time random resized crop (timm's names and defaults).
        hflip: probability of a horizontal flip at train time.
        batch_size: batch size for every split.
        num_workers: DataLoader worker processes.
        sampler: None (shuffle), or ``weighted``: draw train images with replacement, each with
            weight 1 / (images of its class), so every class is drawn about equally often.
        on_bad_image: ``error``: an unreadable image file stops the run before training, named;
            ``skip``: such files are left out, counted in the notes and listed in ``bad_images.txt``.
            A file that fails to decode later, while training, stops the run (``error``) or is
            replaced by the next readable image of its split (``skip``).
        on_duplicate: val/test images byte-identical to images of an earlier split (train, then
            val): ``warn`` keeps them with a note, ``error`` stops, naming the first, ``drop``
            leaves them out of val/test (never out of train).
        mean, std, interpolation, crop_pct: preprocessing; None: the backbone's pretrained config.
    """

    source: str
    image_size: Optional[int] = None
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    batch_size: int = 32
    num_workers: int = 2
    sampler: Optional[str] = None
    on_bad_image: str = "error"
    on_duplicate: str = "warn"
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None

    def __post_init__(self) -> None:
        # Python callers pass pathlib.Path; the fields stay plain strings, as OmegaConf types them.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))

    def load(self, seed: int) -> DataSplits:
        """The labelled images, split with ``seed`` (the same seed gives the same splits)."""
        raise NotImplementedError(f"{type(self).__name__} does not load data")


SOURCES: dict[str, type[Source]] = {}

# Class decorator: make a Source dataclass available as data=NAME.
register = registrar(SOURCES, "source")


def check_fields(cls: type[Source], kwargs: dict[str, Any], what: str | None = None) -> None:
    """A one-line error naming any key of ``kwargs`` that ``cls`` has no field for (not a TypeError)."""
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    extra = sorted(set(kwargs) - set(known) - {"source"})
    if extra:
        what = what or f"data={cls.__dataclass_fields__['source'].default}"
        raise FineTuneError(f"{what} has no option(s) {', '.join(extra)}; it takes {', '.join(known)}")


def build_source(name: str, /, **kwargs: Any) -> Source:
    """The source registered as ``name``, with its own fields set from ``kwargs``."""
    if name not in SOURCES:
        raise FineTuneError(f"unknown data source '{name}'; choose one of {', '.join(sorted(SOURCES))}")
    cls = SOURCES[name]
    check_fields(cls, kwargs)
    kwargs.pop("source", None)
    return cls(**kwargs)
