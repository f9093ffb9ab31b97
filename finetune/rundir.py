"""One run per run directory: a lock held while it runs, and no silent reuse of a finished run.

Two runs writing into one directory wreck each other (the CSV logger and the checkpoints
of one, the config of the other). A run takes ``RUN/.lock`` (created exclusively, holding
its pid and host) before it writes anything, and refuses a directory that another live
process holds; a lock left by a process that died is stale and taken over. A directory
that already holds a run's files is refused too, unless the user says ``overwrite=true``
(the old run's files are then removed first, so no ``last-v1.ckpt`` appears beside them)
or resumes that run (``resume=RUN``).
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from finetune.distributed import is_launch_rank_zero
from finetune.errors import FineTuneError

__all__ = ["LOCK_NAME", "RUN_FILES", "claim_run_dir", "holds_a_run", "lock_holder_alive"]

LOCK_NAME = ".lock"
# What a run writes into its directory (Hydra's .hydra/ included), removed by overwrite=true.
RUN_FILES = ("config.yaml", "metrics.json", "epochs.csv", "advice.json", "classes.json", "bad_images.txt",
             "checkpoints", "logs", ".hydra")
# What shows that a run trained or reported here; a run stopped by bad input before training leaves only
# its config, which the next run may replace.
_EVIDENCE = ("metrics.json", "epochs.csv", "checkpoints", "logs")


def holds_a_run(run_dir: Path) -> list[str]:
    """The files that show a run trained or reported in ``run_dir`` (empty: none did)."""
    return [name for name in _EVIDENCE if (run_dir / name).exists()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def lock_holder_alive(holder: str) -> bool:
    """Whether the process a lock names (``pid host``) may be running: alive here, or on another host (unknowable)."""
    pid_text, _, host = holder.partition(" ")
    if host.strip() != socket.gethostname():
        return True
    return pid_text.isdigit() and _alive(int(pid_text))


def _take_lock(path: Path) -> None:
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, _, host = path.read_text().partition(" ")
                pid, host = int(pid_text), host.strip()
            except (OSError, ValueError):
                pid, host = -1, ""
            if pid == os.getpid():
                return  # this process holds it already (e.g. +recipe=auto took it before train())
            if host and host != socket.gethostname():
                raise FineTuneError(f"run directory '{path.parent}' is locked by pid {pid} on host {host} "
                                    f"({path}); if that run is gone, delete the lock file") from None
            if pid > 0 and _alive(pid):
                raise FineTuneError(f"run directory '{path.parent}' is in use by a running process (pid {pid}, "
                                    f"lock {path}); choose another hydra.run.dir") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return
    raise FineTuneError(f"cannot lock run directory '{path.parent}' ({path})")


@contextmanager
def claim_run_dir(run_dir: str | os.PathLike[str], overwrite: bool = False, resuming: bool = False) -> Iterator[Path]:
    """Lock ``run_dir`` for this run, refusing it if another run holds it or (unless told) has finished in it.

    Args:
        run_dir: the run directory (created if missing).
        overwrite: remove the files of a run already there instead of refusing.
        resuming: the directory's run is being continued: its files are expected and kept.
    """
    run_dir = Path(run_dir)
    if not is_launch_rank_zero():  # another process of this run (torchrun, srun, ddp) holds it and writes
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    held_before = lock.exists() and lock.read_text().split(" ")[0] == str(os.getpid())
    _take_lock(lock)
    try:
        found = [] if resuming or held_before else holds_a_run(run_dir)
        if found and not overwrite:
            raise FineTuneError(
                f"run directory '{run_dir}' already holds a run ({', '.join(found)}); pass overwrite=true to "
                f"replace it, resume={run_dir} to continue it, or choose another hydra.run.dir"
            )
        for name in RUN_FILES if found else ():
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        yield run_dir
    finally:
        if not held_before:
            lock.unlink(missing_ok=True)
