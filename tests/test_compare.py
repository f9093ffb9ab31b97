"""Sweeps side by side: the report a multirun leaves, failed runs in it, rebuilding it, same seed same result."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from finetune.compare import collect_runs, main, report_rows
from finetune.config import compose
from finetune.train import train


TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false"]
# A sweep checks the report, not the training: a few batches of each split are enough.
FEW_BATCHES = ["+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "comparison.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _sweep(cli, tmp_path: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A sweep through the command line's main(), in this process (``cli``: tests/conftest.py)."""
    sweep = tmp_path / "sweep"
    r = cli([*args, *TINY, *FEW_BATCHES, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep, r


def _assert_rows_are_the_runs_metrics(sweep: Path, rows: list[dict[str, str]]) -> None:
    """Each number in a finished run's row is the one in that run's own metrics.json, unchanged."""
    for row in rows:
        metrics = json.loads((sweep / row["run"] / "metrics.json").read_text())
        for key in ("val_acc", "val_top5", "test_acc", "test_top5", "trainable_params", "train_time_s",
                    "train_images_per_s", "peak_memory_mb", "epochs"):
            assert float(row[key]) == metrics[key], (row["run"], key)


def _torch_import_rss_mb() -> float:
    """Peak RSS of a Python that only imports torch: less than any process that also trains a model."""
    code = "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1]) / 2**10  # KiB on Linux


def test_sweep_writes_the_comparison_and_compare_rebuilds_it(tmp_path: Path, cli) -> None:
    start = time.perf_counter()
    sweep, r = _sweep(cli, tmp_path, "--multirun", "freeze=head_only,top_stages,none")
    sweep_wall_time_s = time.perf_counter() - start
    for name in ("comparison.csv", "comparison.md", "comparison.png"):
        assert (sweep / name).stat().st_size > 0, name
    rows = _rows(sweep)
    assert [(row["run"], row["freeze"], row["status"]) for row in rows] == [
        ("0", "head_only", "ok"), ("1", "top_stages", "ok"), ("2", "none", "ok")]
    _assert_rows_are_the_runs_metrics(sweep, rows)
    # 4 batches of 1 epoch are too few to beat chance (1/10), so the baselines are measured independently.
    torch_rss_mb = _torch_import_rss_mb()
    physical_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    for row in rows:
        for split in ("val", "test"):  # a top-1 hit is a top-5 hit
            assert float(row[f"{split}_top5"]) >= float(row[f"{split}_acc"]), (row["run"], split)
        # Images/s is the images trained (limit_train_batches=4 full batches) over train_time_s, up to rounding.
        images = 4 * OmegaConf.load(sweep / row["run"] / "config.yaml").data.batch_size
        t = float(row["train_time_s"])
        assert images / (t + 0.005) - 0.05 <= float(row["train_images_per_s"]) <= images / max(t - 0.005, 1e-9) + 0.05
        # MiB, not KiB or bytes: a good part of what importing torch takes (a peak reset between the sweep's
        # runs can come out just under a fresh process's), and less than the machine has.
        assert torch_rss_mb / 2 < float(row["peak_memory_mb"]) < physical_mb
        assert row["epochs"] == "1" and row["error"] == ""
    # Training happens inside the sweep: seconds, not milliseconds or minutes.
    assert 0 < sum(float(row["train_time_s"]) for row in rows) < sweep_wall_time_s
    # Only what was swept becomes a column: the tiny-model overrides are the same in every run.
    assert "backbone.name" not in rows[0] and "data.image_size" not in rows[0]
    # head_only trains timm's classifier alone, none every parameter (digits: 10 classes), counted by timm itself.
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    head_params = sum(p.numel() for p in model.get_classifier().parameters())
    all_params = sum(p.numel() for p in model.parameters())
    assert [int(row["trainable_params"]) for row in (rows[0], rows[2])] == [head_params, all_params]
    assert head_params < int(rows[1]["trainable_params"]) < all_params
    md = (sweep / "comparison.md").read_text()
    assert md.count("\n| ") == 4 and "| head_only | ok |" in md  # header + 3 rows
    md_rows = [line for line in md.splitlines() if line.startswith("| ") and "| ok |" in line]
    for row, line in zip(rows, md_rows, strict=True):  # accuracies as percentages of the CSV's fractions
        for key in ("val_acc", "val_top5", "test_acc", "test_top5"):
            assert f" {100 * float(row[key]):.2f}%" in line.replace("**", " "), (row["run"], key, line)
    assert "Comparison of 3 runs" in r.stdout  # printed at the end of the sweep

    before = {name: (sweep / name).read_text() for name in ("comparison.csv", "comparison.md")}
    for name in before:
        (sweep / name).unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "finetune.compare", str(sweep)], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert {name: (sweep / name).read_text() for name in before} == before


def test_a_failed_run_is_listed_and_the_sweep_goes_on(tmp_path: Path, cli) -> None:
    # freeze=patterns without patterns passes Hydra and fails inside train() with a FineTuneError.
    sweep, r = _sweep(cli, tmp_path, "--multirun", "freeze=patterns,head_only")
    assert "error: freeze=patterns needs freeze.trainable" in r.stderr  # shown when it happens, not only at the end
    rows = _rows(sweep)
    assert [(row["freeze"], row["status"]) for row in rows] == [("patterns", "failed"), ("head_only", "ok")]
    assert rows[0]["error"] == "freeze=patterns needs freeze.trainable and/or freeze.frozen patterns"
    assert rows[0]["val_acc"] == ""
    assert float(rows[1]["val_acc"]) == json.loads((sweep / "1" / "metrics.json").read_text())["val_acc"]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "failed"
    md = (sweep / "comparison.md").read_text()
    assert "| failed |" in md and "1 of 2 runs did not finish" in md
    assert (sweep / "comparison.png").exists()


def test_recipe_compare_sweeps_the_standard_strategies_without_multirun_flag(tmp_path: Path, cli) -> None:
    sweep, _ = _sweep(cli, tmp_path, "+recipe=compare")
    rows = _rows(sweep)
    assert [row["freeze"] for row in rows] == ["none", "head_only", "top_stages", "gradual", "lp_ft", "bitfit", "norm", "lora"]  # the registry's
    assert all(row["status"] == "ok" for row in rows)
    assert all(json.loads((sweep / row["run"] / "metrics.json").read_text())["recipe"] == "compare" for row in rows)


def _write_run(path: Path, overrides: list[str], metrics: dict | None, epochs: tuple[float, ...] = ()) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if epochs:
        (path / "epochs.csv").write_text("epoch,val/acc\n" + "".join(f"{i},{a}\n" for i, a in enumerate(epochs)))


def test_report_from_run_dirs_of_an_interrupted_sweep(tmp_path: Path) -> None:
    ok = {"status": "ok", "val_acc": 0.9, "trainable_params": 10, "train_time_s": 1.0, "epochs": 2}
    _write_run(tmp_path / "10", ["freeze=none", "optim.lr=0.1", "hydra.verbose=true"], ok, (0.5, 0.9))
    _write_run(tmp_path / "2", ["freeze=head_only", "optim.lr=0.1"], {"val_acc": 0.8})  # before status was written
    _write_run(tmp_path / "3", ["freeze=gradual", "optim.lr=0.1"], None)  # interrupted: no metrics.json
    runs = collect_runs(tmp_path)
    columns, rows = report_rows(runs)
    assert [r.name for r in runs] == ["2", "3", "10"]  # job numbers, not strings
    assert columns[:3] == ["run", "freeze", "status"]  # optim.lr is the same everywhere, hydra.* never shown
    assert [row["status"] for row in rows] == ["ok", "incomplete", "ok"]
    assert runs[2].val_acc_by_epoch == [(0, 0.5), (1, 0.9)]


def test_compare_cli_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: '{tmp_path / 'missing'}' is not a directory"
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no run directories" in capsys.readouterr().err


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_same_seed_and_config_give_the_same_result_on_cpu(tmp_path: Path) -> None:
    # The random resized crops come from albumentations' own RNG: unseeded, two runs trained on
    # different crops and disagreed on val accuracy.
    cfg = compose([*TINY, "trainer.accelerator=cpu", "+trainer.limit_train_batches=8"])  # 512 shuffled, cropped images
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    assert (a["val_acc"], a["val_loss"], a["test_acc"]) == (b["val_acc"], b["val_loss"], b["test_acc"])
    wa, wb = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
