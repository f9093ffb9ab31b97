"""``python -m finetune.shard data=SOURCE [data.KEY=VALUE ...] out=DIR [shard.maxcount=N] [shard.maxsize=BYTES]``.

Writes the train, val and test splits of any listed source as WebDataset tar shards
(``DIR/train-000000.tar``, ..., ``val-*``, ``test-*``, by webdataset's ``ShardWriter``) and
``DIR/classes.json``, then prints the ``data=webdataset ...`` overrides that train from them.
Each sample is ``KEY.EXT`` (the image file's own bytes, not re-encoded; PNG for sources held
in memory, such as digits) and ``KEY.cls`` (the class index). The splits are the source's
own, drawn with ``seed`` as a run would draw them, after the same scan for unreadable images
(``data.on_bad_image``) and duplicates (``data.on_duplicate``). The input is only read; ``DIR``
must be new or empty, and is filled only when every shard is written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finetune.errors import FineTuneError

__all__ = ["main", "shard_source", "write_split"]

_OWN = ("out", "shard.maxcount", "shard.maxsize")
_HELP = __doc__.split("\n\n")[0] + """

Options:
  out=DIR               where the shards go (new or empty)
  shard.maxcount=10000  samples per shard at most (webdataset ShardWriter's maxcount)
  shard.maxsize=3e9     bytes per shard at most (ShardWriter's maxsize)
  data=... seed=...     the source and its splits, as for a run (python -m finetune --help)

Example:
  python -m finetune.shard data=folder data.root=~/photos out=~/shards
  then train with the data=webdataset line it prints (docs/data.md, "Sharded datasets")
"""


def _encoded(item: Any) -> tuple[str, bytes]:
    """(suffix, bytes) of an item: a file's own bytes, or an array encoded as PNG (lossless)."""
    if isinstance(item, np.ndarray):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(item).save(buf, format="PNG")
        return "png", buf.getvalue()
    path = Path(item)
    return path.suffix.lower().lstrip("."), path.read_bytes()


def write_split(split: Any, pattern: str, maxcount: int, maxsize: float, prefix: str, seed: int = 0) -> int:
    """Write ``split``'s items and labels, in a seeded shuffled order, to shards named ``pattern % n``;
    returns the number of shards."""
    import webdataset as wds

    writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0)
    # Listings are often sorted by class: in that order a shard would hold one class, and a
    # shuffle buffer smaller than a class could not mix them again.
    order = np.random.default_rng(seed).permutation(len(split))
    try:
        for i, j in enumerate(order):
            suffix, data = _encoded(split.items[j])
            label = split.labels[j]
            writer.write({"__key__": f"{prefix}_{i:08d}", suffix: data, "cls": int(label)})
        return int(writer.shard)
    finally:
        writer.close()


def _pattern(out: Path, split: str, shards: int) -> str:
    return str(out / (f"{split}-000000.tar" if shards == 1 else f"{split}-{{000000..{shards - 1:06d}}}.tar"))


def shard_source(source: Any, out: str | os.PathLike[str], seed: int = 0, maxcount: int = 10000,
                 maxsize: float = 3e9) -> dict[str, Any]:
    """Write ``source``'s splits as shards in ``out``; returns what ``classes.json`` records."""
    from finetune.data import ImageDataModule

    if maxcount < 1 or maxsize < 1:
        raise FineTuneError(f"shard.maxcount and shard.maxsize must be at least 1, got {maxcount} and {maxsize}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FineTuneError(f"out '{out}' is not an empty folder: shards are never written over others")
    if getattr(source, "streams", False):
        raise FineTuneError(f"data={source.source} is shards already")
    data = ImageDataModule(source, seed=seed).data  # scanned and checked for duplicates, as a run's
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for name, split in data.splits.items():
            shards = write_split(split, str(tmp / f"{name}-%06d.tar"), maxcount, maxsize, name, seed)
            splits[name] = {"samples": len(split), "shards": shards, "urls": _pattern(out, name, shards)}
        record = {"classes": data.classes, "class_to_idx": {c: i for i, c in enumerate(data.classes)},
                  "source": data.name, "seed": seed, "splits": splits}
        (tmp / "classes.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above): the finished folder takes its place
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def overrides(record: dict[str, Any]) -> str:
    """The ``data=webdataset`` overrides that train from the shards ``record`` describes."""
    keys = {"train": "data.urls", "val": "data.val_urls", "test": "data.test_urls"}
    return " ".join(["data=webdataset"] + [f"{keys[k]}='{v['urls']}'" for k, v in record["splits"].items()])


def _shard(args: list[str]) -> None:
    from omegaconf import OmegaConf

    from finetune.config import compose
    from finetune.data.sources import build_source

    own = {a.partition("=")[0]: a.partition("=")[2] for a in args if a.partition("=")[0] in _OWN}
    if not own.get("out"):
        raise FineTuneError("out is not set; pass out=DIR (a new or empty folder for the shards)")
    try:
        maxcount, maxsize = int(own.get("shard.maxcount", 10000)), float(own.get("shard.maxsize", 3e9))
    except ValueError:
        raise FineTuneError("shard.maxcount must be an integer and shard.maxsize a number of bytes") from None
    cfg = compose([a for a in args if a.partition("=")[0] not in _OWN])
    fields = OmegaConf.to_container(cfg.data, resolve=True)
    source = build_source(fields.pop("source"), **fields)  # type: ignore[union-attr,arg-type]
    record = shard_source(source, own["out"], seed=int(cfg.seed), maxcount=maxcount, maxsize=maxsize)
    for name, s in record["splits"].items():
        print(f"{name:<5} {s['samples']:>8} samples in {s['shards']} shard(s)")
    print(f"classes.json: {len(record['classes'])} classes; train from the shards with:")
    print(f"  python -m finetune {overrides(record)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m finetune.shard``: one ``error:`` line and exit code 2 on bad input."""
    from finetune.errors import run_command
    from finetune.help import asked_for_help

    args = sys.argv[1:] if argv is None else list(argv)
    if asked_for_help(args):
        print(_HELP)
        return
    run_command(_shard, args)


if __name__ == "__main__":
    main()
