"""Provenance of the published results, from the main branch alone.

A published experiment is a commit on main whose subject starts with ``exp(<concept>): ``: the
experiment applied (``dvc exp apply``) with its params.yaml, dvc.lock and the stages' git-tracked
outputs (``reports/``) committed. The newest such commit per concept along ``git log
--first-parent`` is what the summary reads and what a reviewer checks:

  python -m pipeline.provenance --index            # list them; write reports/summary/experiments.csv
  python -m pipeline.provenance --verify CONCEPT   # rerun one from scratch and compare every output
  python -m pipeline.provenance --publish EXP      # apply a DVC experiment (or a concept's newest)
                                                   # and commit it as exp(<concept>): <exp>

--verify checks out the published commit in a temporary git worktree with its own empty DVC
cache, runs ``dvc repro --force`` there, and compares every output that commit's dvc.lock
records with the rerun's, per output at one of three levels: "bytes" (DVC's md5, or its .dir
hash for a folder, is identical), "within tolerance" (bytes differ, every number agrees: JSON and
CSV numbers and tensors within rtol 1e-5, atol 1e-6, everything else exactly; uint8 images
off by at most 1 in at most 0.1% of their values), "differs" (with the worst number). It passes
when no output differs. The committed bytes of cached outputs are read from this repository's
DVC cache (``dvc pull`` first): where they are not there, only the hashes can be compared.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pipeline.espresso.files import path_argument

#: The subject of a published experiment's commit: ``exp(<concept>): <experiment name>``.
EXP_SUBJECT = re.compile(r"exp\(([^()\s]+)\): ")
#: What the summary reads of a published commit: one without them is of an older format.
SUMMARY_FILES = ("params.yaml", "reports/evaluate/scores.csv", "reports/everyday/scores.csv",
                 "reports/attack/scores.csv", "reports/evaluate/detail.json")
#: The index of published experiments, in the summary's folder.
INDEX = Path("reports/summary/experiments.csv")
INDEX_COLUMNS = ("concept", "commit", "subject", "date", "params_md5")

#: Numbers agree "within tolerance" when |rerun - committed| <= ATOL + RTOL * |committed|.
RTOL, ATOL = 1e-5, 1e-6
#: uint8 images agree within tolerance when no value is off by more than PIXEL_STEP and at most
#: PIXEL_SHARE of the values are off at all.
PIXEL_STEP, PIXEL_SHARE = 1, 0.001
BYTES, TOLERANCE, DIFFERS = "bytes", "within tolerance", "differs"
LEVELS = (BYTES, TOLERANCE, DIFFERS)
TEXT_SUFFIXES = {".md", ".html", ".htm", ".txt", ".yaml", ".yml", ".log", ".svg", ".tex"}


class ProvenanceError(Exception):
    """A one-line problem for the user (no traceback): a dirty tree, no published commit."""


# --- git -----------------------------------------------------------------------------------


def git(*args: str, repo: str | Path = ".", input: bytes | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, input=input)
    if result.returncode != 0:
        raise ProvenanceError(f"git {' '.join(args)} failed: "
                              f"{result.stderr.decode(errors='replace').strip()[-500:]}")
    return result.stdout.decode()


def cat_files(specs: list[str], repo: str | Path = ".") -> list[str | None]:
    """The text of each ``rev:path`` of the repository ``repo`` (one ``git cat-file --batch``
    for all); None where the commit has no such file (or it is a folder)."""
    if not specs:
        return []
    result = subprocess.run(["git", "cat-file", "--batch"], capture_output=True, check=True,
                            cwd=repo, input="".join(f"{spec}\n" for spec in specs).encode())
    data, at, out = result.stdout, 0, []
    for _ in specs:
        end = data.index(b"\n", at)
        header = data[at:end].split()
        at = end + 1
        if len(header) != 3 or not header[2].isdigit():  # "<spec> missing" / "ambiguous"
            out.append(None)
            continue
        size = int(header[2])
        out.append(data[at:at + size].decode() if header[1] == b"blob" else None)
        at += size + 1
    return out


def read_at(commit: str, paths: Iterable[str], repo: str | Path = ".") -> list[str | None]:
    """The text of each of ``paths`` at ``commit`` (None where it has none), one git call."""
    return cat_files([f"{commit}:{path}" for path in paths], repo)


def files_at(specs: list[str], repo: str | Path = ".") -> list[bool]:
    """Whether each ``rev:path`` is a file of the repository (one ``git cat-file
    --batch-check``, reading no contents)."""
    if not specs:
        return []
    out = git("cat-file", "--batch-check", repo=repo,
              input="".join(f"{spec}\n" for spec in specs).encode())
    return [len(line.split()) == 3 and line.split()[1] == "blob" for line in out.splitlines()]


# --- published experiments -----------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A published experiment: the newest ``exp(<concept>): ...`` commit of its concept."""
    concept: str
    commit: str
    subject: str
    date: str  # the commit's date, ISO 8601


