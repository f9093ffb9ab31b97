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

from finetune.budget import budget_clock
from finetune.compare import write_failure
from finetune.config import CONF_DIR, compose, register_configs
from finetune.command import hold_errors, run_app
from finetune.distributed import check_launch, is_launch_rank_zero
from finetune.errors import FineTuneError, error_line
from finetune.help import register_help
from finetune.resume import resume_config
from finetune.rundir import claim_run_dir

register_configs()
register_help()  # the ${finetune_help:finetune} resolver of --help (hydra.help.template in conf/config.yaml)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@hold_errors  # a user error reaches run_hydra as one line, without Hydra's "Error executing job" banner
def _main(cfg: DictConfig) -> float | None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.advise import follow_advice  # here, not above: --help should not wait for Lightning and timm
    from finetune.train import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    # In a sweep, one failed run must not abort the others (Hydra's sweepers re-raise a job's exception):
    # it leaves a failure record for the comparison report, and the sweep goes on.
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        precomputed, extra = [], None
        if cfg.resume:
            cfg, _, extra = resume_config(cfg.resume, [o for o in overrides if not o.startswith("resume=")])
            run_dir = Path(cfg.resume)
        # Nothing is written before the directory is ours: another run may hold it, or a finished one.
        check_launch(in_sweep)
        # budget=: the clock starts before the advice; a bad budget is refused before it.
        with claim_run_dir(run_dir, cfg.overwrite, resuming=bool(cfg.resume)), budget_clock(cfg.get("budget")):
            if not cfg.resume and is_launch_rank_zero():
                _save_hydra_files(run_dir, cfg)
            if cfg.recipe == "auto":
                cfg, extra, precomputed = follow_advice(cfg, overrides, run_dir)
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


def _save_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra writes into ``.hydra/`` (its ``output_subdir``, turned off in conf/config.yaml so it waits for the lock)."""
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")


def run_job(overrides: Sequence[str], run_dir: str | Path) -> dict[str, Any]:
    """What ``python -m finetune OVERRIDES hydra.run.dir=RUN_DIR`` does (``+recipe=auto`` included), from Python."""
    from finetune.advise import follow_advice
    from finetune.train import train

    cfg = compose(overrides)
    precomputed, extra = [], None
    if cfg.recipe == "auto":
        # held through train(): the advice writes first
        with claim_run_dir(run_dir, cfg.overwrite), budget_clock(cfg.get("budget")):
            cfg, extra, precomputed = follow_advice(cfg, list(overrides), run_dir)
            return train(cfg, run_dir, precomputed, extra)
    return train(cfg, run_dir, precomputed, extra)


# Warnings the user of the command cannot act on (regexes matched at the start of the message).
_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of a torch API
    r".*does not have many workers",  # num_workers is a data option; the default suits the bundled data
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # small data: fine
    r"Your `IterableDataset` has `__len__` defined",  # data=webdataset: exact per rank (finetune.data.streaming)
)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_console() -> None:
    """What ``python -m finetune`` leaves off the console: adverts, warnings nobody can act on, load notices.

    Set by the command line entry only: importing the library changes no warning filter or logger.
    """
    import warnings

    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    # Lightning's "💡 Tip: ... litlogger / litmodels" adverts (rank_zero_info; no setting turns them off).
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropMessages("💡 Tip", "Tip:"))
    # timm's "Loaded  from checkpoint '<site-packages path>'" when the offline package's weights load.
    for name in ("timm.models._helpers", "timm.task._helpers"):
        logging.getLogger(name).addFilter(_DropMessages("Loaded "))


def main() -> None:
    quiet_console()
    # Shard patterns (train-{000000..000009}.tar) taken as typed: Hydra's grammar would read the braces as a dict.
    run_app(_main, literal_keys=("data.urls", "data.val_urls", "data.test_urls"), help_command="finetune")
