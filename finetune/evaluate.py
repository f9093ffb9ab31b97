"""``python -m finetune.evaluate ckpt=PATH [data overrides] [split=test]``: a checkpoint's accuracy on a split.

Prints top-1/top-5 and a per-class table, and writes ``evaluation.json`` and
``confusion_matrix.png`` into ``out_dir`` (default: the checkpoint's run directory).
Images go through the eval pipeline with the checkpoint's preprocessing (see
:mod:`finetune.checkpoints`) and the same inference path as ``finetune.predict``
(:mod:`finetune.inference`). Without data overrides the run's own data config and seed are
used, so ``python -m finetune.evaluate ckpt=outputs/DATE/TIME/checkpoints/best.ckpt`` scores
the split the run was trained against.

The command's own arguments (:class:`EvaluateConfig`) are a Hydra app's; every other
``key=value`` is an override of the training config (``conf/config.yaml``: ``data=folder
data.root=DIR``, ``backbone.name=...``, ``seed=...``), composed with
:func:`finetune.config.compose` inside the app.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from finetune.checkpoints import (
    Preprocessing, class_names, load_checkpoint, output_dir_of, resolve_preprocessing, run_dir_of,
)
from finetune.command import CommandConfig, command_hydra, check_positive, hold_errors, run_app
from finetune.config import CONF_DIR, compose
from finetune.errors import FineTuneError
from finetune.calibration import calibration_metrics, format_calibration, write_reliability_png
from finetune.metrics import format_report, metrics_of, percent, write_confusion_png
from finetune.tta import check_tta, check_tta_allowed, format_tta, tta_transform, view_summary

if TYPE_CHECKING:
    from finetune.data import Split

__all__ = [
    "EvaluateConfig", "check_classes", "compose_for", "evaluate", "main", "split_overrides", "split_probabilities",
]


@dataclass
class EvaluateConfig(CommandConfig):
    """``python -m finetune.evaluate``'s own arguments (the rest are training config overrides).

    Attributes:
        ckpt: the checkpoint (``outputs/DATE/TIME/checkpoints/last.ckpt``).
        split: ``test``, ``val`` or ``train`` (None: test where the data has one, else val).
        out_dir: where ``evaluation.json`` and ``confusion_matrix.png`` go (None: the run dir,
            else the working directory).
        batch_size: images per forward pass.
        image_size: override the run's input size (None: ``data.image_size=`` if given, else the run's).
        tta: test-time augmentation, ``none``, ``hflip`` or ``five_crop`` (:mod:`finetune.tta`): the
            metrics are the augmented pass's; ``evaluation.json``'s ``tta`` block has both passes and times.
        cam: write Grad-CAM overlays of the misclassified images and a contact sheet into ``cam/`` (:mod:`finetune.cam`).
        cam_per_class: correct images drawn per class beside the mistakes.
    """

    ckpt: str = ""
    split: Optional[str] = None
    out_dir: Optional[str] = None
    batch_size: int = 64
    image_size: Optional[int] = None
    tta: str = "none"
    cam: bool = False
    cam_per_class: int = 2
    hydra: Any = field(default_factory=lambda: command_hydra("evaluate"))  # --help: finetune.help


ConfigStore.instance().store(name="evaluate", node=EvaluateConfig)

_OWN = {f.name for f in dataclasses.fields(EvaluateConfig)} - {"defaults"}  # "hydra" stays: hydra.* overrides


def _name(arg: str) -> str:
    """The dotted key an override sets: ``data.root`` for ``data.root=DIR``, ``data.x`` for ``+data/x=y``."""
    return arg.lstrip("+~").partition("=")[0].replace("/", ".")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments (and Hydra's flags), and the training config's overrides."""
    own: list[str] = []
    rest: list[str] = []
    for arg in argv:
        (own if "=" not in arg or arg.startswith("-") or _name(arg).partition(".")[0] in _OWN else rest).append(arg)
    return own, rest


def _overridden(overrides: Sequence[str], key: str) -> bool:
    """Whether an override sets ``key`` or anything under it (``data=folder``, ``data.root=...``)."""
    return any(_name(o) == key or _name(o).startswith(key + ".") for o in overrides)


def compose_for(ckpt: str, overrides: Sequence[str], module: Any) -> DictConfig:
    """The training config to evaluate with: the overrides, else the run's own data, split with the run's seed."""
    run_dir = run_dir_of(ckpt)
    run_cfg = OmegaConf.load(run_dir / "config.yaml") if run_dir and (run_dir / "config.yaml").is_file() else None
    head: list[str] = []
    if not _overridden(overrides, "backbone"):  # the data config's preprocessing defaults come from it
        head.append(f"backbone.name={module.hparams.backbone}")
    if run_cfg is not None and "seed" in run_cfg and not _overridden(overrides, "seed"):
        head.append(f"seed={run_cfg.seed}")  # the seed draws a folder's val split: the run's, not the default
    cfg = compose([*head, *overrides])
    if run_cfg is None or "data" not in run_cfg or _overridden(overrides, "data"):
        return cfg
    # The run's data section replaces the composed one whole. As plain containers: a typed config would
    # refuse one source's keys in another's schema (the default data is digits, the run's maybe a folder).
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain["data"] = OmegaConf.to_container(run_cfg.data, resolve=False)  # type: ignore[index]
    return OmegaConf.create(plain)


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


