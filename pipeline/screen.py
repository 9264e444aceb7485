"""Screen image files with a saved concept checker: one CSV row per file and concept.

    python -m pipeline.screen CHECKER IMAGES... --out results.csv [--force]

``CHECKER`` is a checker folder or hub id (``python -m pipeline.export`` builds one); each of
``IMAGES`` is a file or a folder, searched recursively (links to folders followed, each folder
once). Every file is screened or, with its reason, skipped and counted as blocked (the screen
fails closed): what an image is, is decided by its content, not its name. Every frame of an
animated or multi-page image is scored and the file is blocked if any frame is. Every PIL mode
is read as :mod:`pipeline.espresso.pil_modes` says (16-bit grey scaled to 8 bits, not clipped to
white; float and beyond-16-bit images blocked with the reason); a frame with translucent pixels
shows no one picture, so it is scored composited over black and over white, as two frames, and
blocks the file if either fires. An image whose frames would decode (or resize) to more than
``--max-pixels`` pixels is blocked unread.

Columns: ``path, frames, concept, p_unacceptable, cut, p_vs_everyday, everyday_cut, fired,
blocked, error`` (the scores are the highest over the frames, ``p_vs_everyday`` P(u|x) against
the concept's nearest everyday text, empty with ``everyday_cut`` where the concept has no
everyday anchor; ``frames`` how many were scored). Cells a
spreadsheet would run as a formula get a leading ``'``; a file name that is not UTF-8 is written
as its bytes. ``--out`` never replaces an input, nor an existing file without ``--force`` (and
then only an earlier CSV of this command); it is checked to be writable before any screening and
written atomically. A summary line goes to stderr. Needs only the filter library's core
dependencies.

``--smoothing SIGMA`` also decides every frame by randomized smoothing in pixel space
(:mod:`pipeline.espresso.smoothing`: the checker's decision under Gaussian noise of scale SIGMA
on pixels in [0, 1], ``--samples`` noisy copies per frame, an abstention blocks) and adds two
columns: ``smoothed_blocked`` (any frame's smoothed decision blocks) and ``certified_radius``
(the L2 radius in [0, 1] pixels within which that verdict provably holds: for a blocked file the
largest radius of a frame certified blocked, for a passed one the smallest over its frames; 0
where it is not certified).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageSequence
from tqdm import tqdm

from pipeline.espresso.files import atomic_file, path_argument

if TYPE_CHECKING:
    from pipeline.espresso import ConceptChecker
    from pipeline.espresso.smoothing import Smoothing

COLUMNS = ("path", "frames", "concept", "p_unacceptable", "cut", "p_vs_everyday", "everyday_cut",
           "fired", "blocked", "error")
SMOOTHED_COLUMNS = ("smoothed_blocked", "certified_radius")
#: Pixels one file may decode to, all frames together, counting each frame at the larger of its
#: own size and its size after CLIP's resize (a 1 x 200000 strip resizes to 224 x 44.8 million).
#: 50 million: a 48-megapixel photo fits; 150 MB as RGB. Also the most a batch holds.
MAX_PIXELS = 50_000_000
#: What a spreadsheet runs as a formula at the start of a cell (ASCII and full-width forms).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
FILE_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket",
              stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


@dataclass
class Entry:
    """A file to screen, or a path that is skipped (and blocked) with its reason."""

    path: str
    skipped: str | None = None


def files_to_screen(paths: list[str]) -> list[Entry]:
    """Every file named and every file under a folder named, sorted per folder; links to
    folders are followed, each folder searched once (a loop or a second link to a folder is an
    entry skipped with its reason). A path that does not exist raises ``FileNotFoundError``."""
    entries, searched = [], set()
    for path in map(os.fspath, paths):
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path} does not exist: give image files or folders")
        entries += (folder_entries(path, searched) if os.path.isdir(path) else [file_entry(path)])
    return entries


def folder_entries(folder: str, searched: set) -> list[Entry]:
    """The files under ``folder``, depth first, each folder's sorted by name (a loop, not
    recursion: a hostile depth of nesting cannot overflow the stack)."""
    entries, folders = [], [folder]
    while folders:
        current = folders.pop()
        if not first_visit(current, searched, entries):
            continue
        try:
            with os.scandir(current) as scan:
                children = sorted(scan, key=lambda child: child.name)
        except OSError as err:
            entries.append(Entry(current, f"skipped: folder cannot be read ({err.strerror})"))
            continue
        entries += [file_entry(child.path) for child in children if not child.is_dir()]
        folders += reversed([child.path for child in children if child.is_dir()])
    return entries


def first_visit(folder: str, searched: set, entries: list[Entry]) -> bool:
    """Whether ``folder`` is searched now; a folder searched already (reached again through a
    link) becomes a skipped entry instead, so that no loop runs forever."""
    try:
        info = os.stat(folder)
    except OSError as err:
        entries.append(Entry(folder, f"skipped: folder cannot be read ({err.strerror})"))
        return False
    key = (info.st_dev, info.st_ino)
    if key in searched:
        entries.append(Entry(folder, f"skipped: a link to {os.path.realpath(folder)}, a folder "
                                     "searched already (its files are screened there)"))
        return False
    searched.add(key)
    return True


def file_entry(path: str) -> Entry:
    """The file, or why it is skipped: it cannot be read, or is not a regular file (reading a
    named pipe or a device would hang or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        reason = "a broken link" if os.path.islink(path) else err.strerror
        return Entry(path, f"skipped: cannot be read ({reason})")
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in FILE_KINDS.items() if test(mode)), "not a regular file")
        return Entry(path, f"skipped: {kind}, not an image file")
    return Entry(path)


