"""How fast is the scan for unreadable images, and the check for copies across splits?

    python benchmarks/scan.py [--images 1000] [--size 320]

Camera-like JPEG files (``--size`` px, with a 64 px EXIF thumbnail in APP1, as cameras and phones
write them), scanned three ways: the scan with its JPEG rule before this change (an end-of-image
marker anywhere in the last 64 KiB: the thumbnail's own marker fools it), the scan now (the marker
must end the file, else a full decode), and a full decode of every file. Also how many of 100
truncated copies each one catches, and the time of ``find_duplicates`` on the folder, on same-size files (every file
hashed), and on the in-memory digits and Fashion-MNIST arrays.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def exif_with_thumbnail(thumb: bytes) -> bytes:
    """An APP1 segment: TIFF header, IFD0 (orientation 1), IFD1 pointing at the JPEG ``thumb``."""
    ifd1_at = 8 + 2 + 12 + 4
    thumb_at = ifd1_at + 2 + 3 * 12 + 4
    ifd0 = struct.pack("<HHHII", 1, 0x0112, 3, 1, 1) + struct.pack("<I", ifd1_at)
    ifd1 = (struct.pack("<H", 3) + struct.pack("<HHII", 0x0103, 3, 1, 6) + struct.pack("<HHII", 0x0201, 4, 1, thumb_at)
            + struct.pack("<HHII", 0x0202, 4, 1, len(thumb)) + struct.pack("<I", 0))
    body = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumb
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def camera_jpeg(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)).resize((size, size))
    thumb, main = io.BytesIO(), io.BytesIO()
    img.resize((64, 64)).save(thumb, "JPEG", quality=80)
    img.save(main, "JPEG", quality=90)
    return main.getvalue()[:2] + exif_with_thumbnail(thumb.getvalue()) + main.getvalue()[2:]


def scan_before(path: Path) -> str | None:
    """The scan with the JPEG rule it had before: an FF D9 anywhere in the last 64 KiB passes."""
    from finetune.data import scan

    def marker_in_tail(path: Path, size: int) -> bool:
        return b"\xff\xd9" in scan._tail(path, size, 64 * 1024)

    rule, scan._jpeg_ends = scan._jpeg_ends, marker_in_tail
    try:
        return scan.image_problem(path)
    finally:
        scan._jpeg_ends = rule


def full_decode(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:
        return str(e)
    return None


def rate(check: Callable[[Path], str | None], paths: list[Path], repeat: int = 3) -> tuple[float, int]:
    """Best images/s of ``repeat`` passes, and how many files ``check`` reported."""
    best, bad = 0.0, 0
    for _ in range(repeat):
        start = time.perf_counter()
        bad = sum(check(p) is not None for p in paths)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best, bad


def seconds(fn: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    from finetune.data.duplicates import find_duplicates
    from finetune.data.scan import image_problem
    from finetune.data.sources import digits, fashion_mnist, folder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scan.json"))
    args = p.parse_args()

    root = Path(tempfile.mkdtemp())
    paths = []
    for i in range(args.images):
        split = "val" if i % 5 == 0 else "train"
        path = root / "photos" / split / f"class_{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(camera_jpeg(args.size, i))
        paths.append(path)
    truncated = []
    for i, src in enumerate(paths[:100]):
        data = src.read_bytes()
        truncated.append(root / "truncated" / f"{i}.jpg")
        truncated[-1].parent.mkdir(parents=True, exist_ok=True)
        truncated[-1].write_bytes(data[: len(data) * (30 + i % 60) // 100])  # cut at 30..89%

    results: dict[str, dict[str, float]] = {}
    for name, check in (("before", scan_before), ("now", image_problem), ("full decode", full_decode)):
        per_s, reported = rate(check, paths)
        _, caught = rate(check, truncated, repeat=1)
        results[name] = {"images_per_s": round(per_s, 1), "valid_reported": reported, "truncated_caught": caught}

    # Copies: 20 val files replaced by copies of train files.
    train = [q for q in paths if "/train/" in str(q)]
    val = [q for q in paths if "/val/" in str(q)]
    for a, b in zip(val[:20], train[:20]):
        a.write_bytes(b.read_bytes())
    splits = folder(root / "photos")
    dup_s, found = seconds(lambda: find_duplicates(splits))
    same_size = root / "same_size"
    rng = np.random.default_rng(0)
    for i in range(args.images):
        path = same_size / ("val" if i % 5 == 0 else "train") / f"class_{i % 2}" / f"{i}.ppm"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    ppm = folder(same_size)
    ppm_s, ppm_found = seconds(lambda: find_duplicates(ppm))
    dig = digits()
    dig_s, dig_found = seconds(lambda: find_duplicates(dig))
    duplicates = {
        f"{args.images} JPEG files, 20 copies planted": {"s": round(dup_s, 4), "found": len(found)},
        f"{args.images} PPM files of one size (all hashed)": {"s": round(ppm_s, 4), "found": len(ppm_found)},
        "digits (1,797 arrays)": {"s": round(dig_s, 4), "found": len(dig_found)},
    }
    try:
        fm = fashion_mnist()
        fm_s, fm_found = seconds(lambda: find_duplicates(fm), repeat=1)
        duplicates["fashion_mnist (70,000 arrays)"] = {"s": round(fm_s, 3), "found": len(fm_found)}
    except Exception as e:  # not installed here
        print(f"fashion_mnist skipped: {e}")

    print(f"{args.images} JPEG files of {args.size} px with EXIF thumbnails, {platform.machine()}")
    for name, r in results.items():
        print(f"scan {name:<12} {r['images_per_s']:8.1f} images/s; valid files reported {r['valid_reported']}, "
              f"truncated caught {r['truncated_caught']}/{len(truncated)}")
    for name, r in duplicates.items():
        print(f"duplicates, {name:<42} {r['s'] * 1000:8.1f} ms, {r['found']} found")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "scan": results, "duplicates": duplicates}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