def split_probabilities(
    module: Any, split: Split, prep: Preprocessing, batch_size: int = 64, num_workers: int = 0, tta: str = "none",
    temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities of ``split``'s images in its order, and its labels (as the loader gave them).

    ``tta``: :mod:`finetune.tta`'s views, averaged; ``temperature``: None for the checkpoint's, 1.0 uncalibrated.
    """
    from finetune.data.datamodule import ImageDataset  # Lightning, as is the inference: not imported for --help
    from finetune.inference import probabilities

    dataset = ImageDataset(split, tta_transform(prep, tta))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    probs, labels = probabilities(module, loader, temperature)
    return probs, labels if labels is not None else torch.zeros(0, dtype=torch.long)


def _passes(module: Any, split: Split, prep: Preprocessing, cfg: EvaluateConfig, num_workers: int) -> tuple[
        dict[str, tuple[torch.Tensor, float]], torch.Tensor, torch.Tensor]:
    """Timed passes (plain, and ``cfg.tta``'s), the labels, and the plain pass's uncalibrated probabilities."""
    args = (module, split, prep, cfg.batch_size, num_workers)
    uncalibrated = split_probabilities(*args, temperature=1.0)[0] if module.temperature != 1.0 else None
    runs: dict[str, tuple[torch.Tensor, float]] = {}
    for mode in dict.fromkeys(("none", cfg.tta)):
        start = time.perf_counter()
        probs, labels = split_probabilities(*args, tta=mode)
        runs[mode] = (probs, time.perf_counter() - start)
    return runs, labels, runs["none"][0] if uncalibrated is None else uncalibrated


def evaluate(cfg: EvaluateConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The command: ``cfg`` its own arguments, ``overrides`` the training config's. Returns ``evaluation.json``."""
    from finetune.builders import build_datamodule
    from finetune.cam import write_cams

    check_positive(cfg, "batch_size", "image_size")
    check_tta(cfg.tta)
    module, raw = load_checkpoint(cfg.ckpt)
    data_cfg = compose_for(cfg.ckpt, overrides, module)
    dm = build_datamodule(data_cfg)
    names = class_names(module)
    check_classes(dm.classes, names)

    split = cfg.split or ("test" if dm.has_test else "val")
    if split not in dm.data.splits:
        raise FineTuneError(f"the data has no '{split}' split; it has {', '.join(dm.data.splits)}")
    # An explicit data.image_size wins over the run's, as image_size= does.
    given = data_cfg.data.get("image_size") if _overridden(overrides, "data.image_size") else None
    prep = resolve_preprocessing(module, raw, cfg.ckpt, cfg.image_size or given)
    check_tta_allowed(cfg.tta, raw, cfg.ckpt, prep)
    runs, labels, uncalibrated = _passes(module, dm.data.splits[split], prep, cfg, dm.num_workers)
    m = metrics_of(runs[cfg.tta][0], labels, names)
    calibrated, temperature = runs["none"][0], module.temperature
    calibration = {"temperature": temperature, "before": calibration_metrics(uncalibrated, labels),
                   "after": calibration_metrics(calibrated, labels)}
    tta = {"mode": cfg.tta, **{mode: view_summary(p, labels, s) for mode, (p, s) in runs.items()}}

    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else output_dir_of(cfg.ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(Path(cfg.ckpt).expanduser().resolve()),
        "data": dm.data.name,
        "split": split,
        "preprocessing": prep.to_dict(),
        **m,
        "calibration": calibration,
        "tta": tta,
        "class_names": names,
    }
    if cfg.cam:  # on the plain pass: the overlays show the crops it scored
        result["cam"] = write_cams(module, dm.data.splits[split], prep, calibrated, labels, names, out_dir / "cam",
                                   cfg.cam_per_class)
        print(f"wrote Grad-CAM overlays of {result['cam']['misclassified']} misclassified and "
              f"{result['cam']['correct']} correct images to {out_dir / 'cam'}")
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    png = out_dir / "confusion_matrix.png"
    title = f"{dm.data.name} {split}: top-1 {percent(m['top1'])}"
    write_confusion_png(np.asarray(m["confusion_matrix"]), names, png, title)
    print(prep.describe())
    panels = {"uncalibrated": (uncalibrated, labels), f"temperature {temperature:.3g}": (calibrated, labels)}
    write_reliability_png(panels, out_dir / "reliability.png", f"{dm.data.name} {split}: reliability (plain pass)")
    print(format_report(m, split))
    print(format_calibration(temperature, calibration["before"], calibration["after"]))
    print(format_tta(tta))
    for note in dm.data.notes:
        print(f"note: {note}")
    print(f"wrote {out_dir / 'evaluation.json'}, {png} and {out_dir / 'reliability.png'}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.evaluate ckpt=PATH [data=folder data.root=DIR ...] [split=test|val|train]
    [out_dir=DIR] [batch_size=64] [image_size=N] [tta=none|hflip|five_crop]``."""
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    from finetune.config import register_configs

    register_configs()  # the training config groups, so that --help lists them (compose() registers them too)

    # The training config's search path (CONF_DIR), so compose() inside the app finds conf/config.yaml.
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
    @hold_errors
    def app(cfg: EvaluateConfig) -> None:
        evaluate(cfg, overrides)

    run_app(app, own, literal_keys=("ckpt", "out_dir"), help_command="evaluate")


if __name__ == "__main__":
    main()
