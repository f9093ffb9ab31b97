"""The real CLI under torchrun: two "nodes" on 127.0.0.1 (gloo, CPU) train as one run.

Rank 0 alone writes the run directory; the weights equal a one-process run with the same global
batch (2 ranks x 4 = 1 process x 8). test_vit has no BatchNorm (LayerNorm is per sample): BatchNorm's
batch statistics would differ per rank, and SyncBatchNorm needs GPUs in torch. SGD, not AdamW: Adam
divides by the root of tiny second moments, which turns float rounding into visible weight changes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # three interpreters importing torch/timm/Lightning: ~2 min on a shared 2-core CPU

COMMON = ["backbone.name=test_vit", "backbone.pretrained=false", "data=folder", "data.num_workers=0", "augment=none",
          "optim=sgd", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1",
          "trainer.enable_progress_bar=false", "seed=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_two_nodes_under_torchrun_train_as_one_process(make_folder, tmp_path: Path) -> None:
    root = make_folder(classes=3, per_class=8, splits=("train", "val"))  # 24 train images: 3 global batches of 8
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = _free_port()
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                          f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                          "-m", "finetune", *COMMON, f"data.root={root}", "data.batch_size=4", "trainer.num_nodes=2",
                          "trainer.strategy=ddp", f"hydra.run.dir={ddp_dir}"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    one = subprocess.run([sys.executable, "-m", "finetune", *COMMON, f"data.root={root}", "data.batch_size=8",
                          f"hydra.run.dir={one_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
    assert one.returncode == 0, one.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]  # the second process really was the second rank
    assert (ddp_dir / "metrics.json").exists() and (ddp_dir / "checkpoints" / "last.ckpt").exists()
    # The only directories are the two runs' and the data: rank 1 made none of its own (no timestamped outputs/).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "images", "one"]
    a, b = _weights(one_dir), _weights(ddp_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