def published(repo: str | Path = ".") -> list[Published]:
    """The newest ``exp(<concept>): `` commit per concept along ``git log --first-parent`` of
    HEAD (commits merged in from other branches are not main's own), sorted by concept."""
    try:
        log = git("log", "--first-parent", "--format=%H%x00%cI%x00%s", "HEAD", repo=repo)
    except ProvenanceError:  # no commit yet
        return []
    newest: dict[str, Published] = {}
    for line in log.splitlines():
        commit, date, subject = line.split("\0", 2)
        if match := EXP_SUBJECT.match(subject):
            newest.setdefault(match[1], Published(match[1], commit, subject, date))
    return [newest[concept] for concept in sorted(newest)]


def missing_files(commits: list[str], repo: str | Path = ".",
                  needed: tuple[str, ...] = SUMMARY_FILES) -> dict[str, list[str]]:
    """Per commit, which of the files the summary needs (``needed``) it lacks."""
    found = iter(files_at([f"{c}:{path}" for c in commits for path in needed], repo))
    return {c: [path for path in needed if not next(found)] for c in commits}


def of_current_format(items: list[Published], repo: str | Path = ".",
                      say: Callable[[str], None] = print,
                      needed: tuple[str, ...] = SUMMARY_FILES) -> list[Published]:
    """Those of ``items`` whose commit has every file the summary needs; each other one is
    skipped with one line (``say``) naming the commit and what it lacks."""
    missing = missing_files([p.commit for p in items], repo, needed)
    kept = []
    for p in items:
        if missing[p.commit]:
            say(f"skipped exp({p.concept}) at {p.commit[:8]}: an older results format (no "
                f"{', '.join(missing[p.commit])})")
        else:
            kept.append(p)
    return kept


def index_rows(items: list[Published], repo: str | Path = ".") -> list[dict]:
    """One row per published experiment: concept, commit, subject, date, and the md5 of its
    params.yaml ('' where it has none)."""
    texts = read_at_many([(p.commit, "params.yaml") for p in items], repo)
    return [dict(zip(INDEX_COLUMNS, (p.concept, p.commit, p.subject, p.date,
                                     hashlib.md5(text.encode()).hexdigest() if text else "")))
            for p, text in zip(items, texts)]


def write_index(folder: str | Path, items: list[Published], repo: str | Path = ".") -> Path:
    """``folder/experiments.csv``: :func:`index_rows`, written atomically."""
    path = Path(folder) / INDEX.name
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(index_rows(items, repo))
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(buffer.getvalue())
    partial.replace(path)
    return path


def read_at_many(pairs: list[tuple[str, str]], repo: str | Path = ".") -> list[str | None]:
    """The text of each (commit, path), in one git call."""
    return cat_files([f"{commit}:{path}" for commit, path in pairs], repo)


