"""Screen image files with a saved concept checker: one CSV row per image and concept.

    python -m pipeline.screen CHECKER IMAGES... --out results.csv

``CHECKER`` is a checker folder or hub id (``python -m pipeline.export`` builds one); each of
``IMAGES`` is an image file or a folder, searched recursively for image files (``EXTENSIONS``).
Columns: ``path, concept, p_unacceptable, cut, fired, blocked, error``. A file that cannot be
read as an image is not skipped: its rows say why, have no score, and count as blocked (the
checker fails closed), as does an image the checker cannot score. A summary line goes to stderr.
Needs only the filter library's core dependencies.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
from tqdm import tqdm

from pipeline.espresso.files import atomic_file

if TYPE_CHECKING:
    from pipeline.espresso import ConceptChecker

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COLUMNS = ("path", "concept", "p_unacceptable", "cut", "fired", "blocked", "error")


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (sorted); a path that does
    not exist raises ``FileNotFoundError`` naming it."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(f for f in path.rglob("*")
                            if f.is_file() and f.suffix.lower() in EXTENSIONS)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist: give image files or folders")
    return files


def read_image(path: Path):
    """The file as an RGB PIL image (any mode converted, as diffusers' loaders do), or the
    reason it cannot be read."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB"), None
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        return None, f"unreadable image file: {type(err).__name__}: {err}"


def screen_files(checker: ConceptChecker, files: list[Path], batch: int = 32) -> list[dict]:
    """One row per file and concept (``COLUMNS``); unreadable files are blocked, unscored."""
    rows = []
    with tqdm(total=len(files), desc="screen", unit="image") as bar:
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            read = [read_image(f) for f in chunk]
            images = [im for im, _ in read if im is not None]
            result = checker.check(images) if images else None
            scored = iter(range(len(images)))
            for path, (image, error) in zip(chunk, read):
                i = next(scored) if image is not None else None
                for k, name in enumerate(checker.names):
                    p = result.p_unacceptable[i, k] if i is not None else float("nan")
                    rows.append({
                        "path": str(path), "concept": name,
                        "p_unacceptable": "" if math.isnan(p) else f"{p:.6g}",
                        "cut": f"{checker.cuts[k]:.6g}",
                        "fired": bool(result.fired[i, k]) if i is not None else True,
                        "blocked": bool(result.blocked[i]) if i is not None else True,
                        "error": error or (result.errors[i] if i is not None else None) or ""})
            bar.update(len(chunk))
    return rows


def summary_line(rows: list[dict], concepts: list[str]) -> str:
    images = {r["path"]: r for r in rows}
    blocked = sum(r["blocked"] for r in images.values())
    unscored = sum(bool(r["error"]) for r in images.values())
    fired = ", ".join(f"{c} {sum(r['fired'] for r in rows if r['concept'] == c)}"
                      for c in concepts)
    return (f"screened {len(images)} images: {blocked} blocked, {unscored} of them unreadable "
            f"or unscored (blocked, reason in the error column); fired per concept: {fired}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.screen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checker", help="checker folder or hub id")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: give a positive number")
    from pipeline.espresso import ConceptChecker, ModelNotAvailableError

    try:
        files = image_files(args.images)
        checker = ConceptChecker.from_pretrained(args.checker)
    except (FileNotFoundError, ModelNotAvailableError) as err:
        raise SystemExit(f"error: {err}") from None
    if not files:
        raise SystemExit(f"error: no image files ({', '.join(EXTENSIONS)}) in "
                         f"{', '.join(map(str, args.images))}")
    rows = screen_files(checker, files, args.batch)
    with atomic_file(args.out) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    print(summary_line(rows, checker.names), file=sys.stderr)


if __name__ == "__main__":
    main()
