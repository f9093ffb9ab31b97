"""train(cfg): config -> data, model, trainer; fit; evaluate; the run directory holds what happened.

Callable from tests and notebooks without the Hydra CLI (see :func:`finetune.config.compose`).
``+recipe=auto`` is resolved before this (:func:`finetune.advise.follow_advice`): a config that
reaches ``train`` names the recipe that trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from finetune.advice_share import record_lr
from finetune.budget import budget_clock
from finetune.builders import build_datamodule, build_fit_datamodule, build_module, build_trainer, check_run_config
from finetune.callbacks import RunRecorder, best_checkpoint
from finetune.distributed import is_launch_rank_zero
from finetune.errors import FineTuneError
from finetune.features import PrecomputedFeatures
from finetune.resume import last_checkpoint
from finetune.rundir import claim_run_dir

__all__ = ["train"]

# Lightning's short precision names and the names it reports them by.
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    precomputed: Sequence[PrecomputedFeatures] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; write config, logs, checkpoints and ``metrics.json`` to ``run_dir``.

    Args:
        cfg: the composed config (``finetune.config.compose``).
        run_dir: where the run's files go.
        precomputed: backbone features already computed (the advice's sample), for the feature cache.
        extra: more entries for ``metrics.json`` (``+recipe=auto`` adds the advice).

    Returns:
        The metrics written to ``metrics.json``.
    """
    if cfg.recipe == "auto":
        raise FineTuneError("recipe auto is resolved by finetune.advise.follow_advice (the CLI does it) before train()")
    check_run_config(cfg)
    with claim_run_dir(run_dir, cfg.overwrite, resuming=bool(cfg.resume)) as run_dir, budget_clock(cfg.get("budget")):
        return _train(cfg, run_dir, precomputed, extra)


def _train(cfg: DictConfig, run_dir: Path, precomputed: Sequence[PrecomputedFeatures], extra: Mapping | None) -> dict:
    ckpt_path = last_checkpoint(run_dir) if cfg.resume else None
    if is_launch_rank_zero():  # the other processes of a torchrun/srun/ddp run write nothing
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    model = build_module(cfg, dm)
    trainer = build_trainer(cfg, run_dir)
    fit_dm = build_fit_datamodule(cfg, dm, model, precomputed)
    trainer.fit(model, datamodule=fit_dm, ckpt_path=ckpt_path)
    # None: the weights in memory, i.e. those after the last epoch.
    ckpt = (best_checkpoint(trainer) or None) if cfg.evaluate == "best" else None
    if ckpt is not None or not RunRecorder.of(trainer).validated(trainer, model):  # else: the same figures again
        trainer.validate(model, datamodule=fit_dm, ckpt_path=ckpt, verbose=False)
    if dm.has_test:
        trainer.test(model, datamodule=fit_dm, ckpt_path=ckpt, verbose=False)
    asked = str(cfg.trainer.get("precision"))
    info = {"recipe": cfg.recipe, **(extra or {}), "backbone": cfg.backbone.name,
            "evaluated": "best" if ckpt else "last", "precision_asked": _PRECISION_ALIASES.get(asked, asked)}
    metrics = RunRecorder.of(trainer).finish(trainer, info, notes=[])
    if info["recipe"] == "auto" and is_launch_rank_zero():  # the LR is known only now (the finder runs in fit)
        record_lr(run_dir, cfg.optim.lr, float(cfg.optim.backbone_lr_mult), metrics.get("lr_find"))
    return metrics