def decoded_pixels(size: tuple[int, int], resize_edge: int) -> int:
    """Pixels a frame takes decoded, or after CLIP's resize of its short edge to
    ``resize_edge``, whichever is more."""
    short, long = sorted(size)
    if short < 1:
        return math.inf
    return max(short * long, resize_edge * math.ceil(resize_edge * long / short))


def read_frames(path: str, resize_edge: int, max_pixels: int):
    """(every frame as the RGB picture(s) it shows, None), or (None, why the file cannot be
    screened). Each frame is converted by :func:`pipeline.espresso.pil_modes.rgb_versions`: a
    frame with translucent pixels becomes two, composited over black and over white (the file
    is blocked if either fires); a frame of a mode whose range is unknown (float, 32-bit
    integer) refuses the file. The frames' sizes are read from their headers and held to
    ``max_pixels`` before any is decoded."""
    from pipeline.espresso.filter import ImageFormError
    from pipeline.espresso.pil_modes import rgb_versions

    try:
        with warnings.catch_warnings():  # the budget below is the bound; PIL's warning is noise
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                pixels = 0
                for i, frame in enumerate(PIL.ImageSequence.Iterator(image)):
                    pixels += decoded_pixels(frame.size, resize_edge)
                    if pixels > max_pixels:  # before this frame is decoded
                        width, height = frame.size
                        return None, (f"too large: frames 0-{i} (frame {i} {width} x {height}) "
                                      f"decode or resize to {pixels:.3g} pixels, over the budget "
                                      f"of {max_pixels:.3g} (--max-pixels)")
                frames = []
                for i, frame in enumerate(PIL.ImageSequence.Iterator(image)):
                    try:
                        frames += rgb_versions(frame)
                    except ImageFormError as err:
                        return None, f"frame {i}: {err}" if i else str(err)
                return frames, None
    except (OSError, ValueError, EOFError, SyntaxError, MemoryError,
            PIL.Image.DecompressionBombError) as err:
        return None, f"unreadable image file: {type(err).__name__}: {err}"