def git_outputs(dvc_yaml: str) -> list[str]:
    """The outputs of ``dvc.yaml`` (its text) that live in git (``cache: false``): outs,
    metrics and plots of every stage."""
    import yaml

    out = []
    for stage in (yaml.safe_load(dvc_yaml).get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if (options or {}).get("cache", True) is False:
                    out.append(path)
    return out


def publish(concept_or_exp: str, repo: str | Path = ".") -> Published:
    """Apply a DVC experiment (``dvc exp apply``) and commit it on the current branch as
    ``exp(<concept>): <experiment name>``: params.yaml, dvc.lock and every git-tracked output
    of dvc.yaml (and any other file the experiment changed, such as its code). ``concept_or_exp``: an experiment's name (or rev), or a concept, which picks
    the newest experiment the summary would take for it (same params but the concept). Refuses,
    with one line, on a tree with uncommitted changes."""
    root = Path(git("rev-parse", "--show-toplevel", repo=repo).strip())
    dirty = git("status", "--porcelain", "--untracked-files=no", repo=root).splitlines()
    if dirty:
        raise ProvenanceError(
            f"the working tree has uncommitted changes ({len(dirty)} files, e.g. "
            f"{dirty[0][3:]}): commit or stash them before publishing an experiment")
    name = _experiment_of(concept_or_exp, root)
    untracked = set(git("ls-files", "--others", "--exclude-standard", repo=root).splitlines())
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=root,
                            capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ProvenanceError(f"dvc exp apply {name} failed: {last}")
    import yaml

    concept = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("concept")
    if not concept:
        raise ProvenanceError(f"{name}'s params.yaml names no concept")
    paths = ["params.yaml", "dvc.lock",
             *[p for p in git_outputs((root / "dvc.yaml").read_text()) if (root / p).exists()
               or git("ls-files", "--", p, repo=root).strip()]]
    git("add", "-A", "--", *paths, repo=root)
    # and whatever else the experiment changed (its code, if it ran on other code): the commit
    # is the experiment's tree, so that a rerun of it reruns that experiment
    git("add", "-u", repo=root)
    new = sorted(set(git("ls-files", "--others", "--exclude-standard", repo=root).splitlines())
                 - untracked)
    if new:
        git("add", "--", *new, repo=root)
    git("commit", "--allow-empty", "-q", "-m", f"exp({concept}): {name}", repo=root)
    return next(p for p in published(root) if p.concept == concept)


def _experiment_of(concept_or_exp: str, root: Path) -> str:
    """The experiment's name: ``concept_or_exp`` itself, or, if recorded experiments have it as
    their concept, the newest of them with the workspace's params but the concept."""
    import contextlib

    from pipeline.experiments import dvc, experiments, newest_per_concept
    from pipeline.params import load_params

    with contextlib.chdir(root):
        try:
            runs = experiments(json.loads(dvc("exp", "show", "--all-commits", "--json")))
        except RuntimeError as err:
            raise ProvenanceError(str(err).splitlines()[0]) from None
        if not any(run["params"].get("concept") == concept_or_exp for run in runs):
            return concept_or_exp
        params = load_params().model_dump(exclude_unset=True)
        chosen = newest_per_concept(runs, params, ("evaluate", "attack")).get(concept_or_exp)
    if chosen is None:
        raise ProvenanceError(f"no experiment of {concept_or_exp} with the workspace's params "
                              "(but the concept) and evaluate and attack results: name one")
    return chosen["name"]


# --- hashing, as DVC does ------------------------------------------------------------------


def _build(path: Path):
    """DVC's object for ``path`` (dvc_data's build, hashing only): a file or a Tree."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem, localfs

    odb = HashFileDB(MemoryFileSystem(), "memory://espresso-provenance")
    return build(odb, str(Path(path).absolute()), localfs, "md5", dry_run=True)[2]


def dvc_md5(path: str | Path) -> str:
    """DVC's hash of ``path`` as dvc.lock records it: the md5 of a file, the ``.dir`` hash of a
    folder."""
    return _build(Path(path)).hash_info.value


def dvc_files(path: str | Path) -> dict[str, str]:
    """A folder's files (relative posix path -> md5), as DVC lists them in its ``.dir``."""
    return {"/".join(key): hi.value for key, _, hi in _build(Path(path))}


# --- comparing -----------------------------------------------------------------------------


@dataclass
class Comparison:
    level: str        # BYTES, TOLERANCE or DIFFERS
    detail: str = ""
    worst: float | None = None  # the largest |difference| of a number, where numbers differ


class _Diff:
    """What differs between a committed and a rerun file: the first non-number that differs,
    and the number furthest out of (or least within) tolerance."""

    def __init__(self):
        self.broken: str | None = None
        self.ratio, self.worst, self.where = -1.0, None, ""
        self.notes: list[str] = []

    def mismatch(self, where: str, message: str) -> None:
        if self.broken is None:
            self.broken = f"{where}: {message}" if where else message

    def number(self, where: str, committed: float, rerun: float) -> None:
        if committed == rerun or (math.isnan(committed) and math.isnan(rerun)):
            ratio, diff = 0.0, 0.0
        else:
            diff = abs(rerun - committed)
            ratio = diff / (ATOL + RTOL * abs(committed)) if math.isfinite(diff) else math.inf
        if ratio > self.ratio:
            self.ratio, self.worst = ratio, diff
            self.where = f"{where} ({committed!r} -> {rerun!r})" if ratio else where

    def arrays(self, where: str, committed, rerun) -> None:
        import numpy as np

        if committed.shape != rerun.shape or committed.dtype != rerun.dtype:
            return self.mismatch(where, f"{committed.dtype}{list(committed.shape)} -> "
                                        f"{rerun.dtype}{list(rerun.shape)}")
        if committed.dtype == np.uint8:
            return self.pixels(where, committed, rerun)
        if np.issubdtype(committed.dtype, np.floating) or np.issubdtype(committed.dtype,
                                                                         np.complexfloating):
            a, b = committed.astype(np.float64).ravel(), rerun.astype(np.float64).ravel()
            if a.size == 0:
                return
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(b - a)
                same = (a == b) | (np.isnan(a) & np.isnan(b))
                ratio = np.where(same, 0.0, diff / (ATOL + RTOL * np.abs(a)))
                ratio = np.where(np.isnan(ratio), np.inf, ratio)
            i = int(np.argmax(ratio))
            return self.number(f"{where}[{i}]", float(a[i]), float(b[i])) if ratio[i] else \
                self.number(where, 0.0, 0.0)
        if not np.array_equal(committed, rerun):
            n = int(np.sum(committed != rerun))
            self.mismatch(where, f"{n} of {committed.size} values differ")

    def pixels(self, where: str, committed, rerun) -> None:
        import numpy as np

        diff = np.abs(committed.astype(np.int16) - rerun.astype(np.int16))
        off, largest = int(np.count_nonzero(diff)), int(diff.max(initial=0))
        share = off / max(diff.size, 1)
        if largest > PIXEL_STEP or share > PIXEL_SHARE:
            self.worst = max(self.worst or 0.0, float(largest))
            return self.mismatch(where, f"{off} of {diff.size} pixel values ({share:.2%}) off, "
                                        f"by up to {largest}")
        if off:
            self.notes.append(f"{where}: {off} of {diff.size} pixel values off by 1")
            self.worst = max(self.worst or 0.0, float(largest))

    def result(self) -> Comparison:
        if self.broken is not None:
            return Comparison(DIFFERS, self.broken, self.worst)
        if self.ratio > 1:
            return Comparison(DIFFERS, f"max |diff| {self.worst:.3g} at {self.where}",
                              self.worst)
        parts = []
        if self.ratio > 0:
            parts.append(f"max |diff| {self.worst:.3g} at {self.where}")
        parts += self.notes[:2] + ([f"... {len(self.notes) - 2} more"] if len(self.notes) > 2
                                   else [])
        return Comparison(TOLERANCE, "; ".join(parts) or "the same values, other bytes",
                          self.worst)


def _walk(diff: _Diff, where: str, committed, rerun) -> None:
    """JSON values: numbers within tolerance, everything else exactly."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if number(committed) and number(rerun):
        diff.number(where or "$", float(committed), float(rerun))
    elif isinstance(committed, dict) and isinstance(rerun, dict):
        if committed.keys() != rerun.keys():
            gone, new = sorted(committed.keys() - rerun.keys()), sorted(rerun.keys() - committed.keys())
            diff.mismatch(where or "$", f"keys differ (only committed: {gone[:3]}, only rerun: "
                                        f"{new[:3]})")
        for key in committed.keys() & rerun.keys():
            _walk(diff, f"{where}.{key}" if where else str(key), committed[key], rerun[key])
    elif isinstance(committed, list) and isinstance(rerun, list):
        if len(committed) != len(rerun):
            return diff.mismatch(where or "$", f"{len(committed)} items -> {len(rerun)}")
        for i, (a, b) in enumerate(zip(committed, rerun)):
            _walk(diff, f"{where}[{i}]", a, b)
    elif committed != rerun or type(committed) is not type(rerun):
        diff.mismatch(where or "$", f"{_short(committed)} -> {_short(rerun)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _compare_json(diff: _Diff, committed: Path, rerun: Path) -> None:
    _walk(diff, "", json.loads(committed.read_text()), json.loads(rerun.read_text()))


def _compare_csv(diff: _Diff, committed: Path, rerun: Path) -> None:
    delimiter = "\t" if committed.suffix == ".tsv" else ","
    a = list(csv.reader(io.StringIO(committed.read_text()), delimiter=delimiter))
    b = list(csv.reader(io.StringIO(rerun.read_text()), delimiter=delimiter))
    if len(a) != len(b):
        return diff.mismatch("", f"{len(a)} rows -> {len(b)}")
    header = a[0] if a else []
    for r, (row_a, row_b) in enumerate(zip(a, b)):
        if len(row_a) != len(row_b):
            diff.mismatch(f"row {r}", f"{len(row_a)} cells -> {len(row_b)}")
            continue
        for c, (x, y) in enumerate(zip(row_a, row_b)):
            where = f"row {r}, {header[c] if c < len(header) else c}"
            nx, ny = _as_number(x), _as_number(y)
            if nx is not None and ny is not None:
                diff.number(where, nx, ny)
            elif x != y:
                diff.mismatch(where, f"{_short(x)} -> {_short(y)}")


NUMBER = re.compile(r"([-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)")


def _compare_text(diff: _Diff, committed: Path, rerun: Path) -> None:
    """Text: the numbers in it within tolerance, the rest exactly."""
    a, b = NUMBER.split(committed.read_text()), NUMBER.split(rerun.read_text())
    if len(a) != len(b):
        return diff.mismatch("", "the text differs (other words or count of numbers)")
    line = 1
    for i, (x, y) in enumerate(zip(a, b)):
        if i % 2:
            diff.number(f"line {line}", float(x), float(y))
        elif x != y:
            return diff.mismatch(f"line {line}", f"{_short(x)} -> {_short(y)}")
        line += x.count("\n")


def _compare_safetensors(diff: _Diff, committed: Path, rerun: Path) -> None:
    from safetensors import safe_open

    def tensors(path: Path):
        try:
            handle = safe_open(str(path), framework="numpy")
            return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
        except (TypeError, ValueError):  # bfloat16: numpy has none
            handle = safe_open(str(path), framework="pt")
            return handle.metadata(), {k: handle.get_tensor(k).float().numpy()
                                       for k in handle.keys()}

    meta_a, a = tensors(committed)
    meta_b, b = tensors(rerun)
    if meta_a != meta_b:
        diff.mismatch("metadata", f"{_short(meta_a)} -> {_short(meta_b)}")
    _compare_arrays(diff, a, b)


def _compare_arrays(diff: _Diff, a: dict, b: dict) -> None:
    if a.keys() != b.keys():
        gone, new = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        diff.mismatch("", f"arrays differ (only committed: {gone[:3]}, only rerun: {new[:3]})")
    for key in sorted(a.keys() & b.keys()):
        diff.arrays(key, a[key], b[key])


def _compare_npz(diff: _Diff, committed: Path, rerun: Path) -> None:
    import numpy as np

    with np.load(committed, allow_pickle=False) as a, np.load(rerun, allow_pickle=False) as b:
        _compare_arrays(diff, {k: a[k] for k in a.files}, {k: b[k] for k in b.files})


def _compare_npy(diff: _Diff, committed: Path, rerun: Path) -> None:
    import numpy as np

    diff.arrays("", np.load(committed, allow_pickle=False), np.load(rerun, allow_pickle=False))


def _compare_png(diff: _Diff, committed: Path, rerun: Path) -> None:
    import numpy as np
    from PIL import Image

    with Image.open(committed) as a, Image.open(rerun) as b:
        if a.mode != b.mode:
            return diff.mismatch("", f"mode {a.mode} -> {b.mode}")
        diff.arrays("pixels", np.asarray(a), np.asarray(b))


COMPARERS = {".json": _compare_json, ".csv": _compare_csv, ".tsv": _compare_csv,
             ".safetensors": _compare_safetensors, ".npz": _compare_npz, ".npy": _compare_npy,
             ".png": _compare_png, **{s: _compare_text for s in TEXT_SUFFIXES}}


def compare_file(committed: Path, rerun: Path) -> Comparison:
    """One file, committed vs rerun: "bytes" if identical, else by its kind (COMPARERS)
    "within tolerance" or "differs"; a file of another kind, or one that cannot be read, differs
    as soon as its bytes do."""
    if _file_md5(committed) == _file_md5(rerun):
        return Comparison(BYTES)
    compare = COMPARERS.get(committed.suffix.lower())
    if compare is None:
        return Comparison(DIFFERS, f"bytes differ (no tolerance for {committed.suffix or 'such'}"
                                   " files)")
    diff = _Diff()
    try:
        compare(diff, committed, rerun)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line, not a traceback
        return Comparison(DIFFERS, f"cannot compare: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}"[:200])
    return diff.result()


def _file_md5(path: Path) -> str:
    from dvc_data.hashfile.hash import file_md5

    return file_md5(str(path))


def compare(committed: str | Path, rerun: str | Path) -> Comparison:
    """A file or a folder (its files pairwise, the same file list required), committed vs
    rerun: the weakest level of its files; the detail names the worst."""
    committed, rerun = Path(committed), Path(rerun)
    if committed.is_dir() != rerun.is_dir():
        return Comparison(DIFFERS, "a folder on one side, a file on the other")
    if not committed.is_dir():
        return compare_file(committed, rerun)
    a, b = dvc_files(committed), dvc_files(rerun)
    if a.keys() != b.keys():
        gone, new = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        return Comparison(DIFFERS, f"other files: only committed {gone[:3]}"
                                   f"{'...' if len(gone) > 3 else ''}, only rerun {new[:3]}"
                                   f"{'...' if len(new) > 3 else ''}")
    results = {rel: compare_file(committed / rel, rerun / rel)
               for rel in sorted(a) if a[rel] != b[rel]}
    if not results:
        return Comparison(BYTES, f"{len(a)} files")
    level = max((r.level for r in results.values()), key=LEVELS.index)
    worst_rel = max(results, key=lambda rel: (LEVELS.index(results[rel].level),
                                              results[rel].worst or 0.0))
    counts = [f"{len(a) - len(results)} identical"] + [
        f"{sum(r.level == lv for r in results.values())} {lv}" for lv in (TOLERANCE, DIFFERS)
        if any(r.level == lv for r in results.values())]
    worst = results[worst_rel]
    return Comparison(level, f"{len(a)} files: {', '.join(counts)}; worst {worst_rel}: "
                             f"{worst.detail}", worst.worst)


# --- verifying a published experiment ------------------------------------------------------


@dataclass
class OutputCheck:
    stage: str
    path: str
    level: str
    detail: str = ""


@dataclass
class VerifyReport:
    concept: str
    commit: str
    subject: str
    checks: list[OutputCheck] = field(default_factory=list)
    rerun_exit: int = 0          # dvc repro's exit status
    folder: Path | None = None   # the kept worktree (keep=True)

    @property
    def passed(self) -> bool:
        return self.rerun_exit == 0 and bool(self.checks) and \
            not any(c.level == DIFFERS for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def table(self) -> str:
        rows = [("output", "level", "detail")] + [(c.path, c.level, c.detail)
                                                  for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip() for r in rows]
        lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * 6}")
        counts = ", ".join(f"{sum(c.level == lv for c in self.checks)} {lv}" for lv in LEVELS
                           if any(c.level == lv for c in self.checks))
        verdict = "passed" if self.passed else "FAILED"
        why = []
        if self.rerun_exit:
            why.append(f"dvc repro exited with {self.rerun_exit}")
        if not self.checks:
            why.append("dvc.lock records no output")
        differs = [c.path for c in self.checks if c.level == DIFFERS]
        if differs:
            why.append(f"differs: {', '.join(differs)}")
        lines.append(f"verify {self.concept} ({self.commit[:10]}, {self.subject}): {verdict}"
                     f" ({len(self.checks)} outputs: {counts or 'none'})"
                     + (f"; {'; '.join(why)}" if why else ""))
        return "\n".join(lines)


def lock_outputs(lock_text: str) -> list[tuple[str, str, str]]:
    """(stage, path, md5) of every output a dvc.lock (its text) records, in its order."""
    import yaml

    out = []
    for stage, entry in ((yaml.safe_load(lock_text) or {}).get("stages") or {}).items():
        for item in entry.get("outs") or []:
            out.append((stage, item["path"], item.get("md5") or ""))
    return out


def frozen_stages(dvc_yaml: str | None) -> set[str]:
    import yaml

    stages = (yaml.safe_load(dvc_yaml or "") or {}).get("stages") or {}
    return {name for name, stage in stages.items() if stage.get("frozen")}


def check_output(stage: str, path: str, recorded: str, committed: Path | None, rerun: Path,
                 frozen: bool = False) -> OutputCheck:
    """One output: the rerun's DVC hash against ``recorded`` (dvc.lock's), and where they
    differ, the committed bytes (``committed``: None where they are not at hand) against the
    rerun's by tolerance."""
    note = "frozen stage, not rerun: " if frozen else ""
    if not rerun.exists():
        return OutputCheck(stage, path, DIFFERS, note + "the rerun did not write it")
    built = _build(rerun)
    got = built.hash_info.value
    if got == recorded:
        files = f"{len(built)} files" if rerun.is_dir() else ""
        return OutputCheck(stage, path, BYTES, (note + files).rstrip(": "))
    head = f"md5 {got} (dvc.lock: {recorded}); "
    if committed is None or not committed.exists():
        return OutputCheck(stage, path, DIFFERS, head + "the committed bytes are neither in git "
                                                 "nor in the DVC cache (dvc pull), so only the "
                                                 "hashes were compared")
    own = dvc_md5(committed)
    if own != recorded:
        return OutputCheck(stage, path, DIFFERS, head + f"the committed copy hashes to {own}: "
                                                 "that commit's dvc.lock does not match it")
    result = compare(committed, rerun)
    return OutputCheck(stage, path, result.level, note + head + result.detail)


