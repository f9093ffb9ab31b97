"""Where the Hydra configs live, recipe registration, and composing without the CLI.

``conf/`` and ``recipes/`` sit beside the package in a checkout and inside it in a
wheel. ``recipes/`` is not a config group by itself: each file is stored in Hydra's
ConfigStore under group ``recipe`` with package ``_global_``, which is what makes
``+recipe=NAME`` work from any working directory (and avoids Hydra #2511).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["CONF_DIR", "RECIPES_DIR", "compose", "recipe_names", "register_recipes"]

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"finetune is installed without its '{name}' folder")


CONF_DIR = _find("conf")
RECIPES_DIR = _find("recipes")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def register_recipes() -> None:
    """Store every ``recipes/NAME.yaml`` as config ``recipe/NAME`` in the global package."""
    cs = ConfigStore.instance()
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m finetune OVERRIDES`` would run, for Python callers and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_recipes()
    if GlobalHydra.instance().is_initialized():  # inside the CLI (+recipe=auto): use the app's own search path
        return hydra_compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
