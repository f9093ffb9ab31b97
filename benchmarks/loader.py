"""Does the DataLoader keep up with training? Loader images/s against training-step images/s.

    python benchmarks/loader.py [--images 240] [--batch-size 16] [--workers 2]

A folder of photo crops saved as JPEG files (decoded from disk every epoch, like a user's
folder), tf_efficientnet_lite0 at 224 px, the train pipeline of ``data=folder`` (random resized
crop, flip, normalize). Measured side by side in one run: the loader alone (no model) with the
default workers of ``data=folder`` (``finetune.data.sources.Folder``) and with 0 workers, then
training steps of ``freeze=none`` and ``freeze=head_only`` on in-memory batches (no loader). Prints the ratios
loader / step; the loader keeps up when the ratio is above 1 (target: 3x).

The same JPEGs are also written as WebDataset shards (``finetune.shard``, the files' own bytes) and
streamed by ``data=webdataset`` with the same train transforms and workers, measured alternately with
the folder source (``--repeats`` rounds each; the best round counts, as timeit does): the ratio
shards / folder says what streaming costs on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def _write_jpegs(root: Path, images: int) -> None:
    from PIL import Image

    from finetune.data.photos import write_photo_folder

    png_root = root.parent / "png"
    write_photo_folder(png_root, per_class=max(1, images // 5), size=320, seed=0)
    for png in png_root.rglob("*.png"):
        out = root / png.relative_to(png_root).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(out, quality=90)


def loader_rate(root: Path, workers: int, batch_size: int, epochs: int) -> float:
    from finetune import ImageDataModule

    dm = ImageDataModule("folder", root=root, backbone="tf_efficientnet_lite0", batch_size=batch_size,
                         num_workers=workers, val_fraction=0.2)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is paid once per run (persistent workers), not per epoch
    start, seen = time.perf_counter(), 0
    for x, _ in it:
        seen += len(x)
    for _ in range(epochs - 1):
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def shard_rate(splits: dict, workers: int, batch_size: int, epochs: int) -> float:
    """As :func:`loader_rate`, for the shards ``finetune.shard`` wrote (``splits``: its classes.json's)."""
    from finetune.data import StreamingDataModule

    dm = StreamingDataModule("webdataset", urls=splits["train"]["urls"], val_urls=splits["val"]["urls"],
                             backbone="tf_efficientnet_lite0", batch_size=batch_size, num_workers=workers)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # timed from the same point as loader_rate: after the first batch
    start, seen = time.perf_counter(), 0
    for x, _ in it:
        seen += len(x)
    for epoch in range(1, epochs):
        loader._epoch = lambda epoch=epoch: epoch  # each epoch its own shuffle, as Lightning's epochs
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def step_rate(freeze: str, batch_size: int, steps: int) -> float:
    import torch

    from finetune import FineTuneModule
    from finetune.optim import param_groups

    m = FineTuneModule("tf_efficientnet_lite0", num_classes=5, freeze=freeze, channels_last=True)
    m.train()
    opt = torch.optim.AdamW(param_groups(m.backbone, m.head, m.freeze_plan, 1e-3, 0.3, 0.01))
    x = torch.randn(batch_size, 3, 224, 224)
    y = torch.randint(0, 5, (batch_size,))

    def step() -> None:
        loss = m.criterion(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    from finetune.data.sources import Folder

    default_workers = Folder().num_workers
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=default_workers)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = p.parse_args()

    root = Path(tempfile.mkdtemp()) / "jpg"
    _write_jpegs(root, args.images)
    from finetune.data.sources import Folder
    from finetune.shard import shard_source

    shards = root.parent / "shards"
    train_images = len(Folder(root=str(root)).load(0).splits["train"])
    splits = shard_source(Folder(root=str(root)), shards, maxcount=-(-train_images // 4))["splits"]  # 4 train shards
    folder_runs, shard_runs = [], []
    for _ in range(args.repeats):
        folder_runs.append(loader_rate(root, args.workers, args.batch_size, args.epochs))
        shard_runs.append(shard_rate(splits, args.workers, args.batch_size, args.epochs))
    results = {
        f"loader, {args.workers} workers": max(folder_runs),
        f"shards, {args.workers} workers": max(shard_runs),
        "loader, 0 workers": loader_rate(root, 0, args.batch_size, args.epochs),
        "train step, freeze=none": step_rate("none", args.batch_size, args.steps),
        "train step, freeze=head_only": step_rate("head_only", args.batch_size, args.steps),
    }
    print(f"tf_efficientnet_lite0, 224 px, batch {args.batch_size}, {platform.machine()}, "
          f"{len(list(root.rglob('*.jpg')))} JPEG files of 320 px")
    for k, v in results.items():
        print(f"{k:<32} {v:8.1f} images/s")
    loader = results[f"loader, {args.workers} workers"]
    ratios = {f"loader / {k.split(', ')[1]}": loader / v for k, v in results.items() if k.startswith("train")}
    ratios["shards / folder"] = results[f"shards, {args.workers} workers"] / loader
    for k, v in ratios.items():
        print(f"{k:<32} {v:8.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "images_per_s": results, "ratios": ratios,
                                    "rounds": {"folder": folder_runs, "shards": shard_runs}}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
