"""Running the stages in scratch folders with CPU-sized budgets (shared by the stage tests)."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_stage_dir(path: Path) -> Path:
    """A working directory where stages can run: the shipped world and registry linked in.
    Stages write only inside it."""
    (path / "data").mkdir(parents=True)
    os.symlink(REPO / "data" / "world", path / "data" / "world")
    os.symlink(REPO / "data" / "concepts.yaml", path / "data" / "concepts.yaml")
    return path


def stage_command(stage: str, *args: str, cwd: Path, env: dict | None = None,
                  kill: tuple[str, int, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline.<stage> *args`` in ``cwd``, as a user runs it, with this checkout's
    code and umask 022; ``env`` is added to the environment (a None value unsets the variable).
    ``kill=(function, n, "before" | "after")`` runs it under ``kill_runner.py``, which SIGKILLs it
    at the n-th call of ``function`` (a dotted name)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    launcher = ([str(REPO / "tests" / "kill_runner.py"), *map(str, kill), stage] if kill
                else ["-m", f"pipeline.{stage}"])
    return subprocess.run([sys.executable, *launcher, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, umask=0o022,
                          env={k: v for k, v in environment.items() if v is not None})


def run_all_stages(params: dict) -> dict:
    """generate -> finetune -> edit -> evaluate -> everyday -> attack -> certify in the current
    directory, on ``params`` checked first (as the model the stages take: ``check_params``)."""
    from pipeline import attack, certify, edit, evaluate, everyday, finetune, generate
    from pipeline.params import check_params

    params = check_params(params)
    generate.run(params)
    finetune.run(params)
    edit.run(params)
    return {"evaluate": evaluate.run(params), "everyday": everyday.run(params),
            "attack": attack.run(params), "certify": certify.run(params)}


def tiny_params_for() -> dict:
    """params.yaml at ``budget: smoke`` (seconds per stage) on the character `zorbo`, as a stage
    reads them (the smoke preset merged: ``pipeline.params.apply_budget``), with the tests' own
    cuts on top: two CRTs and two adapted filters (every CRT's and attack's own tests are in
    test_crts.py, test_attacks.py), and paper-setting images the size of the tiny hub models.
    A dict, to change freely; a stage takes ``pipeline.params.check_params(tiny_params_for())``;
    written to a params file, they load as they are."""
    from pipeline.params import apply_budget

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = apply_budget({**params, "concept": "zorbo", "budget": "smoke"})
    params["edit"]["crts"] = ["esd_x", "uce"]
    params["attack"]["adapt_to"] = ["safety_checker", "espresso"]
    params["generate"]["paper"]["size"] = 32
    params["attack"]["curve_images_per_prompt"] = 1  # the curve's images a subset of the runs'
    return params


def wiring_params_for() -> dict:
    """``tiny_params_for`` cut to the fewest runs that still run every stage once: one attack
    seed, no budget curve, PEZ plain and adapted to Espresso, the closed-form edit UCE and
    UnlearnDiff through it. For the tests of how stages are wired (DVC, experiments, export),
    which rerun the whole pipeline several times; what the cut leaves out is tested on
    ``tiny_params`` (test_pipeline's tiny run, test_crts, test_attacks)."""
    params = tiny_params_for()
    params["edit"]["crts"] = ["uce"]
    params["attack"].update(seeds=1, budgets=[1.0], attacks=["pez"], adapt_to=["espresso"],
                            edit_attacks=["udiff"])
    return params
