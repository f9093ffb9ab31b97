"""What a user sees on the console: one line per epoch in a pipe, no adverts or noise, and every ``--help``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.callbacks import EpochLine
from finetune.callbacks.epoch_line import epoch_line
from finetune.config import compose, recipe_names
from finetune.help import COMMANDS

from conftest import run_cli

EPOCH_LINE = re.compile(r"^epoch \d+/\d+  .*\d+\.\d s$")


def test_a_run_through_a_pipe_prints_one_line_per_epoch_and_no_noise(tmp_path: Path, make_folder) -> None:
    # The default backbone loads the offline package's weights (timm's "Loaded ... from checkpoint" notice).
    root = make_folder(classes=3, per_class=4, splits=("train", "val", "test"))
    r = run_cli(["data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
                 f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out, both = r.stdout, r.stdout + r.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and all(EPOCH_LINE.match(ln) for ln in lines), out
    assert lines[0].startswith("epoch 1/2  train/loss ") and "val/acc " in lines[0] and "%" in lines[0]
    assert "\r" not in out and "it/s" not in both and "Sanity Checking" not in both  # no TQDM bar
    for noise in ("Tip", "litlogger", "litmodels", "LeafSpec", "Loaded", "does not have many workers",
                  "smaller than the logging interval", "Trainable params", "| Name"):
        assert noise not in both, noise
    assert "finetune summary" in out


def test_the_model_summary_and_the_progress_bar_are_settings() -> None:
    cfg = compose([])
    assert cfg.trainer.enable_model_summary is False and cfg.trainer.enable_progress_bar is True
    assert compose(["trainer.enable_model_summary=true"]).trainer.enable_model_summary is True


@pytest.mark.parametrize("progress, tty, expected", [(True, False, "line"), (True, True, "bar"), (False, False, None)])
def test_build_trainer_picks_the_progress_display(tmp_path: Path, monkeypatch, progress: bool, tty: bool,
                                                  expected: str | None) -> None:
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

    from finetune.builders import build_trainer

    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    trainer = build_trainer(compose([f"trainer.enable_progress_bar={progress}"]), tmp_path)
    bar = trainer.progress_bar_callback
    # On a terminal Lightning's own bar: tqdm's, or rich's where `rich` is installed (Lightning's choice).
    kind = "line" if isinstance(bar, EpochLine) else "bar" if isinstance(bar, (TQDMProgressBar, RichProgressBar)) else None
    assert kind == expected


def test_epoch_line_text() -> None:
    line = epoch_line(2, 15, {"train/loss_step": 9.0, "train/loss_epoch": 0.4123, "val/acc": 0.9721}, 12.34)
    assert line == "epoch 3/15  train/loss 0.412  val/acc 97.2%  12.3 s"
    assert epoch_line(0, -1, {}, 1.0) == "epoch 1  1.0 s"


def test_importing_the_library_changes_no_warning_filter() -> None:
    # The console filters are set by the command line entry (finetune.cli.main), not on import.
    code = ("import warnings, logging; import finetune, finetune.cli, finetune.train; "
            "found = [f for f in warnings.filters if f[1] and re.search('LeafSpec|many workers|logging interval', "
            "f[1].pattern)]; assert not found, found; "
            "assert not logging.getLogger('pytorch_lightning.utilities.rank_zero').filters")
    code = "import re; " + code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_import_finetune_loads_neither_lightning_nor_timm_until_a_name_is_used() -> None:
    code = ("import sys, finetune; heavy = ('pytorch_lightning', 'timm', 'torch'); "
            "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]; "
            "assert set(finetune.__all__) == set(finetune._EXPORTS) | {'__version__'}; "
            "assert all(getattr(finetune, n) is not None for n in finetune.__all__); "
            "assert 'pytorch_lightning' in sys.modules; from finetune import FineTuneModule, cam")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# What --help must not wait for: seconds each to import (8-15 s in all, before they were deferred).
HEAVY = ("pytorch_lightning", "lightning_fabric", "timm", "albumentations", "torchmetrics")


def _help(module: str) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE --help``, run by runpy so that the modules it imported can be listed after."""
    code = ("import json, runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            f"print('imported: ' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_answers_help_without_importing_lightning_timm_or_albumentations(command: str) -> None:
    r = _help(command)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imported: []" in r.stderr, r.stderr[-2000:]
    assert f"python -m {command}" in r.stdout
    assert re.search(rf"^\s*(example:?\s*)?python -m {re.escape(command)} \S+=?", r.stdout, re.M | re.I), r.stdout
    assert "Traceback" not in r.stderr and "error" not in r.stderr.lower()


def test_finetune_help_lists_the_commands_the_recipes_and_the_groups() -> None:
    out = _help("finetune").stdout
    for command in COMMANDS:
        assert f"python -m {command} " in out, command
    for name in recipe_names():
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name  # with its one-line why
    assert "powered by Hydra" not in out
    assert "freeze: " in out and "data: " in out and "--cfg job" in out and "--hydra-help" in out


def test_the_config_groups_listed_are_hydras() -> None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from finetune.config import CONF_DIR, register_configs
    from finetune.help import config_groups

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        loader = GlobalHydra.instance().config_loader()
        hydras = {g: sorted(loader.get_group_options(g)) for g in loader.list_groups("") if g != "hydra"}
    assert config_groups() == dict(sorted(hydras.items()))
    assert {"freeze", "data", "recipe", "logger"} <= set(hydras)  # the ConfigStore's and conf/'s


def test_hydra_help_still_shows_hydras_flags() -> None:
    r = subprocess.run([sys.executable, "-m", "finetune", "--hydra-help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--multirun" in r.stdout
