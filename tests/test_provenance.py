"""Provenance from main alone (``pipeline.provenance``): published experiments are the newest
``exp(<concept>): `` commit per concept on HEAD's first-parent history; a commit of an older
results format is skipped with one line; the comparator's levels (bytes, within tolerance,
differs) on folders, safetensors weights, JSON, CSV and uint8 images; and, slow, ``verify`` and
``publish`` end to end in a tiny DVC repository."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import provenance
from pipeline.provenance import (BYTES, DIFFERS, SUMMARY_FILES, TOLERANCE, ProvenanceError,
                                 compare, compare_outputs, dvc_md5, of_current_format, published,
                                 read_at, write_index)

IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    for key, value in IDENTITY.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    return root


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def commit(root: Path, subject: str, files: dict[str, str] | None = None) -> str:
    for path, text in (files or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "--allow-empty", "-m", subject)
    return git(root, "rev-parse", "HEAD")


def summary_files(tag: str) -> dict[str, str]:
    return {path: f"{tag}\n" for path in SUMMARY_FILES}


# --- published experiments -----------------------------------------------------------------


def test_published_is_the_newest_per_concept_on_the_first_parent_history(repo):
    commit(repo, "init", {"README.md": "x\n"})
    commit(repo, "exp(zorbo): old-zorbo", {"params.yaml": "concept: zorbo\n"})
    blip = commit(repo, "exp(blip): eaten-oafs", {"params.yaml": "concept: blip\n"})
    git(repo, "checkout", "-q", "-b", "side")
    commit(repo, "exp(blip): side-blip", {"side/params.yaml": "concept: blip\n"})
    commit(repo, "exp(kroll): side-kroll", {"side/params.yaml": "concept: kroll\n"})
    git(repo, "checkout", "-q", "main")
    zorbo = commit(repo, "exp(zorbo): shore-grip", {"params.yaml": "concept: zorbo\nnew: 1\n"})
    git(repo, "merge", "-q", "--no-ff", "side", "-m", "Merge branch 'side'")
    commit(repo, "docs: mention exp(mimi): in passing")   # not at the start: not published
    commit(repo, "exp(mimi) without a colon")

    found = published(repo)
    assert [(p.concept, p.commit, p.subject) for p in found] == [
        ("blip", blip, "exp(blip): eaten-oafs"), ("zorbo", zorbo, "exp(zorbo): shore-grip")]
    assert all(p.date[:4].isdigit() and "T" in p.date for p in found)


def test_published_in_a_repository_without_commits_is_empty(repo):
    assert published(repo) == []


def test_an_older_format_commit_is_skipped_with_one_line(repo):
    current = commit(repo, "exp(zorbo): new", summary_files("new"))
    old_files = summary_files("old")
    del old_files["reports/everyday/scores.csv"]
    git(repo, "rm", "-rq", "reports")
    old = commit(repo, "exp(blip): old", old_files)
    said = []
    kept = of_current_format(published(repo), repo, say=said.append)
    assert [p.commit for p in kept] == [current]
    assert len(said) == 1 and "\n" not in said[0]
    assert old[:8] in said[0] and "reports/everyday/scores.csv" in said[0]
    assert "skipped exp(blip)" in said[0] and "older results format" in said[0]


def test_read_at_reads_many_files_of_a_commit_in_one_call(repo):
    first = commit(repo, "one", {"a.txt": "first\n", "d/b.json": '{"x": 1}\n'})
    commit(repo, "two", {"a.txt": "second\n"})
    assert read_at(first, ["a.txt", "d/b.json", "missing.txt", "d", "a.txt"], repo) == [
        "first\n", '{"x": 1}\n', None, None, "first\n"]
    assert read_at("HEAD", ["a.txt"], repo) == ["second\n"]


def test_the_index_lists_each_published_experiment_with_its_params_hash(repo):
    commit(repo, "exp(zorbo): shore-grip", {"params.yaml": "concept: zorbo\n"})
    commit(repo, "exp(blip): eaten-oafs", {"params.yaml": "concept: blip\n"})
    path = write_index(repo / "reports/summary", published(repo), repo)
    assert path == repo / "reports/summary/experiments.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "concept,commit,subject,date,params_md5"
    blip = lines[1].split(",")
    assert blip[0] == "blip" and blip[2] == "exp(blip): eaten-oafs"
    assert blip[4] == hashlib.md5(b"concept: blip\n").hexdigest()
    assert lines[2].split(",")[0] == "zorbo"


def test_publish_refuses_a_dirty_tree_in_one_line(repo):
    commit(repo, "init", {"params.yaml": "concept: zorbo\n"})
    (repo / "params.yaml").write_text("concept: blip\n")
    with pytest.raises(ProvenanceError) as err:
        provenance.publish("some-exp", repo)
    assert "uncommitted changes" in str(err.value) and "\n" not in str(err.value)


def test_help_answers_fast_and_loads_no_heavy_library():
    code = ("import runpy, sys, contextlib, io\nsys.argv = ['x', '--help']\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    runpy.run_module('pipeline.provenance', run_name='__main__')\n"
            "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'dvc', 'yaml', 'safetensors')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "[]"


# --- the comparator ------------------------------------------------------------------------


def save_weights(path: Path, weights: dict) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(path))


@pytest.fixture()
def weights():
    rng = np.random.default_rng(0)
    return {"unet.w": rng.normal(size=(16, 8)).astype(np.float32),
            "unet.b": rng.normal(size=(8,)).astype(np.float32)}


def two_outputs(tmp_path: Path, weights: dict, changed: dict):
    """A committed and a rerun folder, each with data/edit/ (weights, a json) and a report
    json; the rerun's weights are ``changed``. Returns (outputs as dvc.lock records the
    committed ones, committed root, rerun root)."""
    roots = []
    for name, tensors in (("committed", weights), ("rerun", changed)):
        root = tmp_path / name
        save_weights(root / "data/edit/esd_x/unet.safetensors", tensors)
        (root / "data/edit/esd_x/config.json").write_text('{"steps": 10}\n')
        (root / "reports/edit").mkdir(parents=True)
        (root / "reports/edit/detail.json").write_text('{"loss": 0.25}\n')
        roots.append(root)
    outputs = [("edit", path, dvc_md5(roots[0] / path))
               for path in ("data/edit", "reports/edit/detail.json")]
    return outputs, *roots


def levels(checks) -> dict[str, str]:
    return {c.path: c.level for c in checks}


def test_identical_folders_are_bytes(tmp_path, weights):
    outputs, committed, rerun = two_outputs(tmp_path, weights, weights)
    assert compare(committed / "data/edit", rerun / "data/edit").level == BYTES
    checks = compare_outputs(outputs, committed, rerun)
    assert levels(checks) == {"data/edit": BYTES, "reports/edit/detail.json": BYTES}
    report = provenance.VerifyReport("zorbo", "0" * 40, "exp(zorbo): x", checks)
    assert report.passed and report.exit_code == 0


def test_the_last_bit_of_one_weight_flipped_is_within_tolerance(tmp_path, weights):
    flipped = {k: v.copy() for k, v in weights.items()}
    flipped["unet.w"].reshape(-1).view(np.uint32)[37] ^= 1
    assert not np.array_equal(flipped["unet.w"], weights["unet.w"])
    outputs, committed, rerun = two_outputs(tmp_path, weights, flipped)
    assert dvc_md5(rerun / "data/edit") != outputs[0][2]
    checks = compare_outputs(outputs, committed, rerun)
    assert levels(checks) == {"data/edit": TOLERANCE, "reports/edit/detail.json": BYTES}
    assert "unet.safetensors" in checks[0].detail and "unet.w[37]" in checks[0].detail
    report = provenance.VerifyReport("zorbo", "0" * 40, "exp(zorbo): x", checks)
    assert report.passed
    assert "within tolerance" in report.table() and "passed" in report.table()


def test_a_weight_changed_by_a_hundredth_differs(tmp_path, weights):
    changed = {k: v.copy() for k, v in weights.items()}
    changed["unet.b"][3] += 1e-2
    outputs, committed, rerun = two_outputs(tmp_path, weights, changed)
    checks = compare_outputs(outputs, committed, rerun)
    assert levels(checks)["data/edit"] == DIFFERS
    assert "unet.b[3]" in checks[0].detail
    assert checks[0].detail.count("0.01") >= 1  # the worst difference, stated
    report = provenance.VerifyReport("zorbo", "0" * 40, "exp(zorbo): x", checks)
    assert not report.passed and report.exit_code == 1
    assert "FAILED" in report.table() and "differs: data/edit" in report.table()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_json_numbers_within_tolerance_but_not_their_strings(tmp_path):
    committed = write(tmp_path / "a/detail.json", json.dumps(
        {"espresso": {"clip_accuracy": {"value": 0.12345678, "n": 80}}, "crt": "esd_x"}))
    close = write(tmp_path / "b/detail.json", json.dumps(
        {"espresso": {"clip_accuracy": {"value": 0.12345679, "n": 80}}, "crt": "esd_x"}))
    renamed = write(tmp_path / "c/detail.json", json.dumps(
        {"espresso": {"clip_accuracy": {"value": 0.12345678, "n": 80}}, "crt": "esd_u"}))
    result = compare(committed, close)
    assert result.level == TOLERANCE and "espresso.clip_accuracy.value" in result.detail
    result = compare(committed, renamed)
    assert result.level == DIFFERS and "crt" in result.detail and "esd_u" in result.detail
    far = write(tmp_path / "d/detail.json", json.dumps(
        {"espresso": {"clip_accuracy": {"value": 0.1235, "n": 80}}, "crt": "esd_x"}))
    assert compare(committed, far).level == DIFFERS
    keys = write(tmp_path / "e/detail.json", json.dumps({"crt": "esd_x"}))
    assert compare(committed, keys).level == DIFFERS


def test_csv_cells_numbers_within_tolerance_prompts_exactly(tmp_path):
    committed = write(tmp_path / "a/prompts.csv", "run,prompt,objective\npez+,a zorbo,0.5\n")
    close = write(tmp_path / "b/prompts.csv", "run,prompt,objective\npez+,a zorbo,0.50000001\n")
    other = write(tmp_path / "c/prompts.csv", "run,prompt,objective\npez+,a zerbo,0.5\n")
    assert compare(committed, close).level == TOLERANCE
    result = compare(committed, other)
    assert result.level == DIFFERS and "prompt" in result.detail and "zerbo" in result.detail


def test_uint8_images_may_be_off_by_one_in_a_thousandth_of_their_values(tmp_path):
    images = np.random.default_rng(1).integers(0, 250, size=(4, 32, 32, 3), dtype=np.uint8)

    def saved(name, array):
        path = tmp_path / name / "images.npz"
        path.parent.mkdir()
        np.savez(path, images=array, scores=np.linspace(0, 1, 4))
        return path

    committed = saved("committed", images)
    one = images.copy()
    one[0, 0, 0, 0] += 1
    two = images.copy()
    two[0, 0, 0, 0] += 2
    many = images.copy()
    many[0, :4, :4, :] += 1  # 48 of 12288 values
    assert compare(committed, saved("one", one)).level == TOLERANCE
    assert compare(committed, saved("two", two)).level == DIFFERS
    result = compare(committed, saved("many", many))
    assert result.level == DIFFERS and "48 of 12288" in result.detail


def test_a_folder_needs_the_same_files(tmp_path):
    write(tmp_path / "a/x.json", "1\n")
    write(tmp_path / "b/x.json", "1\n")
    write(tmp_path / "b/y.json", "2\n")
    result = compare(tmp_path / "a", tmp_path / "b")
    assert result.level == DIFFERS and "y.json" in result.detail


def test_an_output_whose_committed_bytes_are_missing_or_tampered_differs(tmp_path):
    write(tmp_path / "rerun/reports/x.json", '{"a": 1.0}\n')
    write(tmp_path / "committed/reports/x.json", '{"a": 1.0000001}\n')
    honest = dvc_md5(tmp_path / "committed/reports/x.json")
    checks = compare_outputs([("s", "reports/x.json", honest)], tmp_path / "committed",
                             tmp_path / "rerun")
    assert checks[0].level == TOLERANCE
    checks = compare_outputs([("s", "reports/x.json", "0" * 32)], tmp_path / "committed",
                             tmp_path / "rerun")
    assert checks[0].level == DIFFERS and "does not match" in checks[0].detail
    checks = compare_outputs([("s", "reports/x.json", honest)], tmp_path / "nothing",
                             tmp_path / "rerun")
    assert checks[0].level == DIFFERS and "only the hashes" in checks[0].detail
    checks = compare_outputs([("s", "reports/gone.json", honest)], tmp_path / "committed",
                             tmp_path / "rerun")
    assert checks[0].level == DIFFERS and "did not write" in checks[0].detail


def test_dvc_md5_is_the_hash_dvc_lock_records(tmp_path):
    folder = tmp_path / "out"
    write(folder / "b.txt", "b\n")
    write(folder / "sub/a.txt", "a\n")
    entries = [{"md5": hashlib.md5(b"b\n").hexdigest(), "relpath": "b.txt"},
               {"md5": hashlib.md5(b"a\n").hexdigest(), "relpath": "sub/a.txt"}]
    listing = json.dumps(entries, sort_keys=True).encode()
    assert dvc_md5(folder) == hashlib.md5(listing).hexdigest() + ".dir"
    assert dvc_md5(folder / "b.txt") == hashlib.md5(b"b\n").hexdigest()


# --- end to end: a tiny DVC repository -----------------------------------------------------

MAKE = """import json, os, sys
import numpy as np
concept = open("params.yaml").read().split("concept:")[1].split()[0]
os.makedirs("data/out", exist_ok=True)
os.makedirs("reports/make", exist_ok=True)
np.savez("data/out/images.npz", images=np.full((2, 4, 4), len(concept), dtype=np.uint8))
open("data/out/note.txt", "w").write(concept + "\\n")
weights = np.linspace(0, 1, 8, dtype=np.float32)
if os.environ.get("FLIP_LAST_BIT"):  # as another CPU's float kernels might
    weights.view(np.uint32)[3] ^= 1
