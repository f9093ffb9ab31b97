"""Writing checkpoints so a crash never leaves a partial one, and reading them without running code.

Lightning's own ``TorchCheckpointIO`` stages a checkpoint in ``$TMPDIR`` and moves it; when
``$TMPDIR`` is another filesystem the move is a copy, and a kill during it leaves the target
empty or partial (and the staging file behind). :class:`~finetune.checkpoint_plugin.AtomicCheckpointIO` writes a
temporary file beside the target (same filesystem), fsyncs it, renames it over the target
and fsyncs the directory: at every moment the target is the old complete file or the new
complete one. A failed write (a full disk, a file-size limit) removes the temporary file,
leaves the old target as it was and raises a one-line :class:`FineTuneError` naming the path.
(:class:`AtomicCheckpointIO` is in :mod:`finetune.checkpoint_plugin`: it subclasses Lightning's, and
reading a checkpoint, as ``predict`` and ``export`` do, should not wait seconds for Lightning to import.)

:func:`safe_load` reads a checkpoint or weights file with ``weights_only=True`` (nothing in it
is executed) and explains a failure in one line: :func:`load_error_reason`.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FineTuneError

__all__ = ["atomic_save", "load_error_reason", "os_error_text", "safe_load"]

_TMP_SUFFIX = ".tmp"


def os_error_text(e: OSError) -> str:
    """``[Errno 28] No space left on device``: the error without the file name Python may append."""
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists but is someone else's
        return True
    return True


def _remove_orphans(target: Path) -> None:
    """Temporary files of ``target`` left by a writer that was killed (its pid is gone)."""
    prefix = _temp_prefix(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                os.unlink(target.parent / name)
            except OSError:
                pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` through a fsynced temporary file beside it and ``os.replace``.

    Raises:
        FineTuneError: the file cannot be written (full disk, file-size limit, permissions);
            the previous ``path``, if any, is unchanged and no temporary file is left.
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialized first: an error while writing is then the disk's, with its errno
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(target)
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=_TMP_SUFFIX,
                                   dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    except OSError as e:
        raise FineTuneError(f"cannot write checkpoint '{target}': {os_error_text(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# -- reading -------------------------------------------------------------------------------
_CORRUPT = "truncated or corrupt, or not a PyTorch file"


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_error_reason(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words a user can act on (no torch boilerplate).

    A loader that wraps torch's error (timm does) is seen through: the innermost cause is explained.
    """
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e)
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, OSError):
        return os_error_text(e)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"holds Python objects, not only tensors ({found.group(1)}); refused without running "
                    "anything (only files of tensors and plain data are loaded)")
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
        return f"{_CORRUPT} ({detail.group(1) if detail else 'the unpickler refused it'}); nothing in it was run"
    if "PytorchStreamReader" in text or "zip archive" in text:
        detail = re.search(r"PytorchStreamReader failed ([^.]+)", text)
        return f"truncated or corrupt ({detail.group(1) if detail else _first_line(text)})"
    if isinstance(e, (EOFError, KeyError, ValueError, IndexError)) or type(e).__name__ == "UnpicklingError":
        return f"{_CORRUPT} ({type(e).__name__}{': ' + _first_line(text) if text.strip() else ''})"
    return _first_line(text) or type(e).__name__


def safe_load(path: str | os.PathLike[str], what: str = "checkpoint", mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped when the format allows).

    Raises:
        FineTuneError: one line naming ``what`` and ``path`` and why it cannot be read.
    """
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size == 0:
            raise FineTuneError(f"cannot load {what} '{p}': the file is empty (0 bytes): truncated or corrupt")
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not support: we explain
            warnings.filterwarnings("ignore", message=r".*Detected pickle protocol.*")
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
            # Not a zip archive: torch's legacy format (still loadable, without mmap), or not torch at all.
            return torch.load(p, map_location="cpu", weights_only=True)
    except FineTuneError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure to parse is explained in one line
        raise FineTuneError(f"cannot load {what} '{p}': {load_error_reason(e)}") from None
