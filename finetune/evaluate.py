"""``python -m finetune.evaluate ckpt=PATH [data overrides] [split=test]``: a checkpoint's accuracy on a split.

Prints top-1/top-5 and a per-class table, and writes ``evaluation.json`` and
``confusion_matrix.png`` into ``out_dir`` (default: the checkpoint's run directory).
Images go through the eval pipeline with the checkpoint's preprocessing (see
:mod:`finetune.predict`). Without data overrides the run's own data config is used, so
``python -m finetune.evaluate ckpt=outputs/DATE/TIME/checkpoints/best.ckpt`` scores the
split the run was trained against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from finetune.errors import FineTuneError, run_command
from finetune.predict import (
    class_names,
    load_checkpoint,
    parse_args,
    resolve_preprocessing,
    run_dir_of,
)

__all__ = ["check_classes", "evaluate", "main", "metrics_of", "write_confusion_png"]

_ARGS = {"ckpt": "", "split": "", "out_dir": "", "batch_size": 64, "image_size": 0}


def _overridden(overrides: Sequence[str], key: str) -> bool:
    """Whether an override sets ``key`` or anything under it (``data=folder``, ``data.root=...``)."""
    for o in overrides:
        name = o.lstrip("+~").partition("=")[0]
        if name == key or name.startswith(key + "."):
            return True
    return False


def compose_for(ckpt: str, overrides: Sequence[str], module: Any) -> DictConfig:
    """The data config to evaluate on: the overrides, else the run's own, split with the run's seed."""
    from finetune.config import compose

    run_dir = run_dir_of(ckpt)
    run_cfg = OmegaConf.load(run_dir / "config.yaml") if run_dir and (run_dir / "config.yaml").is_file() else None
    head: list[str] = []
    if not _overridden(overrides, "backbone"):  # the data config's preprocessing defaults come from it
        head.append(f"backbone.name={module.hparams.backbone}")
    if run_cfg is not None and "seed" in run_cfg and not _overridden(overrides, "seed"):
        head.append(f"seed={run_cfg.seed}")  # the seed draws a folder's val split: the run's, not the default
    from hydra.errors import HydraException

    try:
        cfg = compose([*head, *overrides])
    except HydraException as e:
        raise FineTuneError(f"bad override: {' '.join(str(e).split())[:300]}") from None
    if run_cfg is not None and "data" in run_cfg and not _overridden(overrides, "data"):
        cfg.data = run_cfg.data
    return cfg


def check_classes(data_classes: Sequence[str], ckpt_classes: Sequence[str]) -> None:
    """Raise unless the data has the checkpoint's classes, in its order (labels are indices)."""
    if list(data_classes) == list(ckpt_classes):
        return
    missing = [c for c in ckpt_classes if c not in data_classes]
    extra = [c for c in data_classes if c not in ckpt_classes]
    if missing or extra:
        diff = "; ".join(
            part for part in (
                f"not in the data: {_short(missing)}" if missing else "",
                f"not in the checkpoint: {_short(extra)}" if extra else "",
            ) if part
        )
        raise FineTuneError(
            f"the data's {len(data_classes)} classes differ from the checkpoint's {len(ckpt_classes)} ({diff})"
        )
    raise FineTuneError(
        f"the data's classes are the checkpoint's in another order: {_short(data_classes)} vs {_short(ckpt_classes)}"
    )


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _probabilities(module: Any, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            probs.append(module(x.to(module.device)).softmax(-1).cpu())
            labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def metrics_of(probs: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5 (more than 5 classes), the confusion matrix (rows: true) and per-class recall/precision."""
    n = len(names)
    pred = probs.argmax(1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    top5 = None
    if n > 5:
        best5 = np.argsort(-probs, axis=1)[:, :5]
        top5 = float((best5 == labels[:, None]).any(1).mean())
    per_class = []
    for c, name in enumerate(names):
        support, predicted, right = int(confusion[c].sum()), int(confusion[:, c].sum()), int(confusion[c, c])
        per_class.append({
            "class": name,
            "support": support,
            "recall": right / support if support else None,  # the class's accuracy
            "precision": right / predicted if predicted else None,
        })
    return {
        "images": int(len(labels)),
        "top1": float((pred == labels).mean()) if len(labels) else None,
        "top5": top5,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def format_report(m: dict[str, Any], split: str) -> str:
    width = max([5, *(len(r["class"]) for r in m["per_class"])])
    lines = [f"{split}: {m['images']} images   top-1 {_pct(m['top1'])}   top-5 {_pct(m['top5'])}", ""]
    lines.append(f"{'class':<{width}}  {'support':>7}  {'accuracy':>9}  {'precision':>9}")
    for r in m["per_class"]:
        lines.append(f"{r['class']:<{width}}  {r['support']:>7}  {_pct(r['recall']):>9}  {_pct(r['precision']):>9}")
    return "\n".join(lines)


def write_confusion_png(confusion: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """The confusion matrix, rows normalized to the true class (counts written in where they fit)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    n = len(names)
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    side = min(4 + 0.4 * n, 30)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, label="share of the true class")
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(s) for s in names], rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(ticks, [str(s) for s in names], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluate(argv: Sequence[str]) -> dict[str, Any]:
    """The command; returns what it writes to ``evaluation.json``."""
    from finetune.data import ImageDataset
    from finetune.train import build_datamodule

    args, overrides = parse_args(argv, _ARGS, extra=True)
    module, raw = load_checkpoint(args["ckpt"])
    cfg = compose_for(args["ckpt"], overrides, module)
    dm = build_datamodule(cfg)
    names = class_names(module)
    check_classes(dm.classes, names)

    split = args["split"] or ("test" if dm.has_test else "val")
    if split not in dm.data.splits:
        raise FineTuneError(f"the data has no '{split}' split; it has {', '.join(dm.data.splits)}")
    # An explicit data.image_size wins over the run's, as image_size= does.
    given = cfg.data.get("image_size") if _overridden(overrides, "data.image_size") else None
    image_size = args["image_size"] or given
    prep = resolve_preprocessing(module, raw, args["ckpt"], image_size)
    loader = DataLoader(
        ImageDataset(dm.data.splits[split], prep.transform()),
        batch_size=args["batch_size"],
        num_workers=dm.num_workers,
    )
    probs, labels = _probabilities(module, loader)
    m = metrics_of(probs, labels, names)

    run_dir = run_dir_of(args["ckpt"])
    out_dir = Path(args["out_dir"]).expanduser() if args["out_dir"] else (run_dir or Path.cwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(Path(args["ckpt"]).expanduser().resolve()),
        "data": dm.data.name,
        "split": split,
        "preprocessing": prep.to_dict(),
        **m,
        "class_names": names,
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    png = out_dir / "confusion_matrix.png"
    title = f"{dm.data.name} {split}: top-1 {_pct(m['top1'])}"
    write_confusion_png(np.asarray(m["confusion_matrix"]), names, png, title)
    print(f"preprocessing: {prep.image_size} px, crop_pct {prep.crop_pct}, {prep.interpolation} (from {prep.source})")
    print(format_report(m, split))
    for note in dm.data.notes:
        print(f"note: {note}")
    print(f"wrote {out_dir / 'evaluation.json'} and {png}")
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.evaluate ckpt=PATH [data=folder data.root=DIR ...] [split=test|val|train]
    [out_dir=DIR] [batch_size=64] [image_size=N]``."""
    run_command(evaluate, argv)


if __name__ == "__main__":
    main()
