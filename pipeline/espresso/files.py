"""Atomic file output: a stage that is interrupted never leaves a half-written result.

Temporaries are named ``.<target name>.tmp-<random>`` beside their target, so that what a killed
run left behind is recognisable: ``remove_stray_temps`` deletes it when the stage runs again
(otherwise the stray file would change the hash of the stage's output folder). What is published
has the permissions of a plain ``open`` under the process umask (0644 / 0755 under umask 022),
not ``tempfile``'s private 0600 / 0700.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

#: Marks the temporaries of this module: ``.<target name>.tmp-<random>``.
TEMP_TAG = ".tmp-"

log = logging.getLogger(__name__)

#: Why a path cannot be written, by errno, and what to do about it.
WRITE_FIXES = {errno.ENOSPC: "free space on its disk, then rerun",
               errno.EDQUOT: "free space within your disk quota, then rerun",
               errno.EROFS: "the file system is read-only: run where outputs can be written",
               errno.EACCES: "give this user write access to it and its folder",
               errno.EPERM: "give this user write access to it and its folder"}


class OutputNotWritableError(OSError):
    """An output that cannot be written (disk full, read-only, no access): ``strerror`` is one
    line naming the path and the fix."""


def not_writable(err: BaseException, path) -> OutputNotWritableError | None:
    """``err`` as an :class:`OutputNotWritableError` naming ``path`` where it is
    a write failure of ``WRITE_FIXES``: an ``OSError``, or a library's error that carries the
    system's message in its own (safetensors, torch.save); None for any other error."""
    if isinstance(err, OutputNotWritableError):
        return err
    code = err.errno if isinstance(err, OSError) else next(
        (code for code in WRITE_FIXES if os.strerror(code) in str(err)), None)
    if code not in WRITE_FIXES:
        return None
    return OutputNotWritableError(code, f"{path}: {os.strerror(code)}: {WRITE_FIXES[code]}",
                                  str(path))


@contextlib.contextmanager
def naming_unwritable(path) -> Iterator[None]:
    """Turn a write failure of the block (:func:`not_writable`) into one naming ``path``."""
    try:
        yield
    except Exception as err:
        mapped = not_writable(err, path)
        if mapped is None:
            raise
        raise mapped from err


def _temp_prefix(path: Path) -> str:
    return f".{path.name}{TEMP_TAG}"


def _published_mode(is_dir: bool) -> int:
    """The mode ``open`` / ``mkdir`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename,
    with everything in it given the published permissions. A disk full or read-only is an
    :class:`OutputNotWritableError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        with naming_unwritable(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
            yield tmp
            for entry in [tmp, *tmp.rglob("*")]:  # libraries may write private files in it
                entry.chmod(_published_mode(entry.is_dir()))
            old = path.with_name(f"{_temp_prefix(path)}old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (already with the published permissions);
    on success it replaces ``path``. A disk full or read-only is an
    :class:`OutputNotWritableError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        with naming_unwritable(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=path.suffix,
                                       dir=path.parent)
            os.fchmod(fd, _published_mode(False))
            os.close(fd)
            yield Path(tmp)
            os.replace(tmp, path)
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def remove_stray_temps(outputs) -> None:
    """Delete (and log) the temporaries that a killed run left: beside each output path and, for
    an output folder, anywhere inside it."""
    stray = []
    for out in map(Path, outputs):
        stray += out.parent.glob(f"{_temp_prefix(out)}*")
        if out.is_dir():
            stray += out.rglob(f".*{TEMP_TAG}*")
    for path in sorted(stray):  # a folder before what is inside it
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue  # inside a folder removed above
        log.warning("removed %s, left by an interrupted run", path)


def path_argument(text: str) -> Path:
    """An argparse ``type`` for a path given on the command line: a name this system cannot
    have (too long, a NUL byte) is argparse's one usage line, not a traceback where it is
    first used; a path that does not exist yet is fine (it may be an output)."""
    path = Path(text).expanduser()
    try:
        if "\0" in text:
            raise ValueError("embedded null byte")
        path.exists()
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(
            f"{shown_path(text)!r} cannot be a path here ({getattr(err, 'strerror', None) or err})") from None
    return path


def shown_path(path: str, width: int = 120) -> str:
    """A path as an error line shows it: a long one cut in the middle, so the line stays one."""
    return path if len(path) <= width else f"{path[:width // 2]}...{path[-width // 3:]}"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, table) -> None:
    """Write a pandas table as CSV (no index), atomically."""
    with atomic_file(path) as tmp:
        table.to_csv(tmp, index=False)
