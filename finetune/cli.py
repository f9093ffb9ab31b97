"""``python -m finetune [+recipe=NAME] [overrides]``: Hydra entry point, no logic of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.config import CONF_DIR, register_recipes
from finetune.errors import FineTuneError

register_recipes()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from finetune.train import train

    try:
        metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FineTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Returned so that Hydra sweepers (e.g. Optuna) can optimize it.
    return metrics.get("val_acc")


def main() -> None:
    _main()
