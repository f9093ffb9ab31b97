"""``python -m finetune resume=RUN``: continue a run from its last checkpoint, with its own config.

The checkpoint is written at the end of every epoch (``checkpoints/last.ckpt``), so a run
killed mid-epoch restarts that epoch; :class:`finetune.callbacks.SeedEachEpoch` makes the
epoch's randomness depend on the seed and the epoch alone, so the resumed run ends with the
weights and metrics of the uninterrupted one. The freeze schedule, the per-group learning
rates, the optimizer and the epochs recorded so far come back from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FineTuneError

__all__ = ["last_checkpoint", "resume_config"]

# Overrides that may accompany resume=: they do not change what the run trains.
_ALLOWED = ("resume", "hydra.", "trainer.enable_progress_bar")


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN/checkpoints/last.ckpt``, or a one-line error saying why there is nothing to resume."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FineTuneError(f"resume: run directory '{run_dir}' does not exist")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FineTuneError(f"resume: '{run_dir}' has no checkpoints/last.ckpt (the run ended before its first epoch)")
    return ckpt


def resume_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, Path, dict[str, Any]]:
    """The config a run trained with, its last checkpoint, and the ``metrics.json`` entries of its advice.

    Args:
        run_dir: the run directory to continue.
        overrides: the command's other overrides; any that would change the training is refused.
    """
    run_dir = Path(run_dir).expanduser()
    ckpt = last_checkpoint(run_dir)
    changed = [o for o in overrides if not o.lstrip("+~").startswith(_ALLOWED)]
    if changed:
        raise FineTuneError(f"resume continues the run with its own config; drop {' '.join(changed)}")
    try:  # resolved and type-checked when the run was composed: taken as it is
        cfg = OmegaConf.load(run_dir / "config.yaml")
    except Exception as e:  # noqa: BLE001 - missing or unreadable: the run cannot be reproduced
        raise FineTuneError(f"resume: cannot read '{run_dir / 'config.yaml'}': {e}") from None
    if not isinstance(cfg, DictConfig) or "resume" not in cfg:
        raise FineTuneError(f"resume: '{run_dir / 'config.yaml'}' is not a config this version of finetune wrote")
    cfg.resume = str(run_dir)
    extra: dict[str, Any] = {}
    advice = run_dir / "advice.json"
    if advice.is_file():  # it was +recipe=auto: keep saying so
        a = json.loads(advice.read_text())
        extra = {"recipe": "auto", "advised_recipe": a.get("recipe"), "advice": a.get("reason")}
    return cfg, ckpt, extra
