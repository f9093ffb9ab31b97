"""``--help`` of every command: what it does, its main options, the config groups, an example.

The Hydra apps (``finetune``, ``finetune.predict``, ``finetune.evaluate``, ``finetune.export``) have a
``hydra.help.template`` of ``${finetune_help:NAME}`` plus Hydra's ``$APP_CONFIG_GROUPS``, but
:func:`finetune.command.run_app` answers ``--help`` itself with the same text (:func:`app_help`): Hydra's
help lists the groups slowly (:func:`config_groups`). ``--hydra-help`` still shows Hydra's flags.
``finetune.advise``, ``finetune.stages`` and ``finetune.size`` compose a config themselves and print
:func:`help_text` on ``--help``/``-h`` before composing; ``finetune.compare`` is argparse.

No command imports Lightning, timm, albumentations or torchmetrics before its ``--help`` (tested): each
takes seconds to import, so those imports sit in the functions that use them. ``--help`` took 8.5-15 s
and takes about 3 s, half of it torch, which the config's optimizer and scheduler schemas need.
"""

from __future__ import annotations

import sys
from typing import Sequence

__all__ = [
    "COMMANDS", "RECIPE_WHY", "app_help", "asked_for_help", "config_groups", "help_text", "hydra_template",
    "print_help_if_asked", "recipe_lines", "register_help",
]

# Every command, with what it does in one line (``python -m finetune --help`` lists them).
COMMANDS = {
    "finetune": "train a timm backbone on your images (a recipe, or any group=option / key=value)",
    "finetune.predict": "top-k classes of new images from a checkpoint, into a CSV",
    "finetune.evaluate": "a checkpoint's accuracy on a split: top-1/top-5, per class, confusion matrix",
    "finetune.advise": "which recipe suits your data (its size and similarity to ImageNet), as JSON; no training",
    "finetune.stages": "a backbone's stages and what each freeze strategy trains",
    "finetune.size": "a network's units, weights and connections per layer and stage, and what a freeze costs",
    "finetune.compare": "the comparison table and plot of the runs of a sweep directory (--soup: their greedy soup)",
    "finetune.interpolate": "WiSE-FT between two checkpoints: every weight interpolated, alpha chosen on val",
    "finetune.shard": "any data source written once as WebDataset tar shards, for data=webdataset",
    "finetune.export": "a checkpoint as ONNX or TorchScript with its preprocessing as JSON, to run without finetune",
}

# Each recipe's why in one line; a recipe not listed here shows the first sentence of its file's comment.
RECIPE_WHY = {
    "auto": "measures the data (size, similarity to ImageNet), picks one of the four below, trains it",
    "compare": "a sweep of the standard freeze strategies on your data, with a comparison table",
    "tune": "an Optuna search over LRs, strategy, augmentation and mixup (budget= split across trials)",
    "compare_all": "compare's strategies plus l2sp, ema and wise_ft on full fine-tuning, one run each",
    "small_similar": "few ImageNet-like images: a linear probe on the frozen backbone",
    "small_dissimilar": "few images unlike ImageNet: every layer adapts, the backbone at a reduced LR",
    "large_similar": "many ImageNet-like images: everything trains, the backbone at a tenth of the head's LR",
    "large_dissimilar": "many images unlike ImageNet: everything trains, the backbone at half the head's LR",
    "scratch": "the baseline to beat: the same network from random weights",
}

_WIDTH = 90

# The commands that take no config group (their --help lists none).
_NO_GROUPS = ("predict", "export")


def _first_sentence(comment: str) -> str:
    end = comment.find(". ")
    text = comment[: end + 1] if end > 0 else comment
    return text if len(text) <= _WIDTH else text[: _WIDTH - 3].rsplit(" ", 1)[0] + "..."


def recipe_lines() -> list[str]:
    """``NAME  why`` for each ``recipes/NAME.yaml``: the first sentence of its leading comment."""
    from finetune.config import RECIPES_DIR

    lines = []
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    width = max((len(p.stem) for p in paths), default=0)
    for path in paths:
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if text and not text.startswith("@package"):
                comment.append(text)
        why = RECIPE_WHY.get(path.stem) or _first_sentence(" ".join(comment))
        lines.append(f"  {path.stem:<{width}}  {why}")
    return lines


def _commands() -> list[str]:
    width = max(len(k) for k in COMMANDS)
    return [f"  python -m {k:<{width}}  {v}" for k, v in COMMANDS.items()]


