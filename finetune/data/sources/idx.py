"""Reading IDX files, the format of MNIST and Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from finetune.errors import FineTuneError

__all__ = ["read_idx"]


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not, as a uint8 array.

    The header is two zero bytes, the type code ``0x08`` (unsigned byte), the number of
    dimensions, then each dimension as a big-endian int32.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise FineTuneError(f"cannot read IDX file '{path}': {e}") from None
    magic = raw[:4]
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise FineTuneError(
            f"'{path}' is not an IDX file of {ndim}-d unsigned bytes (magic {magic.hex() or 'missing'}, "
            f"expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FineTuneError(f"IDX file '{path}' is truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) - header != int(np.prod(shape)):
        raise FineTuneError(
            f"IDX file '{path}' holds {len(raw) - header} bytes of data; its header {shape} says {int(np.prod(shape))}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
