"""Greedy soups (finetune.soup, ``python -m finetune.compare DIR --soup``): the recipe, and soups of tiny runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.soup import greedy_soup

TINY = ["data=folder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=6", "trainer.max_epochs=1",
        "calibrate=false"]


def test_greedy_soup_adds_what_does_not_lower_val_accuracy_and_averages_exactly() -> None:
    states = {"a": {"w": torch.tensor([1.0]), "n": torch.tensor(4)}, "b": {"w": torch.tensor([3.0]), "n": torch.tensor(9)},
              "c": {"w": torch.tensor([100.0]), "n": torch.tensor(1)}}

    def val_acc(s: dict[str, torch.Tensor]) -> float:  # best at w = 2: a and b alone tie, their average is better
        return 0.9 - 0.001 * abs(float(s["w"]) - 2.0)

    soup = greedy_soup(states, val_acc)
    assert soup.kept == ["a", "b"]  # c alone is worst, and with it the average (w 34.7) scores lower
    assert torch.equal(soup.state["w"], torch.tensor([2.0])) and int(soup.state["n"]) == 4  # integers: the first's
    assert soup.val_acc == pytest.approx(0.9)
    assert [(s["run"], s["kept"]) for s in soup.steps] == [("a", True), ("b", True), ("c", False)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny runs of one start: two linear heads at two LRs, and an MLP head (other parameters)."""
    from conftest import write_folder
    from finetune.config import compose
    from finetune.train import train

    base = tmp_path_factory.mktemp("soup")
    write_folder(base / "images", per_class=6, splits=("train", "val", "test"))
    for name, extra in (("0", ["optim.lr=0.01"]), ("1", ["optim.lr=0.003"]), ("2", ["head=mlp"])):
        train(compose([*TINY, f"data.root={base / 'images'}", *extra]), base / "sweep" / name)
    return base / "sweep"


def _last(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "comparison.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_soup_of_one_run_is_that_run(sweep: Path, tmp_path: Path) -> None:
    from finetune.compare import main
    from finetune.evaluate import EvaluateConfig, evaluate

    one = tmp_path / "one"
    shutil.copytree(sweep / "0", one / "0")
    main([str(one), "--soup"])
    ckpt = one / "soup" / "checkpoints" / "soup.ckpt"
    soup = torch.load(ckpt, weights_only=True)["state_dict"]
    last = _last(one / "0")
    assert soup.keys() == last.keys() and all(torch.equal(soup[k], last[k]) for k in last)
    row = _rows(one)[-1]
    assert row["run"] == "soup (0)"
    for split in ("val", "test"):
        alone = evaluate(EvaluateConfig(ckpt=str(one / "0" / "checkpoints" / "last.ckpt"), split=split,
                                        out_dir=str(tmp_path / "e")))["top1"]
        souped = evaluate(EvaluateConfig(ckpt=str(ckpt), split=split, out_dir=str(tmp_path / "e")))["top1"]
        assert float(row[f"{split}_acc"]) == pytest.approx(alone, abs=1e-6) and souped == alone


def test_a_sweep_soup_averages_what_it_keeps_and_states_what_it_skipped(sweep: Path) -> None:
    from finetune.compare import main
    from finetune.module import FineTuneModule

    main([str(sweep), "--soup"])
    report = json.loads((sweep / "soup" / "soup.json").read_text())
    assert [s["run"] for s in report["skipped"]] == ["2"] and "different parameters" in report["skipped"][0]["reason"]
    kept = report["kept"]
    assert sorted(kept) in (["0"], ["1"], ["0", "1"])
    module = FineTuneModule.load_from_checkpoint(sweep / "soup" / "checkpoints" / "soup.ckpt", map_location="cpu")
    expected = {k: sum(_last(sweep / n)[k] for n in kept) / len(kept) for k in _last(sweep / "0")}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k])
    rows = _rows(sweep)
    assert [r["run"] for r in rows] == ["0", "1", "2", f"soup ({'+'.join(kept)})"]
    assert float(rows[-1]["val_acc"]) == pytest.approx(report["val"]["acc"])
    md = (sweep / "comparison.md").read_text()
    assert "Greedy soup" in md and "1 run(s) not in the soup: 2 (" in md
