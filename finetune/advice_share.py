"""``+recipe=auto`` under torchrun/srun/ddp: global rank 0 measures, the other processes follow its advice.

The advice is chosen before ``trainer.fit``, so there is no process group to broadcast it with yet.
It goes through the run directory instead, which every process of a launch already names
(``hydra.run.dir`` is required under torchrun/srun; Lightning's ddp children get the parent's):
rank 0 writes ``advice.json`` (atomically), the others wait for it. A torch ``TCPStore`` would need no
shared filesystem, but no launcher-neutral port exists before the process group: torchrun's store
belongs to its agent, srun has none, and Lightning's ddp picks its port after the advice. So under
multi-node runs the run directory must be on a filesystem every node shares (it is where rank 0 writes
the checkpoints, too).

A stale ``advice.json`` (an earlier run in the same directory, e.g. one stopped by bad input) must not be
followed: each file names its writer (``pid host``, as the run directory's lock does), and a waiting
process takes it only from the process that holds the run directory's lock now.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from finetune.distributed import is_launch_rank_zero
from finetune.errors import FineTuneError, error_line
from finetune.rundir import LOCK_NAME, lock_holder_alive

__all__ = ["ADVICE_FILE", "record_lr", "share_advice"]

ADVICE_FILE = "advice.json"


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()}"  # the lock's own format (finetune.rundir)


def _write(run_dir: Path, content: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{ADVICE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, run_dir / ADVICE_FILE)  # a reader sees the whole file or none


def _rank_zeros(run_dir: Path) -> dict[str, Any] | None:
    """The advice rank 0 of this run wrote, or None while there is none yet (or only an earlier run's)."""
    try:
        holder = (run_dir / LOCK_NAME).read_text().strip()
        content = json.loads((run_dir / ADVICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if content.get("written_by") != holder or not lock_holder_alive(holder):
        return None
    return {k: v for k, v in content.items() if k != "written_by"}


def share_advice(run_dir: str | os.PathLike[str], measure: Callable[[], dict[str, Any]], timeout_s: float,
                 poll_s: float = 0.5) -> dict[str, Any]:
    """The advice of this run: measured here on global rank 0 (and written), read from rank 0 elsewhere.

    Args:
        run_dir: the run directory; rank 0 holds its lock.
        measure: computes the advice (rank 0 only).
        timeout_s: how long another process waits for rank 0 (``advise.wait_timeout_s``).
        poll_s: how often it looks.

    Raises:
        FineTuneError: on another rank, when rank 0 failed to measure or wrote nothing in time.
    """
    run_dir = Path(run_dir)
    if is_launch_rank_zero():
        try:
            advice = measure()
        except Exception as e:
            _write(run_dir, {"error": error_line(e), "written_by": _me()})  # the others stop now, not at timeout
            raise
        _write(run_dir, {**advice, "written_by": _me()})
        return advice
    deadline = time.monotonic() + timeout_s
    while (advice := _rank_zeros(run_dir)) is None:
        if time.monotonic() > deadline:
            raise FineTuneError(
                f"waited {timeout_s:g} s for rank 0's advice ({run_dir / ADVICE_FILE}): rank 0 stopped before "
                "measuring, or hydra.run.dir is not on a filesystem every node shares (advise.wait_timeout_s)")
        time.sleep(poll_s)
    if "error" in advice:
        raise FineTuneError(f"rank 0 could not measure the advice: {advice['error']}")
    return advice


def record_lr(run_dir: str | os.PathLike[str], lr: Any, backbone_lr_mult: float, lr_find: dict[str, Any] | None) -> None:
    """Add the LR the run trained with to its ``advice.json`` (known only after the LR finder ran, in fit).

    Args:
        lr: the config's head LR (a number, or ``find``).
        backbone_lr_mult: the backbone's share of it.
        lr_find: ``metrics.json``'s ``lr_find`` entry, where the finder ran or was skipped.
    """
    path = Path(run_dir) / ADVICE_FILE
    if not path.exists():  # train(..., extra={"recipe": "auto"}) called without the advice: nothing to add to
        return
    content = json.loads(path.read_text())
    found = (lr_find or {}).get("lr")
    content["lr"] = {
        "lr": found if found is not None else (lr if isinstance(lr, (int, float)) else None),
        "backbone_lr_mult": backbone_lr_mult,
        "source": "lr_find" if found is not None else "recipe",
        **({"lr_find": lr_find} if lr_find else {}),
    }
    _write(Path(run_dir), content)
