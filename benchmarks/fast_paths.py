"""Fast paths against the plain alternatives, measured side by side in one run.

    python benchmarks/fast_paths.py [--steps 40] [--epochs 5] [--parts overhead,cached,photos,compile]

1. Overhead: FineTuneModule trained by Lightning's Trainer against a hand-written PyTorch loop
   with the same model, data, optimizer, schedule and number of steps (digits, lite0, 64 px,
   freeze=none). Ratio = Trainer time / loop time; target at most 1.10.
2. Cached features: ``head_only`` with ``augment=none`` on digits, one Trainer epoch at a time for
   ``--epochs`` epochs, uncached against cached (the first cached epoch includes extraction).
   Target: at least 20x per epoch after the first.
3. Time to accuracy on natural photographs: ``+recipe=auto`` on a folder of photo crops at 224 px
   (advice, training, evaluation) against one feature-extraction pass over the same images, and
   its val accuracy against a logistic-regression probe on the same frozen features and split.
4. ``compile=true`` (torch.compile, inductor) against eager: seconds per full fine-tuning step
   (lite0, ``freeze=none``, 128 px) and per inference batch, after warm-up; the first step's
   time, which includes compilation, is reported separately.

Each part runs in its own fresh process (one after another, in this one invocation), so one part's
warm caches and memory do not flatter the next. Writes ``results/fast_paths.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
         "enable_model_summary": False, "num_sanity_val_steps": 0}


def _digits(augment: str = "light"):  # noqa: ANN202
    from finetune import ImageDataModule

    return ImageDataModule("digits", backbone="tf_efficientnet_lite0", image_size=64, hflip=0.0,
                           scale=(0.7, 1.0), ratio=(0.9, 1.1), augment=augment, batch_size=64)


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    from finetune import FineTuneModule

    def lightning() -> float:
        pl.seed_everything(0, verbose=False)
        dm = _digits()
        model = FineTuneModule("tf_efficientnet_lite0", num_classes=10, freeze="none")
        epochs = -(-args.steps // len(dm.train_dataloader()))
        trainer = pl.Trainer(max_epochs=epochs, max_steps=args.steps, limit_val_batches=0, accelerator="cpu",
                             **QUIET)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        return time.perf_counter() - start

    def plain() -> float:
        from finetune.optim import build_scheduler, param_groups

        pl.seed_everything(0, verbose=False)
        dm = _digits()
        model = FineTuneModule("tf_efficientnet_lite0", num_classes=10, freeze="none")
        start = time.perf_counter()
        dm.setup("fit")
        # The optimizer and per-step schedule FineTuneModule.configure_optimizers builds, for this many steps.
        hp = model.hparams
        opt = torch.optim.AdamW(param_groups(model.backbone, model.head, model.freeze_plan, hp.lr,
                                             hp.backbone_lr_mult, hp.weight_decay, hp.layer_decay), lr=hp.lr)
        loader = dm.train_dataloader()
        sched = build_scheduler(opt, args.steps, len(loader), hp.scheduler["sched"], hp.scheduler["warmup_epochs"])
        model.train()
        step = 0
        while step < args.steps:
            for x, y in loader:
                loss = model.criterion(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step == args.steps:
                    break
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"lightning": [], "plain": []}
    for _ in range(args.repeats):  # interleaved, best of each: the machine is shared and noisy
        times["plain"].append(plain())
        times["lightning"].append(lightning())
    best = {k: min(v) for k, v in times.items()}
    return {"steps": args.steps, "seconds": times, "best_s": best, "ratio": best["lightning"] / best["plain"]}


def cached(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl

    from finetune import FeatureDataModule, FineTuneModule

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.ends.append(time.perf_counter())

    def epochs(use_cache: bool) -> list[float]:
        pl.seed_everything(0, verbose=False)
        dm = _digits(augment="none")
        model = FineTuneModule("tf_efficientnet_lite0", num_classes=10, freeze="head_only", lr=1e-2)
        data = FeatureDataModule(dm, model) if use_cache else dm
        clock = EpochClock()
        trainer = pl.Trainer(max_epochs=args.epochs, limit_val_batches=0, accelerator="cpu", callbacks=[clock],
                             **QUIET)
        start = time.perf_counter()  # epoch 1 includes the fit's set-up, and for the cache, extraction
        trainer.fit(model, datamodule=data)
        return [b - a for a, b in zip([start, *clock.ends], clock.ends)]

    return _cached_summary(epochs(False), epochs(True))


def _cached_summary(plain_epoch: list[float], cached_epoch: list[float]) -> dict[str, Any]:
    later_plain = sum(plain_epoch[1:]) / max(1, len(plain_epoch) - 1)
    later_cached = sum(cached_epoch[1:]) / max(1, len(cached_epoch) - 1)
    return {
        "uncached_epoch_s": plain_epoch,
        "cached_epoch_s": cached_epoch,
        "ratio_after_first": later_plain / max(later_cached, 1e-9),
        "ratio_total": sum(plain_epoch) / sum(cached_epoch),
    }


def photos(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from finetune import FeatureDataModule, FineTuneModule, ImageDataModule
    from finetune.config import compose
    from finetune.data.photos import write_photo_folder
    from finetune.train import train

    root = Path(tempfile.mkdtemp()) / "photos"
    write_photo_folder(root, per_class=args.photos_per_class, size=224, seed=0)
    n_images = sum(1 for _ in root.rglob("*.png"))
    overrides = ["+recipe=auto", "data=folder", f"data.root={root}", "data.num_workers=0",
                 "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    metrics = train(compose(overrides), Path(tempfile.mkdtemp()), overrides=overrides)
    auto_s = time.perf_counter() - start

    # One feature-extraction pass over every image, and the logistic-regression probe on it.
    dm = ImageDataModule("folder", root=root, backbone="tf_efficientnet_lite0", augment="none", val_fraction=0.2,
                         num_workers=0, seed=42)
    model = FineTuneModule("tf_efficientnet_lite0", num_classes=dm.num_classes, freeze="head_only")
    feats = FeatureDataModule(dm, model)
    start = time.perf_counter()
    train_ds, val_ds = feats.dataset("train"), feats.dataset("val")
    extract_s = time.perf_counter() - start
    x_tr, y_tr = (t.numpy() for t in train_ds.tensors)
    x_va, y_va = (t.numpy() for t in val_ds.tensors)
    probe = LogisticRegression(max_iter=2000).fit(x_tr, y_tr)
    return {
        "images": n_images,
        "auto_recipe": metrics.get("advised_recipe"),
        "auto_total_s": auto_s,
        "auto_val_acc": metrics["val_acc"],
        "auto_features_reused": metrics.get("features_reused"),
        "auto_feature_extraction_s": metrics.get("feature_extraction_s"),
        "auto_train_time_s": metrics["train_time_s"],
        "extraction_pass_s": extract_s,
        "time_ratio": auto_s / extract_s,
        "logreg_val_acc": float(np.mean(probe.predict(x_va) == y_va)),
        "threads": torch.get_num_threads(),
    }


def compiled(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from finetune import FineTuneModule

    torch.manual_seed(0)
    x = torch.randn(args.compile_batch, 3, 128, 128)
    y = torch.randint(0, 10, (args.compile_batch,))
    out: dict[str, Any] = {"batch": args.compile_batch, "image_size": 128, "steps": args.compile_steps}
    for name, setting in (("eager", False), ("compiled", True)):
        module = FineTuneModule("tf_efficientnet_lite0", num_classes=10, freeze="none", compile=setting)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            module.train()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(module(x), y).backward()
            opt.step()

        @torch.no_grad()
        def infer() -> None:
            module.eval()
            module(x)

        row: dict[str, float] = {}
        for what, fn in (("train", step), ("infer", infer)):
            start = time.perf_counter()
            fn()
            row[f"{what}_first_s"] = time.perf_counter() - start
            fn()
            start = time.perf_counter()
            for _ in range(args.compile_steps):
                fn()
            row[f"{what}_s"] = (time.perf_counter() - start) / args.compile_steps
        out[name] = row
    out["train_speedup"] = out["eager"]["train_s"] / out["compiled"]["train_s"]
    out["infer_speedup"] = out["eager"]["infer_s"] / out["compiled"]["infer_s"]
    return out


def _child(fn: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace, q: mp.Queue) -> None:
    q.put(fn(args))


def _run(fn: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps of the overhead comparison")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--photos-per-class", type=int, default=60)
    p.add_argument("--compile-steps", type=int, default=10)
    p.add_argument("--compile-batch", type=int, default=32)
    p.add_argument("--parts", default="overhead,cached,photos,compile",
                   help="comma-separated parts to run (the JSON keeps earlier results of parts not run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fast_paths.json"))
    args = p.parse_args()

    parts = set(args.parts.split(","))
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.update({"machine": f"{platform.machine()} {platform.processor()}".strip(),
                    "cpus": os.cpu_count(), "args": vars(args)})
    if "overhead" in parts:
        results["overhead"] = o = _run(overhead, args)
        print(f"Lightning vs plain loop, {o['steps']} steps: {o['best_s']['lightning']:.2f} s vs "
              f"{o['best_s']['plain']:.2f} s, ratio {o['ratio']:.3f} (target <= 1.10)", flush=True)
    if "cached" in parts:
        results["cached"] = c = _run(cached, args)
        print("head_only per epoch, uncached: " + " ".join(f"{t:.2f}" for t in c["uncached_epoch_s"]) + " s",
              flush=True)
        print("head_only per epoch, cached:   " + " ".join(f"{t:.2f}" for t in c["cached_epoch_s"]) + " s",
              flush=True)
        print(f"cached speed-up: {c['ratio_after_first']:.1f}x per epoch after the first (target >= 20), "
              f"{c['ratio_total']:.1f}x over all {args.epochs}", flush=True)
    if "photos" in parts:
        results["photos"] = ph = _run(photos, args)
        print(f"photos ({ph['images']} crops, 224 px): +recipe=auto ({ph['auto_recipe']}) {ph['auto_total_s']:.1f} s "
              f"= {ph['time_ratio']:.2f}x one extraction pass ({ph['extraction_pass_s']:.1f} s; target about 2x); "
              f"val top-1 {100 * ph['auto_val_acc']:.2f}% vs logistic regression {100 * ph['logreg_val_acc']:.2f}%",
              flush=True)
    if "compile" in parts:
        results["compile"] = cp = _run(compiled, args)
        e, c2 = cp["eager"], cp["compiled"]
        print(f"compile=true vs eager (lite0, freeze=none, batch {cp['batch']}, 128 px): train step "
              f"{c2['train_s']:.3f} vs {e['train_s']:.3f} s ({cp['train_speedup']:.2f}x; first step "
              f"{c2['train_first_s']:.1f} s vs {e['train_first_s']:.1f} s), inference {c2['infer_s']:.3f} vs "
              f"{e['infer_s']:.3f} s ({cp['infer_speedup']:.2f}x)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