np.savez("data/out/weights.npz", weights=weights)
json.dump({"concept": concept, "score": 1 / 3}, open("reports/make/detail.json", "w"))
"""
DVC_YAML = """stages:
  make:
    cmd: python make.py
    deps: [make.py]
    params: [concept]
    outs:
      - data/out
      - reports/make/detail.json:
          cache: false
"""


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture()
def dvc_repo(repo, monkeypatch):
    """A tiny DVC repository whose one stage writes a cached folder and a git-tracked report,
    run once and committed as ``exp(x): first``."""
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent),
                                                os.environ["PATH"]]))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    write(repo / "make.py", MAKE)
    write(repo / "dvc.yaml", DVC_YAML)
    write(repo / "params.yaml", "concept: x\n")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.check_update", "false")
    dvc(repo, "repro", "-q")
    commit(repo, "exp(x): first")
    return repo


@pytest.mark.slow
def test_verify_reruns_a_published_experiment_and_names_a_tampered_output(dvc_repo, capsys,
                                                                          monkeypatch):
    report = provenance.verify("x", repo=dvc_repo)
    assert report.passed, report.table()
    assert levels(report.checks) == {"data/out": BYTES, "reports/make/detail.json": BYTES}
    assert "passed" in capsys.readouterr().out
    assert git(dvc_repo, "worktree", "list").count("\n") == 0  # its worktree removed

    monkeypatch.setenv("FLIP_LAST_BIT", "1")  # the committed bytes come from the DVC cache
    report = provenance.verify("x", repo=dvc_repo)
    assert levels(report.checks) == {"data/out": TOLERANCE, "reports/make/detail.json": BYTES}
    assert report.passed and "weights.npz" in report.checks[0].detail
    monkeypatch.delenv("FLIP_LAST_BIT")

    lock = (dvc_repo / "dvc.lock").read_text()
    recorded = next(line.split()[-1] for line in lock.splitlines()[
        lock.splitlines().index("    - path: reports/make/detail.json"):] if "md5:" in line)
    (dvc_repo / "dvc.lock").write_text(lock.replace(recorded, "0123456789abcdef" * 2))
    commit(dvc_repo, "exp(x): tampered")
    assert provenance.verify_main("x", repo=dvc_repo) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "differs: reports/make/detail.json" in out
    assert provenance.verify_main("nothing", repo=dvc_repo) == 2


@pytest.mark.slow
def test_publish_commits_an_experiment_as_exp_concept(dvc_repo):
    (dvc_repo / "make.py").write_text(MAKE + "# the experiment's code\n")
    out = dvc(dvc_repo, "exp", "run", "--temp", "-S", "concept=yy")
    name = out.split("Ran experiment(s): ")[1].split()[0]
    git(dvc_repo, "checkout", "make.py")
    (dvc_repo / "notes.txt").write_text("mine, not the experiment's\n")
    item = provenance.publish(name, dvc_repo)
    assert item.concept == "yy" and item.subject == f"exp(yy): {name}"
    assert git(dvc_repo, "show", "--name-only", "--format=", "HEAD").split() == [
        "dvc.lock", "make.py", "params.yaml", "reports/make/detail.json"]
    assert (dvc_repo / "make.py").read_text().endswith("# the experiment's code\n")
    assert json.loads(read_at("HEAD", ["reports/make/detail.json"], dvc_repo)[0])[
        "concept"] == "yy"
    assert [p.concept for p in published(dvc_repo)] == ["x", "yy"]