def _finetune() -> str:
    return "\n".join([
        "python -m finetune: fine-tune a timm backbone (PyTorch Lightning, configured with Hydra).",
        "",
        "usage: python -m finetune [+recipe=NAME] [GROUP=OPTION ...] [KEY=VALUE ...] [--multirun]",
        "",
        "== Recipes (+recipe=NAME) ==",
        *recipe_lines(),
        "",
        "== Main options ==",
        "  data=folder data.root=DIR     your images, one folder per class (or train/ val/ test/ of them)",
        "  backbone=NAME | backbone.name=TIMM_NAME   the network; backbone.weights=FILE for local weights",
        "  freeze=STRATEGY               what trains (python -m finetune.stages shows it per stage)",
        "  trainer.max_epochs=N          epochs (Lightning Trainer arguments: trainer.KEY=VALUE)",
        "  optim.lr=LR  data.image_size=PX  data.batch_size=N  seed=N",
        "  hydra.run.dir=DIR             the run directory (default outputs/DATE/TIME); resume=RUN_DIR continues one",
        "",
        "== Commands ==",
        *_commands(),
        "  each answers --help",
        "",
        "== Examples ==",
        "  python -m finetune                                   the main job: digits, 15 epochs",
        "  python -m finetune +recipe=auto data=folder data.root=DIR",
        "  python -m finetune +recipe=compare data=folder data.root=DIR",
        "  python -m finetune --multirun freeze=none,head_only trainer.max_epochs=5",
        "",
        "Full config: python -m finetune --cfg job [overrides]; Hydra's flags: python -m finetune --hydra-help",
    ])


def _predict() -> str:
    return "\n".join([
        "python -m finetune.predict: top-k classes of new images, with a checkpoint of a run.",
        "",
        "usage: python -m finetune.predict ckpt=PATH images=DIR_OR_FILE[,FILE...] [KEY=VALUE ...]",
        "",
        "== Main options ==",
        "  ckpt=PATH        a run's checkpoint (RUN_DIR/checkpoints/last.ckpt or best.ckpt)",
        "  images=PATH      a folder (searched recursively), or image files, comma-separated",
        "  out=FILE         the CSV written (path, then class and probability of each of the top k);",
        "                   default: predictions.csv in the checkpoint's run directory",
        "  topk=5  batch_size=32  image_size=N  on_bad_image=error|skip",
        "  tta=none         test-time augmentation: hflip (if the run trained with flips) or five_crop",
        "",
        "== Example ==",
        "  python -m finetune.predict ckpt=outputs/DATE/TIME/checkpoints/last.ckpt images=new_photos/",
    ])


def _evaluate() -> str:
    return "\n".join([
        "python -m finetune.evaluate: a checkpoint's accuracy on a split (top-1/top-5, per class),",
        "with evaluation.json and confusion_matrix.png in out_dir (default: the checkpoint's run directory).",
        "",
        "usage: python -m finetune.evaluate ckpt=PATH [split=test|val|train] [data overrides] [KEY=VALUE ...]",
        "",
        "== Main options ==",
        "  ckpt=PATH        a run's checkpoint",
        "  split=test       the split scored; the run's own data unless data=... / data.KEY=... say otherwise",
        "  out_dir=DIR  batch_size=64  image_size=N",
        "  tta=none         also score hflip or five_crop views (averaged softmax); both passes timed",
        "  cam=true         Grad-CAM overlays of the misclassified images, cam_per_class=2 correct ones per class,",
        "                   and cam/contact_sheet.png (needs pip install 'finetune[explain]')",
        "",
        "== Example ==",
        "  python -m finetune.evaluate ckpt=outputs/DATE/TIME/checkpoints/best.ckpt split=test",
        "  python -m finetune.evaluate ckpt=RUN_DIR/checkpoints/last.ckpt data=folder data.root=OTHER_DIR",
    ])


def _export() -> str:
    return "\n".join([
        "python -m finetune.export: a checkpoint as a model file that runs without this package (onnxruntime,",
        "libtorch), taking a preprocessed batch (N, 3, H, W) and returning calibrated class probabilities,",
        "with preprocessing.json beside it (input_size, interpolation, mean, std, crop_pct, crop_mode, class_names).",
        "The written model is run once and compared with the checkpoint before it is kept.",
        "",
        "usage: python -m finetune.export ckpt=PATH [format=onnx|torchscript] [out=DIR]",
        "",
        "== Main options ==",
        "  ckpt=PATH        a run's checkpoint",
        "  format=onnx      onnx (model.onnx; needs pip install 'finetune[export]') or torchscript (model.pt)",
        "  out=DIR          where the model and preprocessing.json go; default: RUN_DIR/export",
        "  dynamo=true      torch.onnx.export's exporter (false: the older TorchScript-based one)",
        "",
        "== Example ==",
        "  python -m finetune.export ckpt=outputs/DATE/TIME/checkpoints/best.ckpt   (docs/deploy.md: using it)",
    ])


def config_groups() -> dict[str, list[str]]:
    """Every config group but Hydra's own, with its options: what Hydra's ``$APP_CONFIG_GROUPS`` lists.

    Read from the ConfigStore and ``conf/``'s folders directly. Hydra's own listing deep-copies the
    whole config repository for every group it asks about, twice a group, and computes its own groups
    too: 3.5 of the 5.5 s that ``python -m finetune --help`` took once its imports were deferred.
    """
    from hydra.core.config_store import ConfigStore

    from finetune.config import CONF_DIR, register_configs

    register_configs()
    options: dict[str, set[str]] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            elif prefix:  # a config outside any group (the primary config) is not an option
                options.setdefault(prefix[:-1], set()).add(key.removesuffix(".yaml"))

    walk(ConfigStore.instance().repo, "")
    for path in CONF_DIR.rglob("*.yaml"):
        if path.parent != CONF_DIR:
            options.setdefault(path.parent.relative_to(CONF_DIR).as_posix(), set()).add(path.stem)
    return {g: sorted(o) for g, o in sorted(options.items()) if g != "hydra" and not g.startswith("hydra/")}


