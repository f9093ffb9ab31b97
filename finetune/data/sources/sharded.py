"""``data=webdataset``: images and integer labels streamed from WebDataset tar shards.

Each sample of a shard is an encoded image (``.jpg``, ``.png``, ...) and a ``.cls`` member
holding its class index; ``classes.json`` beside the shards names the classes
(``python -m finetune.shard`` writes both from any other source). The shards are not listed
image by image: :class:`finetune.data.StreamingDataModule` streams them, and this source only
reads their tar headers for the sizes and class counts (:mod:`finetune.data.shard_index`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from finetune.data.shard_index import ShardSplit, index_shard
from finetune.data.sources.base import DataSplits, Source, register
from finetune.errors import FineTuneError

__all__ = ["WebDataset", "expand_urls", "read_classes"]


def expand_urls(pattern: str, what: str) -> list[str]:
    """webdataset's brace expansion (``train-{000000..000009}.tar``; ``::`` joins patterns), each shard checked."""
    from webdataset.shardlists import expand_urls as wds_expand

    urls = [str(Path(u).expanduser()) for u in wds_expand(pattern)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FineTuneError(f"{what}: shard '{missing[0]}' does not exist ({len(missing)} of {len(urls)} missing; "
                            "only local shards can be streamed)")
    return urls


def read_classes(path: Path) -> list[str]:
    """Class names from ``classes.json``: ``{"classes": [...]}`` (as runs and the shard command write it) or a list."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FineTuneError(f"no class names: '{path}' does not exist (data.classes_file; "
                            "python -m finetune.shard writes it beside the shards)") from None
    except (OSError, ValueError) as e:
        raise FineTuneError(f"cannot read class names from '{path}': {e}") from None
    names = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise FineTuneError(f"'{path}' must hold {{\"classes\": [at least 2 names]}}")
    return names


@register("webdataset")
@dataclass
class WebDataset(Source):
    """Tar shards streamed by webdataset, shuffled through a buffer, split over DDP ranks and loader workers.

    Attributes:
        urls: the train shards, in webdataset's brace notation (required).
        val_urls, test_urls: shards of their own for val and test; without ``val_urls``, a
            ``val_fraction`` of the train shards' samples is held out by a hash of (seed, key):
            the same samples on every rank and worker, not stratified.
        classes_file: the class names (None: ``classes.json`` beside the first train shard).
        shuffle_buffer: webdataset's ``shuffle(n)`` buffer of train samples (0: shard order).
    """

    source: str = "webdataset"
    urls: Optional[str] = None
    val_urls: Optional[str] = None
    test_urls: Optional[str] = None
    val_fraction: float = 0.1
    classes_file: Optional[str] = None
    shuffle_buffer: int = 1000

    streams: ClassVar[bool] = True  # fed by StreamingDataModule, not listed

    def load(self, seed: int) -> DataSplits:
        raise FineTuneError("data=webdataset streams its shards: finetune.data.StreamingDataModule reads it "
                            "(finetune.builders.build_datamodule picks it), not ImageDataModule")

    def index(self, seed: int) -> DataSplits:
        """The splits as :class:`ShardSplit` (sizes and labels from the tar headers), with notes for the summary."""
        if not self.urls:
            raise FineTuneError("data.urls is not set; pass data.urls='DIR/train-{000000..000009}.tar'")
        if self.shuffle_buffer < 0:
            raise FineTuneError(f"data.shuffle_buffer must be 0 or more, got {self.shuffle_buffer}")
        if not 0 <= self.val_fraction < 1:
            raise FineTuneError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        start = time.perf_counter()
        train_urls = expand_urls(self.urls, "data.urls")
        classes_file = Path(self.classes_file).expanduser() if self.classes_file else \
            Path(train_urls[0]).parent / "classes.json"
        classes = read_classes(classes_file)
        fraction = 0.0 if self.val_urls else self.val_fraction
        train_shards = [index_shard(u, len(classes), fraction, seed) for u in train_urls]
        splits = {"train": ShardSplit(train_shards, "rest" if fraction else "all", fraction, seed)}
        notes = []
        if self.val_urls:
            val = [index_shard(u, len(classes), 0.0, seed) for u in expand_urls(self.val_urls, "data.val_urls")]
            splits["val"] = ShardSplit(val)
        elif fraction:
            splits["val"] = ShardSplit(train_shards, "held", fraction, seed)
            notes.append(f"val: {fraction:g} of the train shards' samples held out by key hash (not stratified)")
        else:
            raise FineTuneError("data=webdataset needs val samples: pass data.val_urls=... or data.val_fraction > 0")
        if self.test_urls:
            test = [index_shard(u, len(classes), 0.0, seed) for u in expand_urls(self.test_urls, "data.test_urls")]
            splits["test"] = ShardSplit(test)
        for name, split in splits.items():
            if not len(split):
                raise FineTuneError(f"data=webdataset: the {name} split has no samples")
        n_shards = len({u for s in splits.values() for u in s.urls})
        notes.append(f"streamed from {n_shards} shard(s); sizes and class counts from their tar headers "
                     f"({time.perf_counter() - start:.1f} s); duplicates across splits not checked")
        return DataSplits(f"webdataset:{self.urls}", classes, splits, notes)