def compare_outputs(outputs: list[tuple[str, str, str]], committed_root: str | Path,
                    rerun_root: str | Path, frozen: set[str] = frozenset()) -> list[OutputCheck]:
    """Each (stage, path, md5) of ``outputs`` checked (``check_output``): the rerun's under
    ``rerun_root``, the committed bytes under ``committed_root`` (where there)."""
    committed_root, rerun_root = Path(committed_root), Path(rerun_root)
    checks = []
    for stage, path, md5 in outputs:
        committed = committed_root / path
        checks.append(check_output(stage, path, md5,
                                   committed if committed.exists() or committed.is_symlink()
                                   else None, rerun_root / path, stage in frozen))
    return checks


def save_committed(outputs: list[tuple[str, str, str]], checkout: Path, into: Path,
                   repo: Path) -> None:
    """The committed bytes of each output, under ``into``: copied from the fresh ``checkout``
    where git has them, else linked from ``repo``'s DVC cache by the recorded hash (left out
    where the cache lacks them)."""
    odb = None
    for _, path, md5 in outputs:
        source, target = checkout / path, into / path
        if target.exists() or target.is_symlink():
            continue
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, symlinks=True)
            else:
                shutil.copy2(source, target)
            continue
        if odb is None:
            odb = _local_cache(repo)
        if odb is not False and md5:
            _link_from_cache(odb, md5, target)


