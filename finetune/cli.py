"""``python -m finetune [+recipe=NAME] [overrides]``: the Hydra entry point.

``+recipe=auto`` is turned into a recipe here, before the config that trains is composed
(advice in, overrides out), so ``train()`` never reads Hydra's global state.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune.advise import follow_advice
from finetune.compare import write_failure
from finetune.config import CONF_DIR, compose, register_configs
from finetune.errors import FineTuneError, error_line, run_hydra
from finetune.train import train

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # In a sweep, one failed run must not abort the others (Hydra's sweepers re-raise a job's exception):
    # it leaves a failure record for the comparison report, and the sweep goes on.
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        precomputed, extra = [], None
        if cfg.recipe == "auto":
            cfg, extra, precomputed = follow_advice(cfg, list(hydra_cfg.overrides.task), run_dir)
        metrics = train(cfg, run_dir, precomputed, extra)
    except (FineTuneError, HydraException, OmegaConfBaseException) as e:
        if not in_sweep:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        write_failure(run_dir, e)
        return float("nan")  # NaN, not None: sweepers that optimize (Optuna) record a failed trial
    except Exception as e:
        if not in_sweep:
            raise
        logging.getLogger("finetune").exception(f"run failed: {run_dir}")
        write_failure(run_dir, e)
        return float("nan")
    # Returned so that Hydra sweepers (e.g. Optuna) can optimize it.
    return metrics.get("val_acc")


def run_job(overrides: Sequence[str], run_dir: str | Path) -> dict[str, Any]:
    """What ``python -m finetune OVERRIDES hydra.run.dir=RUN_DIR`` does (``+recipe=auto`` included), from Python."""
    cfg = compose(overrides)
    precomputed, extra = [], None
    if cfg.recipe == "auto":
        cfg, extra, precomputed = follow_advice(cfg, list(overrides), run_dir)
    return train(cfg, run_dir, precomputed, extra)


def main() -> None:
    run_hydra(_main)
