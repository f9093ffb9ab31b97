"""Finding unreadable images before they stop a run: corrupt, truncated or not images at all.

The scan does not decode pixels where a cheaper check is decisive: PNG chunks and their
CRCs (PIL's ``verify``), JPEG's end-of-image marker at the file's end, GIF's trailer, WebP's
RIFF size, and for uncompressed formats (BMP, PPM, PGM, raw TIFF) the pixel data the header
promises against the file's size. Anything else, or a file a cheap check doubts, is decoded
in full, so a file is only reported if PIL cannot read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from finetune.data.sources import DataSplits, Split
from finetune.errors import FineTuneError

__all__ = [
    "ON_BAD_IMAGE", "check_on_bad_image", "check_split_images", "image_problem", "scan_images", "write_bad_images",
]

ON_BAD_IMAGE = ("error", "skip")


def check_on_bad_image(value: str) -> str:
    """``value`` if it is a known ``on_bad_image`` policy; else a one-line error."""
    if value not in ON_BAD_IMAGE:
        raise FineTuneError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got '{value}'")
    return value

# A JPEG is cheaply "ok" only when its last bytes, but for zero padding, are the end-of-image marker
# FF D9. Searching for FF D9 near the end is not enough: a camera photo's EXIF thumbnail (in APP1,
# before the scan data) ends with its own FF D9, which a truncated photo keeps. Files with other
# data after the marker (phone trailers, appended videos) are decoded in full: PIL reads them fine.
_JPEG_TAIL = 4096
_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 24, "RGBA": 32, "CMYK": 32, "I;16": 16, "I;16B": 16, "I": 32, "F": 32}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _tail(path: Path, size: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, size - n))
        return f.read()


def _jpeg_ends(path: Path, size: int) -> bool:
    """Whether the file ends with JPEG's end-of-image marker, zero padding aside."""
    return _tail(path, size, _JPEG_TAIL).rstrip(b"\x00").endswith(b"\xff\xd9")


def _raw_end(img: Image.Image) -> int | None:
    """Byte offset where an uncompressed image's pixel data ends, or None if not that simple."""
    tiles = getattr(img, "tile", None) or []
    if not tiles or any(t[0] != "raw" for t in tiles):
        return None
    end = 0
    for t in tiles:
        (x0, y0, x1, y1), offset = t[1], t[2]
        rawmode = t[3][0] if isinstance(t[3], tuple) else t[3]
        bits = _BITS.get(rawmode) or _BITS.get(img.mode)
        if bits is None:
            return None
        # Rows may be padded (BMP pads to 4 bytes); the unpadded size is the lower bound we need.
        end = max(end, offset + ((x1 - x0) * bits + 7) // 8 * (y1 - y0))
    return end


def _cheap_verdict(path: Path, size: int) -> str | None:
    """``"ok"``, a problem, or None when only a full decode can tell."""
    with Image.open(path) as img:
        fmt = img.format
        if img.width <= 0 or img.height <= 0:
            return f"{fmt} header gives a {img.width}x{img.height} image"
        raw_end = _raw_end(img) if fmt != "PNG" else None
        if fmt == "PNG":
            img.verify()  # walks every chunk to IEND, checking CRCs: catches truncation and corruption
            return "ok"
    if raw_end is not None:
        return "ok" if raw_end <= size else f"truncated: {fmt} header promises {raw_end} bytes, file has {size}"
    if fmt == "JPEG":
        return "ok" if _jpeg_ends(path, size) else None
    if fmt == "GIF":
        return "ok" if _tail(path, size, 1) == b";" else None
    if fmt == "WEBP":
        with path.open("rb") as f:
            head = f.read(8)
        declared = int.from_bytes(head[4:8], "little") + 8
        return "ok" if declared <= size else f"truncated: WebP header promises {declared} bytes, file has {size}"
    return None


def image_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an image (one line), or None if it can."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot read: {_one_line(e)}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        verdict = _cheap_verdict(path, size)
        if verdict is None:
            with Image.open(path) as img:
                img.load()
            verdict = "ok"
    except Image.UnidentifiedImageError:
        return "not an image (PIL cannot identify it)"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on broken files
        return _one_line(e)
    return None if verdict == "ok" else verdict


def scan_images(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """The unreadable files among ``paths``, each with why, in the order given."""
    bad: list[tuple[Path, str]] = []
    for p in paths:
        problem = image_problem(p)
        if problem is not None:
            bad.append((Path(p), problem))
    return bad


def write_bad_images(bad: list[tuple[Path, str]], path: str | os.PathLike[str]) -> None:
    """``bad_images.txt``: one ``PATH<TAB>why`` line per unreadable image."""
    Path(path).write_text("".join(f"{p}\t{why}\n" for p, why in bad))


def _dropped(item: object, drop: set[str]) -> bool:
    return isinstance(item, (str, os.PathLike)) and os.fspath(item) in drop


def check_split_images(splits: DataSplits, on_bad_image: str = "error") -> tuple[DataSplits, list[tuple[Path, str]]]:
    """Scan the path items of every split; stop at unreadable images, or leave them out.

    Args:
        splits: the source's splits; in-memory array items are not scanned.
        on_bad_image: ``error`` (raise, naming the first bad file and the count) or ``skip``.

    Returns:
        The splits without the unreadable files (with a note saying so), and the files with
        why, for the caller to write with :func:`write_bad_images`.
    """
    check_on_bad_image(on_bad_image)
    paths = [item for s in splits.splits.values() for item in s.items if isinstance(item, (str, os.PathLike))]
    bad = scan_images(paths)
    if not bad:
        return splits, []
    if on_bad_image == "error":
        first, why = bad[0]
        raise FineTuneError(
            f"unreadable image '{first}': {why} ({len(bad)} unreadable image(s) in the data; "
            "on_bad_image=skip trains without them)"
        )
    drop = {os.fspath(p) for p, _ in bad}
    kept: dict[str, Split] = {}
    for name, s in splits.splits.items():
        idx = np.asarray([i for i, item in enumerate(s.items) if not _dropped(item, drop)], dtype=np.int64)
        if len(idx) == 0:
            raise FineTuneError(f"every image of the {name} split is unreadable (first: '{bad[0][0]}')")
        kept[name] = s.subset(idx)
    notes = [*splits.notes, f"skipped {len(bad)} unreadable image(s); listed in bad_images.txt"]
    return DataSplits(splits.name, splits.classes, kept, notes), bad
