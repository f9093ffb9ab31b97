"""``python -m finetune.predict ckpt=PATH images=DIR_OR_FILE[,FILE...]``: top-k classes of new images.

Images are preprocessed exactly as the run evaluated them (see :mod:`finetune.checkpoints`
for where that is found) and go through the same path as ``finetune.evaluate``
(:mod:`finetune.inference`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import hydra
import torch
from hydra.core.config_store import ConfigStore

from finetune.checkpoints import (
    Preprocessing, class_names, load_checkpoint, output_dir_of, resolve_preprocessing,
)
from finetune.command import CommandConfig, command_hydra, check_positive, hold_errors, run_app
from finetune.data.images import is_image_file
from finetune.data.scan import check_on_bad_image
from finetune.errors import FineTuneError
from finetune.tta import check_tta, check_tta_allowed, tta_transform

__all__ = [
    "PredictConfig",
    "collect_images",
    "image_probabilities",
    "main",
    "predict",
    "predict_images",
    "write_predictions",
]


@dataclass
class PredictConfig(CommandConfig):
    """``python -m finetune.predict`` arguments.

    Attributes:
        ckpt: the checkpoint (``outputs/DATE/TIME/checkpoints/last.ckpt``).
        images: a folder (searched recursively), or image files, comma-separated.
        out: the CSV written: path, then class and probability of each of the top k. Empty:
            ``predictions.csv`` beside the checkpoint's run directory (see ``output_dir_of``).
        batch_size: images per forward pass.
        topk: classes listed per image (at most the checkpoint's number of classes).
        image_size: override the run's input size (None: the run's).
        on_bad_image: ``error``: an unreadable image stops the command, named; ``skip``: it is
            left out and listed.
        tta: test-time augmentation, ``none``, ``hflip`` or ``five_crop`` (:mod:`finetune.tta`).
    """

    ckpt: str = ""
    images: str = ""
    out: str = ""
    batch_size: int = 32
    topk: int = 5
    image_size: Optional[int] = None
    on_bad_image: str = "error"
    tta: str = "none"
    hydra: Any = field(default_factory=lambda: command_hydra("predict"))  # --help: finetune.help


ConfigStore.instance().store(name="predict", node=PredictConfig)

Prediction = tuple[Path, list[tuple[str, float]]]


def collect_images(specs: Iterable[str]) -> list[Path]:
    """Files named, and image files found recursively in folders named (sorted, hidden ones skipped)."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p) and not _hidden(p, path))
            if not inside:
                raise FineTuneError(f"folder '{path}' holds no image files")
            found += inside
        elif path.is_file():
            found.append(path)  # named explicitly: tried whatever its extension
        else:
            raise FineTuneError(f"image path '{path}' does not exist")
    if not found:
        raise FineTuneError("images is not set; pass images=DIR or images=FILE[,FILE...]")
    return found


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def image_probabilities(
    module: Any, paths: Sequence[Path], prep: Preprocessing, batch_size: int = 32, on_bad_image: str = "error",
    tta: str = "none",
) -> tuple[list[Path], torch.Tensor, list[tuple[Path, str]]]:
    """The readable images in ``paths``' order, their class probabilities, and the unreadable ones with why."""
    from finetune.inference import ImageFiles, probabilities  # Lightning: not imported for --help

    skip = check_on_bad_image(on_bad_image) == "skip"
    files = ImageFiles(paths, tta_transform(prep, tta), batch_size, skip=skip)
    probs, indices = probabilities(module, files.loader())
    readable = [files.paths[i] for i in indices.tolist()] if indices is not None else []
    return readable, probs, files.bad


def predict_images(
    module: Any,
    paths: Sequence[Path],
    prep: Preprocessing,
    batch_size: int = 32,
    topk: int = 5,
    on_bad_image: str = "error",
    tta: str = "none",
) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Top-k ``(class, probability)`` per readable image, and the unreadable images with why."""
    names = class_names(module)
    readable, probs, bad = image_probabilities(module, paths, prep, batch_size, on_bad_image, tta)
    top, idx = probs.topk(min(topk, len(names)), dim=-1)
    results = [
        (path, [(names[c], p) for c, p in zip(i, ps)]) for path, ps, i in zip(readable, top.tolist(), idx.tolist())
    ]
    return results, bad


def write_predictions(results: list[Prediction], path: Path, k: int) -> None:
    """``path, top1_class, top1_prob, top2_class, top2_prob, ..., topK_class, topK_prob``, one row per image."""
    header = ["path"]
    for r in range(1, k + 1):
        header += [f"top{r}_class", f"top{r}_prob"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for image, top in results:
            row: list[Any] = [str(image)]
            for name, prob in top:
                row += [name, f"{prob:.6f}"]
            writer.writerow(row)


def predict(cfg: PredictConfig) -> int:
    """The command; returns the number of images predicted."""
    check_positive(cfg, "batch_size", "topk", "image_size")
    check_on_bad_image(cfg.on_bad_image)  # before the slow part: loading the checkpoint
    check_tta(cfg.tta)
    paths = collect_images(s for s in (part.strip() for part in cfg.images.split(",")) if s)
    module, raw = load_checkpoint(cfg.ckpt)
    prep = resolve_preprocessing(module, raw, cfg.ckpt, cfg.image_size)
    check_tta_allowed(cfg.tta, raw, cfg.ckpt, prep)
    print(prep.describe())
    results, bad = predict_images(module, paths, prep, cfg.batch_size, cfg.topk, cfg.on_bad_image, cfg.tta)
    for image, top in results:
        print(f"{image}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    out = Path(cfg.out).expanduser() if cfg.out else output_dir_of(cfg.ckpt) / "predictions.csv"
    write_predictions(results, out, min(cfg.topk, len(class_names(module))))
    print(f"wrote {out} ({len(results)} image(s))")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):")
        for path, why in bad:
            print(f"  {path}: {why}")
    return len(results)


@hydra.main(version_base="1.3", config_path=None, config_name="predict")
@hold_errors
def _app(cfg: PredictConfig) -> None:
    predict(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.predict ckpt=PATH images=DIR_OR_FILE[,FILE...] [out=predictions.csv] [batch_size=32]
    [topk=5] [image_size=N] [on_bad_image=error|skip] [tta=none|hflip|five_crop]``."""
    run_app(_app, argv, literal_keys=("ckpt", "images", "out"), help_command="predict")


if __name__ == "__main__":
    main()
