"""Stage commands behave like commands: ``python -m pipeline.<stage> --help`` says what the stage
does, reads, writes and which params it uses, and touches nothing; a missing upstream output or
a param value that is not allowed ends the command with one line that says what to do, not a
traceback. Each command runs in a subprocess in a scratch folder, as a user runs it."""
import importlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from import_graph import dvc_stages
from stages import make_stage_dir
from stages import stage_command as command

pytestmark = pytest.mark.slow  # each test runs a stage command in a subprocess

REPO = Path(__file__).resolve().parents[1]
STAGES = list(dvc_stages())
MANIFEST, FILTER = "data/generate/manifest.csv", "data/finetune/filter"


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (symlinks not followed)."""
    return sorted(str(Path(root, name).relative_to(folder))
                  for root, dirs, files in os.walk(folder) for name in dirs + files)


def scratch(tmp_path: Path, params: dict | None = None, present: tuple[str, ...] = ()) -> Path:
    """A stage folder with the repository's params (or ``params``) and placeholders for the
    upstream outputs in ``present`` (a name with a suffix is a file, else a folder)."""
    folder = make_stage_dir(tmp_path / "work")
    text = yaml.safe_dump(params) if params else (REPO / "params.yaml").read_text()
    (folder / "params.yaml").write_text(text)
    for name in present:
        path = folder / name
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("placeholder\n")
        else:
            path.mkdir(parents=True)
    return folder


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("module", [*STAGES, "summary", "export", "screen", "plan"])
def test_help_says_what_the_command_does_and_touches_nothing(tmp_path, module):
    folder = make_stage_dir(tmp_path)
    before = listing(folder)
    result = command(module, "--help", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m pipeline.{module}")
    doc = importlib.import_module(f"pipeline.{module}").__doc__
    assert doc.splitlines()[0] in result.stdout  # what it does: the module's docstring
    if module in STAGES:  # what it reads and writes, its params: from dvc.yaml
        stage = dvc_stages()[module]
        for label in ("reads:", "writes:", "params:"):
            assert label in result.stdout
        assert f"dvc repro {module}" in result.stdout
        assert all(key in result.stdout for key in stage["params"])
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert all(out in result.stdout for out in outs)
    assert listing(folder) == before  # nothing written, nothing loaded: it only printed


@pytest.mark.parametrize("module", ["report", "world", "summary", "export"])
def test_an_unknown_argument_is_argparse_s_error(tmp_path, module):
    result = command(module, "--bogus", cwd=make_stage_dir(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("error: unrecognized arguments: --bogus")


@pytest.mark.parametrize("stage, present, missing, producer", [
    ("generate", (), "data/world/sd", "world"),
    ("finetune", (), MANIFEST, "generate"),
    ("evaluate", (MANIFEST,), FILTER, "finetune"),
    ("everyday", (MANIFEST, FILTER), "data/edit", "edit"),
    ("attack", (MANIFEST,), FILTER, "finetune"),
    ("certify", (MANIFEST, FILTER), "data/attack", "attack"),
    ("report", (MANIFEST, "reports/finetune/detail.json", "reports/evaluate/detail.json",
                "reports/everyday/detail.json", "reports/attack/detail.json"),
     "reports/certify/detail.json", "certify"),
])
def test_a_missing_upstream_output_names_the_stage_to_run(tmp_path, stage, present, missing,
                                                          producer):
    folder = scratch(tmp_path, present=present)
    if stage == "generate":
        (folder / "data" / "world").unlink()  # the shipped mini world, not checked out
    before = listing(folder)
    line = one_error_line(command(stage, cwd=folder))
    assert missing in line
    if producer == "world":  # frozen: committed in git, restored rather than rerun
        assert "frozen stage `world`" in line and "git checkout" in line
    else:
        assert line == f"error: {missing} not found: run `dvc repro {producer}` first"
    assert listing(folder) == before


@pytest.mark.parametrize("stage, key, value, allowed, present", [
    ("generate", "setting", "foo", "mini, paper", ()),
    ("generate", "concept", "garfield", "zorbo", ()),
    ("generate", "generate.mini.scheduler", "Foo", "DDIMScheduler", ()),
    ("finetune", "finetune.mini.optimizer", "foo", "adamw, adam", (MANIFEST,)),
    ("attack", "attack.attacks", ["nope"], "typo, pez, cce, ringbell", (MANIFEST, FILTER)),
])
def test_a_param_value_not_allowed_is_named_in_one_line(tmp_path, stage, key, value, allowed,
                                                        present):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    folder = scratch(tmp_path, params, present)
    before = listing(folder)
    line = one_error_line(command(stage, cwd=folder))
    assert key in line and repr(value) in line and allowed in line, line
    assert listing(folder) == before
