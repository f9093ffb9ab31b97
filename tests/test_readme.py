"""Every command-line example of README.md runs as typed, with tiny settings added.

A user copies these lines first; one that fails cannot stay in the README. Each example runs
in-process (the command's own ``main`` on its own argv, parsed with ``shlex`` as a shell would,
so ``~`` after ``key=`` reaches the program unexpanded) in a fresh working directory, with a
``HOME`` that holds the files the examples name (``~/photos``, ``~/new_photos``,
``~/w.safetensors``, ``~/labels.csv``). Tiny settings keep each run to a few batches: they change
how long, never which code runs. ``outputs/DATE/TIME`` is a run of the README's own folder example.
"""

from __future__ import annotations

import csv
import importlib
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image

README = Path(__file__).resolve().parents[1] / "README.md"
# A few batches per stage: the whole pipeline runs, briefly.
TINY = {"trainer.max_epochs": "1", "+trainer.limit_train_batches": "2", "+trainer.limit_val_batches": "2",
        "+trainer.limit_test_batches": "2", "trainer.enable_progress_bar": "false", "optim.find_num_training_steps": "30"}
# Small images: the backbone's 224 px (folders) or digits' 64 px are slow on a CPU and test nothing more.
TINY_DATA = {"data.image_size": "32"}
# Examples naming a backbone whose ImageNet weights come from the hub: the same network, random weights.
OFFLINE_WEIGHTS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def readme_commands(text: str | None = None) -> list[str]:
    """The ``python -m finetune...`` and ``finetune ...`` commands of the README's bash blocks, as typed."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                python_m = words[:2] == ["python", "-m"] and len(words) > 2 and words[2].split(".")[0] == "finetune"
                if python_m or words[:1] == ["finetune"]:
                    commands.append(" ".join(words))
    return commands


def _tiny(args: list[str]) -> list[str]:
    """A training example's arguments with the tiny settings added (its own values kept, its epochs cut to one)."""
    if "--help" in args or "--cfg" in args:
        return args
    args = [a for a in args if not a.startswith("trainer.max_epochs=")]  # an example's 20 epochs: one
    # A budget is filled by design (the planner picks epochs to use it): an example's 10 minutes, 25 seconds.
    args = ["budget=25s" if a.startswith("budget=") else a for a in args]
    given = {a.partition("=")[0].lstrip("+") for a in args}
    extra = {k: v for k, v in {**TINY, **TINY_DATA}.items() if k.lstrip("+") not in given}
    name = next((a.partition("=")[2] for a in args if a.startswith("backbone.name=")), None)
    if name and name not in OFFLINE_WEIGHTS:
        extra["backbone.pretrained"] = "false"
    return [*args, *(f"{k}={v}" for k, v in extra.items())]


def run_example(line: str, run_dir: str) -> None:
    """Run one README command line in-process; SystemExit with a non-zero code fails."""
    words = shlex.split(line.replace("outputs/DATE/TIME", run_dir))
    module, args = ("finetune", words[1:]) if words[0] == "finetune" else (words[2], words[3:])
    if module == "finetune":
        args = _tiny(args)
    main = importlib.import_module("finetune.cli" if module == "finetune" else module).main
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), f"{line}: exit {e.code}"
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME with what the README's examples name: photo folders, a weights file, a CSV listing."""
    import timm
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("home")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        for i in range(12):
            write_image(home / "photos" / name / f"{i}.png", rng, size=32, color=c)
    for i in range(3):
        write_image(home / "new_photos" / f"{i}.png", rng, size=32, color=i)
    with (home / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted((home / "photos").rglob("*.png")):
            w.writerow([p.relative_to(home), p.parent.name])
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, home / "w.safetensors")
    return home


@pytest.fixture(scope="module")
def workdir(home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A working directory, and a tiny run of the README's folder example in it (``outputs/DATE/TIME``)."""
    work = tmp_path_factory.mktemp("work")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    mp.chdir(work)
    try:
        run_example("python -m finetune data=folder data.root=~/photos hydra.run.dir=outputs/readme/run", "")
    finally:
        mp.undo()
    return work, "outputs/readme/run"


def test_the_readme_has_the_examples_a_newcomer_needs() -> None:
    commands = readme_commands()
    # The first page: install, own folder with ~, predictions, evaluation, comparison, help.
    for needed in ("python -m finetune data=folder data.root=~/photos", "python -m finetune.predict ckpt=",
                   "python -m finetune.evaluate ckpt=", "+recipe=compare", "python -m finetune --help"):
        assert any(c.startswith(needed) or needed in c for c in commands), needed


@pytest.mark.parametrize("line", readme_commands())
def test_readme_example_runs(line: str, home: Path, workdir: tuple[Path, str], monkeypatch, capsys) -> None:
    if "data=fashion_mnist" in line and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    work, run_dir = workdir
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    run_example(line, run_dir)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "error:" not in err, err[-2000:]
    assert "Tip:" not in out + err  # Lightning's adverts stay off the console


def test_tilde_paths_are_the_users_home(home: Path, workdir: tuple[Path, str], monkeypatch) -> None:
    """``~`` after ``key=`` is expanded by the program (the shell does not), quoted against Hydra's grammar."""
    from finetune.argv import expand_home

    monkeypatch.setenv("HOME", str(home))
    assert expand_home(["data.root=~/photos", "images=~/a.png,~/b.png", "x=[~/a,~/b]", "~callbacks.lr_monitor",
                        "y='~/literal'", "a=b~c"]) == [
        f"data.root='{home}/photos'", f"images={home}/a.png,{home}/b.png", f"x=[{home}/a,{home}/b]",
        "~callbacks.lr_monitor", "y='~/literal'", "a=b~c"]
    monkeypatch.setenv("HOME", str(home / "it's ${odd}"))
    assert expand_home(["data.root=~/p"]) == [f"data.root='{home}/it\\'s \\${{odd}}/p'"]
