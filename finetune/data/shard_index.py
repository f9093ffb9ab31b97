"""What a set of WebDataset tar shards holds, read from their tar headers: samples, labels, splits.

A streamed split cannot be listed item by item, but its size, labels and per-class counts are
still known before training: each local shard's tar headers are read once (the small ``.cls``
members too, not the images), grouping members into samples exactly as webdataset's
``group_by_keys`` does. Those counts let the summary report real sizes, let
``loss.class_weights=balanced`` work, and give every DDP rank the same number of batches
(:func:`worker_quotas`).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.images import IMG_EXTENSIONS
from finetune.errors import FineTuneError

__all__ = ["IMAGE_SUFFIXES", "Shard", "ShardSplit", "held_out", "index_shard", "shard_plan", "worker_quotas"]

# webdataset's sample suffixes that hold an encoded image (lower case, as group_by_keys makes them).
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether sample ``key`` is in the held-out ``fraction`` (by a hash of seed and key: the same on every rank)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass
class Shard:
    """One tar shard: the labels of its samples, in tar order, and their keys' hold-out flags."""

    url: str
    labels: np.ndarray
    held: np.ndarray  # bool per sample: in the hash hold-out (data.val_fraction)


def _samples(path: Path) -> list[tuple[str, dict[str, bytes | None]]]:
    """``(key, {suffix: content or None})`` per sample; content is read for ``cls`` only."""
    out: list[tuple[str, dict[str, bytes | None]]] = []
    with tarfile.open(path, mode="r:") as tar:  # seekable: image members are skipped, not read
        for member in tar:
            if not member.isreg() or _META.match(member.name) or \
                    ("/" not in member.name and member.name.startswith("__") and member.name.endswith("__")):
                continue
            m = _KEY.match(member.name)
            if not m:
                continue
            key, suffix = m.group(1), m.group(2).lower()
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][suffix] = tar.extractfile(member).read() if suffix == "cls" else None  # type: ignore[union-attr]
    return out


def index_shard(url: str, num_classes: int, fraction: float, seed: int) -> Shard:
    """Read ``url``'s tar headers (and ``.cls`` members) into a :class:`Shard`; a sample without a
    label or an image, or with a label out of range, is refused naming the shard and key."""
    path = Path(url)
    if not path.is_file():
        raise FineTuneError(f"shard '{url}' does not exist (or is not a local file: only local shards are indexed)")
    try:
        samples = _samples(path)
    except (OSError, tarfile.TarError) as e:
        raise FineTuneError(f"cannot read shard '{url}' as a tar file: {e}") from None
    labels = np.empty(len(samples), dtype=np.int64)
    for i, (key, members) in enumerate(samples):
        if not any(s in members for s in IMAGE_SUFFIXES):
            raise FineTuneError(f"shard '{url}' sample '{key}' has no image ({', '.join(sorted(members))}); "
                                f"expected one of .{', .'.join(IMAGE_SUFFIXES[:4])}, ...")
        raw = members.get("cls")
        try:
            labels[i] = int((raw or b"").decode().strip())
        except ValueError:
            raise FineTuneError(f"shard '{url}' sample '{key}' has no integer .cls label") from None
        if not 0 <= labels[i] < num_classes:
            raise FineTuneError(f"shard '{url}' sample '{key}' has label {labels[i]}, not one of the "
                                f"{num_classes} classes of classes.json")
    held = np.asarray([held_out(k, fraction, seed) for k, _ in samples], dtype=bool)
    return Shard(url, labels, held)


@dataclass
class ShardSplit:
    """A streamed split: its shards, and which of their samples it keeps.

    ``keep``: ``all``, ``rest`` (not held out) or ``held`` (the hash hold-out of ``fraction``).
    Has the length, labels and class counts of a listed split, but no items to index.
    """

    shards: list[Shard]
    keep: str = "all"
    fraction: float = 0.0
    seed: int = 0
    _mask: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._mask = [s.held if self.keep == "held" else ~s.held if self.keep == "rest" else np.ones_like(s.held)
                      for s in self.shards]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    def counts(self) -> list[int]:
        """Samples this split keeps from each shard."""
        return [int(m.sum()) for m in self._mask]

    def keeps(self, key: str) -> bool:
        """Whether this split keeps sample ``key`` (the stream's filter, the same rule as the index's)."""
        return self.keep == "all" or held_out(key, self.fraction, self.seed) == (self.keep == "held")

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([s.labels[m] for s, m in zip(self.shards, self._mask)] or [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return sum(self.counts())

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    @property
    def items(self) -> Any:
        raise FineTuneError("this needs images listed one by one, and data=webdataset streams them from shards: "
                            "use the source the shards were made from (e.g. data=folder)")


def shard_plan(n_shards: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
    """Shard indices read by ``worker`` of ``rank``: webdataset's ``split_by_node`` then ``split_by_worker``."""
    return list(range(n_shards))[rank::world][worker::workers]


def worker_quotas(counts: list[int], batch_size: int, world: int, workers: int) -> tuple[list[list[int]], int]:
    """Batches each (rank, worker) may yield per epoch, so that every rank yields the same number.

    A worker batches its own shards' samples (the last batch may be short). Ranks whose shards hold
    more batches than the poorest rank stop early: their largest workers give up their last
    batches. Returns the quotas by rank and worker, and the samples dropped per epoch (0 when
    the shards divide evenly).
    """
    per_rank = []
    for r in range(world):
        samples = [sum(counts[i] for i in shard_plan(len(counts), r, world, w, workers)) for w in range(workers)]
        per_rank.append((samples, [-(-n // batch_size) for n in samples]))
    target = min(sum(b) for _, b in per_rank)
    quotas, dropped = [], 0
    for samples, batches in per_rank:
        quota = list(batches)
        while sum(quota) > target:
            quota[max(range(workers), key=lambda w: quota[w])] -= 1
        dropped += sum(samples) - sum(min(n, q * batch_size) for n, q in zip(samples, quota))
        quotas.append(quota)
    return quotas, dropped