class Verdict:
    """One file's verdict over its frames: the highest score per concept, which concepts fired
    on any frame, the first reason a frame could not be scored."""

    def __init__(self, concepts: int, error: str | None = None):
        self.frames, self.error = 0, error
        self.p = np.full(concepts, -np.inf)
        self.gate = np.full(concepts, -np.inf)
        self.fired = np.full(concepts, error is not None)
        self.smoothed: list[tuple[bool, float]] = []  # per frame: (blocked, certified radius)

    def smoothed_verdict(self) -> tuple[bool, float]:
        """The file's smoothed decision and its certified radius (module docstring)."""
        if self.error or not self.smoothed:
            return True, 0.0
        blocked = [radius for b, radius in self.smoothed if b]
        return (True, max(blocked)) if blocked else (False, min(r for _, r in self.smoothed))

    def add(self, p: np.ndarray, gate: np.ndarray, fired: np.ndarray, error: str | None) -> None:
        self.frames += 1
        self.p = np.fmax(self.p, np.nan_to_num(p, nan=-np.inf))
        self.gate = np.fmax(self.gate, np.nan_to_num(gate, nan=-np.inf))
        self.fired |= fired
        if error and not self.error:
            self.error = f"frame {self.frames - 1}: {error}"

    def rows(self, path: str, checker: ConceptChecker, smoothing: bool = False) -> list[dict]:
        blocked = bool(self.fired.any())

        def number(x: float) -> str:
            return "" if self.error or not np.isfinite(x) else f"{x:.6g}"

        smoothed = {}
        if smoothing:
            smoothed_blocked, radius = self.smoothed_verdict()
            smoothed = {"smoothed_blocked": smoothed_blocked, "certified_radius": f"{radius:.6g}"}
        return [{"path": path, "frames": self.frames, "concept": c.name,
                 "p_unacceptable": number(p), "cut": f"{c.cut:.6g}",
                 "p_vs_everyday": "" if c.t_n is None else number(gate),
                 "everyday_cut": "" if c.t_n is None else f"{c.everyday_cut:.6g}",
                 "fired": bool(fired), "blocked": blocked, "error": self.error or "", **smoothed}
                for c, p, gate, fired in zip(checker.concepts, self.p, self.gate, self.fired)]


def screen_files(checker: ConceptChecker, entries: list[Entry], batch: int = 32,
                 max_pixels: int = MAX_PIXELS, smoothing: Smoothing | None = None) -> list[dict]:
    """One row per file and concept (``COLUMNS``, and ``SMOOTHED_COLUMNS`` with ``smoothing``).
    Frames are scored in batches of at most ``batch`` frames and ``max_pixels`` pixels; a file
    skipped or unreadable, or with a frame the checker cannot score, is blocked with its reason;
    each file is judged on its own."""
    from pipeline.espresso.smoothing import certify

    resize_edge = checker.processor.size["shortest_edge"]
    concepts = len(checker.names)
    verdicts, pending, pending_pixels = [], [], 0

    def score_pending():
        result = checker.check([frame for _, frame in pending])
        for (verdict, _), p, gate, fired, error in zip(pending, result.p_unacceptable,
                                                       result.p_vs_everyday, result.fired,
                                                 result.errors):
            verdict.add(p, gate, fired, error)
        if smoothing is not None:
            scored = [(verdict, frame) for (verdict, frame), error in zip(pending, result.errors)
                      if error is None]
            if scored:
                cert = certify(checker, [frame for _, frame in scored], smoothing)
                for (verdict, _), b, radius in zip(scored, cert.blocked, cert.radius):
                    verdict.smoothed.append((bool(b), float(radius)))
        pending.clear()

    for entry in tqdm(entries, desc="screen", unit="file"):
        frames, error = (None, entry.skipped) if entry.skipped else read_frames(
            entry.path, resize_edge, max_pixels)
        verdict = Verdict(concepts, error)
        verdicts.append(verdict)
        for frame in frames or []:
            pending.append((verdict, frame))
            pending_pixels += decoded_pixels(frame.size, resize_edge)
            if len(pending) >= batch or pending_pixels >= max_pixels:
                score_pending()
                pending_pixels = 0
    if pending:
        score_pending()
    return [row for entry, verdict in zip(entries, verdicts)
            for row in verdict.rows(entry.path, checker, smoothing is not None)]


def summary_line(rows: list[dict], concepts: list[str]) -> str:
    files = {r["path"]: r for r in rows}
    blocked = sum(r["blocked"] for r in files.values())
    unscored = sum(bool(r["error"]) for r in files.values())
    frames = sum(r["frames"] for r in files.values())
    fired = ", ".join(f"{c} {sum(r['fired'] for r in rows if r['concept'] == c)}"
                      for c in concepts)
    smoothed = ""
    if files and "smoothed_blocked" in next(iter(files.values())):
        certified = sum(float(r["certified_radius"]) > 0 for r in files.values())
        smoothed = (f"; smoothed: {sum(r['smoothed_blocked'] for r in files.values())} blocked, "
                    f"{certified} files certified")
    return (f"screened {len(files)} files ({frames} frames): {blocked} blocked, {unscored} of "
            f"them skipped, unreadable or unscored (blocked, reason in the error column); "
            f"fired per concept: {fired}{smoothed}")


