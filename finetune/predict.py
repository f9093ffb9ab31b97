"""``python -m finetune.predict ckpt=PATH images=DIR_OR_FILE[,FILE...]``: top-k classes of new images.

Images are preprocessed exactly as the run evaluated them (the eval pipeline of
:mod:`finetune.data.transforms`). The checkpoint does not hold that preprocessing today,
so it is recovered, first found wins, from: ``image_size=`` on the command line; a
``data_config`` in the checkpoint's hyperparameters or Lightning's
``datamodule_hyper_parameters``; the run's ``config.yaml`` next to its ``checkpoints/``
folder; the backbone's pretrained config.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from finetune.data.images import is_image_file, load_image
from finetune.data.scan import check_on_bad_image
from finetune.data.transforms import eval_transform
from finetune.errors import FineTuneError, run_command

__all__ = [
    "Preprocessing",
    "class_names",
    "collect_images",
    "load_checkpoint",
    "main",
    "parse_args",
    "predict_images",
    "resolve_preprocessing",
    "run_dir_of",
    "write_predictions",
]

# The data config keys that decide eval preprocessing (ImageDataModule's names).
_PREP_KEYS = ("image_size", "mean", "std", "interpolation", "crop_pct")


@dataclass(frozen=True)
class Preprocessing:
    """The eval pipeline's settings, and where they were found."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    source: str

    def transform(self) -> Any:
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def parse_args(argv: Sequence[str], defaults: dict[str, Any], extra: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` arguments: values of ``defaults``' keys, and the rest (an error unless ``extra``).

    A value given on the command line replaces the default, converted to the default's type.
    """
    values = dict(defaults)
    rest: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in defaults:
            values[key] = _convert(key, value, defaults[key])
        elif extra:
            rest.append(arg)
        else:
            raise FineTuneError(f"unknown argument '{arg}'; expected key=value with key one of {', '.join(defaults)}")
    return values, rest


def _convert(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool) or not isinstance(default, int):
        return value
    try:
        number = int(value)
    except ValueError:
        raise FineTuneError(f"{key} must be an integer, got '{value}'") from None
    if number < 1:
        raise FineTuneError(f"{key} must be at least 1, got {number}")
    return number


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """The FineTuneModule of checkpoint ``path`` in eval mode (on the GPU if there is one), and the raw dict.

    The raw dict (memory-mapped, no weights copied) is read for what the module does not keep.
    """
    from finetune.module import FineTuneModule

    if not path:
        raise FineTuneError("ckpt is not set; pass ckpt=PATH (e.g. outputs/DATE/TIME/checkpoints/best.ckpt)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FineTuneError(f"checkpoint '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        module = FineTuneModule.load_from_checkpoint(path, map_location="cpu")
    except FineTuneError:
        raise
    except Exception as e:
        raise FineTuneError(f"cannot load checkpoint '{path}': {' '.join(str(e).split())[:200]}") from None
    return module.to("cuda" if torch.cuda.is_available() else "cpu").eval(), raw


def class_names(module: Any) -> list[str]:
    """The checkpoint's class names; numbered names where it was trained without them."""
    names = module.hparams.get("class_names")
    return list(names) if names else [str(i) for i in range(int(module.hparams.num_classes))]


def run_dir_of(ckpt: str | os.PathLike[str]) -> Path | None:
    """The run directory of a checkpoint saved in ``RUN/checkpoints/``, else None."""
    parent = Path(ckpt).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def _saved_data_config(raw: dict[str, Any], ckpt: Path) -> tuple[dict[str, Any], str] | None:
    """The training run's data preprocessing keys, from the checkpoint or its run's config.yaml."""
    for where, holder in (
        ("checkpoint hparams data_config", (raw.get("hyper_parameters") or {}).get("data_config")),
        ("checkpoint datamodule_hyper_parameters", raw.get("datamodule_hyper_parameters")),
    ):
        if holder and any(holder.get(k) is not None for k in _PREP_KEYS):
            return dict(holder), where
    run_dir = run_dir_of(ckpt)
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        data = (loaded.get("data") if isinstance(loaded, dict) else None) or {}
    except Exception:  # an unreadable config.yaml is no reason to refuse: fall back to the backbone's
        return None
    return dict(data), str(config)


def resolve_preprocessing(
    module: Any, raw: dict[str, Any], ckpt: str | os.PathLike[str], image_size: int | None = None
) -> Preprocessing:
    """The eval preprocessing of the run that saved ``ckpt``; see the module docstring for the order."""
    backbone = module.data_config
    saved = _saved_data_config(raw, Path(ckpt))
    data, source = saved if saved else ({}, f"backbone {module.hparams.backbone} defaults")
    if image_size is not None:
        data, source = {**data, "image_size": image_size}, f"image_size={image_size}, rest from {source}"

    def pick(key: str, fallback: Any) -> Any:
        value = data.get(key)
        return fallback if value is None else value

    return Preprocessing(
        image_size=int(pick("image_size", backbone["input_size"][-1])),
        mean=tuple(float(v) for v in pick("mean", backbone["mean"])),
        std=tuple(float(v) for v in pick("std", backbone["std"])),
        crop_pct=float(pick("crop_pct", backbone.get("crop_pct", 0.875))),
        interpolation=str(pick("interpolation", backbone.get("interpolation", "bicubic"))),
        source=source,
    )


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


def _load(path: Path, transform: Any) -> torch.Tensor:
    return transform(image=load_image(path))["image"]


def _batches(
    paths: Sequence[Path], transform: Any, batch_size: int, bad: list[tuple[Path, str]], skip: bool
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    batch: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            batch.append((path, _load(path, transform)))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
            why = " ".join(str(e).split())[:160] or type(e).__name__
            if not skip:
                raise FineTuneError(f"cannot read image '{path}': {why} (on_bad_image=skip skips such files)") from None
            bad.append((path, why))
            continue
        if len(batch) == batch_size:
            yield [p for p, _ in batch], torch.stack([x for _, x in batch])
            batch = []
    if batch:
        yield [p for p, _ in batch], torch.stack([x for _, x in batch])


def predict_images(
    module: Any,
    paths: Sequence[Path],
    prep: Preprocessing,
    batch_size: int = 32,
    topk: int = 5,
    on_bad_image: str = "error",
) -> tuple[list[tuple[Path, list[tuple[str, float]]]], list[tuple[Path, str]]]:
    """Top-k ``(class, probability)`` per readable image, and the unreadable images with why."""
    check_on_bad_image(on_bad_image)
    names = class_names(module)
    k = min(topk, len(names))
    transform = prep.transform()
    results: list[tuple[Path, list[tuple[str, float]]]] = []
    bad: list[tuple[Path, str]] = []
    with torch.inference_mode():
        for batch_paths, x in _batches(paths, transform, batch_size, bad, skip=on_bad_image == "skip"):
            probs, idx = module(x.to(module.device)).softmax(-1).topk(k, dim=-1)
            for path, p, i in zip(batch_paths, probs.tolist(), idx.tolist()):
                results.append((path, [(names[c], prob) for c, prob in zip(i, p)]))
    return results, bad


def write_predictions(results: list[tuple[Path, list[tuple[str, float]]]], path: Path, k: int) -> None:
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


def _image_specs(value: str) -> list[str]:
    return [s for s in (part.strip() for part in value.split(",")) if s]


def run(argv: Sequence[str]) -> int:
    """The command; returns the number of images predicted."""
    args, _ = parse_args(
        argv,
        {"ckpt": "", "images": "", "out": "predictions.csv", "batch_size": 32, "topk": 5,
         "image_size": 0, "on_bad_image": "error"},
    )
    check_on_bad_image(args["on_bad_image"])  # before the slow part: loading the checkpoint
    paths = collect_images(_image_specs(args["images"]))
    module, raw = load_checkpoint(args["ckpt"])
    prep = resolve_preprocessing(module, raw, args["ckpt"], args["image_size"] or None)
    print(f"preprocessing: {prep.image_size} px, crop_pct {prep.crop_pct}, {prep.interpolation} (from {prep.source})")
    results, bad = predict_images(module, paths, prep, args["batch_size"], args["topk"], args["on_bad_image"])
    for image, top in results:
        print(f"{image}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    out = Path(args["out"]).expanduser()
    write_predictions(results, out, min(args["topk"], len(class_names(module))))
    print(f"wrote {out} ({len(results)} image(s))")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):")
        for path, why in bad:
            print(f"  {path}: {why}")
    return len(results)


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune.predict ckpt=PATH images=DIR_OR_FILE[,FILE...] [out=predictions.csv] [batch_size=32]
    [topk=5] [image_size=N] [on_bad_image=error|skip]``."""
    run_command(run, argv)


if __name__ == "__main__":
    main()