def _groups(indent: str = "  ") -> list[str]:
    return [f"{indent}{g}: {', '.join(o)}" for g, o in config_groups().items()]


def _advise() -> str:
    return "\n".join([
        "python -m finetune.advise: which recipe suits the data, from its size and its similarity to",
        "ImageNet; prints the advice as JSON and trains nothing (+recipe=auto trains with it).",
        "",
        "usage: python -m finetune.advise [data=... data.KEY=VALUE] [backbone=...] [advise.KEY=VALUE ...]",
        "",
        "== Main options ==",
        "  data=folder data.root=DIR     the data measured (the training split)",
        "  backbone=NAME                 the network the recipe is for",
        "  advise.sample_size=256  advise.small_below=20000  advise.similar_below=0.2  advise.fallback=RECIPE",
        "",
        "== Config groups ==",
        *_groups(),
        "",
        "== Example ==",
        "  python -m finetune.advise data=folder data.root=DIR",
    ])


def _stages() -> str:
    return "\n".join([
        "python -m finetune.stages: a backbone's stages, their parameter counts, and what each freeze",
        "strategy trains (from which epoch, for the schedules that unfreeze).",
        "",
        "usage: python -m finetune.stages [backbone=NAME | backbone.name=TIMM_NAME] [freeze.KEY=VALUE ...]"
        " [trainer.max_epochs=E]",
        "",
        "== Main options ==",
        "  backbone=NAME | backbone.name=TIMM_NAME   the network shown",
        "  freeze.KEY=VALUE    an option of every strategy that has it (freeze.n=1: top_stages, bottom_stages)",
        "  trainer.max_epochs=E  the training length, for when schedules reach each stage",
        "",
        "== Config groups ==",
        *_groups(),
        "",
        "== Example ==",
        "  python -m finetune.stages backbone.name=resnet50 freeze.n=1",
    ])


def _size() -> str:
    return "\n".join([
        "python -m finetune.size: the network of a run measured as the course does, per layer and per stage:",
        "units (activations kept for backprop), weights (biases apart), connections (add-multiplies of a",
        "forward pass), at the run's image size; then what the freeze strategy trains, keeps and costs.",
        "",
        "usage: python -m finetune.size [backbone.name=TIMM_NAME] [data.image_size=N] [freeze=STRATEGY]"
        " [num_classes=N]",
        "",
        "== Main options ==",
        "  backbone=NAME | backbone.name=TIMM_NAME   the network measured (random weights: sizes do not need others)",
        "  data.image_size=N   the input size; default: the data's (digits: 64), else the backbone's",
        "  freeze=STRATEGY     freeze.KEY=VALUE  augment=none  cache_features=...  as for a run",
        "  num_classes=10      the new head's classes (the data decides them in a run)",
        "",
        "== Example ==",
        "  python -m finetune.size backbone.name=resnet50 data.image_size=224 freeze=head_only augment=none",
    ])


_TEXTS = {"finetune": _finetune, "predict": _predict, "evaluate": _evaluate, "advise": _advise, "stages": _stages,
          "size": _size, "export": _export}


def help_text(command: str) -> str:
    """The help of ``command`` (``finetune``, ``predict``, ``evaluate``, ``advise`` or ``stages``)."""
    return _TEXTS[command]()


def hydra_template(command: str) -> str:
    """``hydra.help.template`` of a Hydra app: our text, then Hydra's list of config groups."""
    groups = "\n== Config groups (GROUP=OPTION) ==\n$APP_CONFIG_GROUPS" if command not in _NO_GROUPS else ""
    return "${finetune_help:" + command + "}\n" + groups


def _resolve_help(command: str) -> str:
    return help_text(command).replace("$", "$$")  # Hydra fills the template with string.Template


def register_help() -> None:
    """The ``finetune_help`` resolver the Hydra apps' help templates use (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("finetune_help", _resolve_help, replace=True)


def app_help(command: str) -> str:
    """What a Hydra app's ``--help`` prints (its :func:`hydra_template` filled in), without Hydra's slow listing."""
    text = help_text(command)
    if command in _NO_GROUPS:
        return text
    return "\n".join([text, "", "== Config groups (GROUP=OPTION) ==", *_groups(indent="")])


def asked_for_help(argv: Sequence[str] | None) -> bool:
    """Whether ``argv`` (default: the command line) asks for ``--help`` or ``-h``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "--help" in args or "-h" in args


def print_help_if_asked(command: str, argv: Sequence[str] | None) -> bool:
    """For the commands that are not Hydra apps: print the help and return True on ``--help``/``-h``."""
    if asked_for_help(argv):
        print(help_text(command))
        return True
    return False