def _local_cache(repo: Path):
    """``repo``'s local DVC cache (an object database), or False where DVC cannot open it."""
    try:
        from dvc.repo import Repo

        with Repo(str(repo)) as dvc_repo:
            return dvc_repo.cache.local
    except Exception:  # noqa: BLE001 - no cache: hashes only, said per output
        return False


def _link_from_cache(odb, md5: str, target: Path) -> None:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    if not md5.endswith(".dir"):
        if odb.exists(md5):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(odb.oid_to_path(md5))
        return
    try:
        tree = Tree.load(odb, HashInfo("md5", md5))
    except Exception:  # noqa: BLE001 - the .dir itself is not in the cache
        return
    files = [("/".join(key), hi.value) for key, _, hi in tree]
    if not all(odb.exists(oid) for _, oid in files):
        return
    for rel, oid in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).symlink_to(odb.oid_to_path(oid))
    target.mkdir(parents=True, exist_ok=True)


def verify(concept: str, keep: bool = False, repo: str | Path = ".",
           say: Callable[[str], None] = print) -> VerifyReport:
    """Rerun the published experiment of ``concept`` from scratch and compare every output its
    dvc.lock records: the commit checked out in a temporary git worktree with its own empty DVC
    cache, ``dvc repro --force`` there (PYTHONPATH: that worktree; its progress streamed), then
    ``compare_outputs``. ``keep``: leave the worktree, the cache and the committed copies in the
    temporary folder (its path is in the report)."""
    root = Path(git("rev-parse", "--show-toplevel", repo=repo).strip())
    chosen = {p.concept: p for p in published(root)}
    if concept not in chosen:
        listed = ", ".join(chosen) or "none"
        raise ProvenanceError(f"no published experiment of {concept} on HEAD's first-parent "
                              f"history (a commit 'exp({concept}): ...'); published: {listed}")
    item = chosen[concept]
    lock_text, dvc_yaml = read_at(item.commit, ["dvc.lock", "dvc.yaml"], root)
    if lock_text is None:
        raise ProvenanceError(f"{item.commit[:10]} ({item.subject}) has no dvc.lock")
    outputs, frozen = lock_outputs(lock_text), frozen_stages(dvc_yaml)
    folder = Path(tempfile.mkdtemp(prefix=f"espresso-verify-{concept}-"))
    checkout, committed, cache = folder / "repo", folder / "committed", folder / "cache"
    try:
        git("worktree", "add", "--detach", str(checkout), item.commit, repo=root)
        save_committed(outputs, checkout, committed, root)
        (checkout / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PYTHONPATH": str(checkout),
               "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
        env.pop("DVC_EXP_NAME", None)
        say(f"verify {concept}: {item.commit[:10]} ({item.subject}) rerun from scratch in "
            f"{checkout}, DVC cache {cache}: dvc repro --force")
        rerun = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=checkout,
                               env=env)
        say(f"verify {concept}: comparing {len(outputs)} outputs with the commit's")
        report = VerifyReport(concept, item.commit, item.subject,
                              compare_outputs(outputs, committed, checkout, frozen),
                              rerun.returncode, folder if keep else None)
    finally:
        if not keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=root,
                           capture_output=True)
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
    say(report.table())
    if keep:
        say(f"kept: {folder} (the worktree in repo/; remove it with "
            f"`git worktree remove --force {checkout}`)")
    return report