def spreadsheet_safe(text: str) -> str:
    """``text`` with a leading ``'`` where a spreadsheet would run it as a formula."""
    return "'" + text if text.lstrip(" ").startswith(FORMULA_START) else text


def write_rows(path: Path, rows: list[dict]) -> None:
    """The CSV; text cells spreadsheet-safe, file names that are not UTF-8 as their bytes."""
    smoothed = bool(rows) and "smoothed_blocked" in rows[0]
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, COLUMNS + (SMOOTHED_COLUMNS if smoothed else ()))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: spreadsheet_safe(v) if isinstance(v, str) else v
                             for k, v in row.items()})


def refuse_out(out: Path, force: bool, inputs: list[str]) -> str | None:
    """Why ``--out`` must not be written, or None: it is a folder or not a regular file, one
    of the inputs, or an existing file (without ``--force``, or not an earlier screen CSV)."""
    if os.path.isdir(out):
        return f"--out {out} is a folder: give a file path for the CSV"
    if os.path.realpath(out) in {os.path.realpath(p) for p in inputs}:
        return f"--out {out} is one of the files to screen: give another path for the CSV"
    if not os.path.lexists(out):
        return None
    try:
        regular = stat.S_ISREG(os.stat(out).st_mode)
    except OSError as err:
        return f"--out {out} cannot be read ({err.strerror}): give another path for the CSV"
    if not regular:
        return f"--out {out} is not a regular file: give a file path for the CSV"
    if not force:
        return f"--out {out} exists: give --force to replace it, or another path"
    with open(out, "rb") as f:
        earlier_csv = f.readline(4096).startswith(b"path,")
    if not earlier_csv:
        return (f"--out {out} exists and is not an earlier CSV of pipeline.screen: not replaced "
                "even with --force; give another path")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.screen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checker", help="checker folder or hub id")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--out", type=path_argument, required=True, help="the CSV to write")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it is an earlier CSV of this command")
    parser.add_argument("--batch", type=int, default=32, help="frames per batch (default 32)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"pixels one file may decode to, all frames (default {MAX_PIXELS})")
    parser.add_argument("--smoothing", type=float, metavar="SIGMA",
                        help="also decide by randomized smoothing at noise SIGMA (pixels in "
                             "[0, 1], e.g. 0.25) and certify each file's verdict")
    parser.add_argument("--samples", type=int, default=1000, metavar="N",
                        help="noisy copies per frame for --smoothing's certificate (default "
                             "1000, after 100 that pick the decision)")
    args = parser.parse_args(argv)
    smoothing = None
    if args.smoothing is not None:
        import importlib.util

        from pipeline.espresso.smoothing import NEEDS_SCIPY, Smoothing

        if importlib.util.find_spec("scipy") is None:
            parser.error(f"--smoothing: {NEEDS_SCIPY}")
        try:
            smoothing = Smoothing(sigma=args.smoothing, n=args.samples)
        except ValueError as err:
            parser.error(str(err))
    for option in ("batch", "max_pixels"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: give a "
                         "positive number")
    from pipeline.espresso import ConceptChecker, ModelNotAvailableError

    try:
        entries = files_to_screen(args.images)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    if not entries:
        raise SystemExit(f"error: no files in {', '.join(args.images)}")
    problem = refuse_out(args.out, args.force, args.images + [e.path for e in entries])
    if problem:
        raise SystemExit(f"error: {problem}")
    try:
        checker = ConceptChecker.from_pretrained(args.checker)
    except ModelNotAvailableError as err:
        raise SystemExit(f"error: {err}") from None
    with contextlib.ExitStack() as stack:
        try:  # the temporary beside --out: proves it writable before any screening
            tmp = stack.enter_context(atomic_file(args.out))
        except OSError as err:
            raise SystemExit(f"error: --out {args.out} cannot be written ({err.strerror or err}): "
                             "give a path in a writable folder") from None
        rows = screen_files(checker, entries, args.batch, args.max_pixels, smoothing)
        try:
            write_rows(tmp, rows)
        except OSError as err:
            raise SystemExit(f"error: writing --out {args.out} failed ({err.strerror or err}); "
                             "nothing was replaced") from None
    print(summary_line(rows, checker.names), file=sys.stderr)


if __name__ == "__main__":
    main()
