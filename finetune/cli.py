"""``python -m finetune [+recipe=NAME] [overrides]``: Hydra entry point, no logic of its own."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune.compare import write_failure
from finetune.config import CONF_DIR, register_recipes
from finetune.errors import FineTuneError

register_recipes()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from finetune.train import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # In a sweep, one failed run must not abort the others (Hydra's sweepers re-raise a job's exception):
    # it leaves a failure record for the comparison report, and the sweep goes on.
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg, run_dir)
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        if not in_sweep:
            sys.exit(2)
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


def main() -> None:
    _main()