def verify_main(concept: str, keep: bool = False, repo: str | Path = ".") -> int:
    """``verify`` as a command: prints the table; exit code 0 if it passed, 1 if not, 2 if it
    could not start (one line on stderr)."""
    try:
        return verify(concept, keep=keep, repo=repo).exit_code
    except ProvenanceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def index_main(out: str | Path = INDEX.parent, repo: str | Path = ".") -> int:
    """Print the published experiments of the current format and write their index."""
    items = of_current_format(published(repo), repo)
    path = write_index(Path(repo) / out, items, repo)
    for p in items:
        print(f"{p.concept:<20} {p.commit[:10]}  {p.date}  {p.subject}")
    print(f"{len(items)} published experiments: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.provenance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--index", action="store_true",
                        help="list the published experiments (newest exp(<concept>): commit "
                             "per concept) and write experiments.csv into --out")
    action.add_argument("--verify", metavar="CONCEPT",
                        help="rerun the published experiment of CONCEPT and compare its outputs")
    action.add_argument("--publish", metavar="EXP_OR_CONCEPT",
                        help="dvc exp apply it and commit it as exp(<concept>): <exp>")
    parser.add_argument("--keep", action="store_true",
                        help="with --verify: keep the temporary worktree and cache")
    parser.add_argument("--out", type=path_argument, default=INDEX.parent,
                        help=f"with --index: the folder of experiments.csv (default {INDEX.parent})")
    args = parser.parse_args(argv)
    if args.verify:
        return verify_main(args.verify, keep=args.keep)
    try:
        if args.index:
            return index_main(args.out)
        item = publish(args.publish)
        print(f"published {item.commit[:10]}: {item.subject}")
        return 0
    except ProvenanceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
