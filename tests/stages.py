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
    """generate -> finetune -> edit -> evaluate -> attack -> certify in the current directory,
    on ``params`` checked first (as the model the stages take: ``check_params``)."""
    from pipeline import attack, certify, edit, evaluate, finetune, generate
    from pipeline.params import check_params

    params = check_params(params)
    generate.run(params)
    finetune.run(params)
    edit.run(params)
    return {"evaluate": evaluate.run(params), "attack": attack.run(params),
            "certify": certify.run(params)}


def tiny_params_for() -> dict:
    """params.yaml with CPU-sized budgets (seconds per stage), on the character `zorbo`
    (whatever concept params.yaml has). A dict, to change freely; a stage takes
    ``pipeline.params.check_params(tiny_params_for())``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["concept"] = "zorbo"
    params["generate"].update(prompts={"train": 4, "val": 2, "test": 2},
                              images_per_prompt={"train": 1, "val": 2, "test": 2}, shard_size=8)
    params["generate"]["mini"].update(steps=4)
    params["generate"]["paper"].update(steps=2, size=32)
    params["finetune"].update(batch=4)
    params["finetune"]["mini"].update(epochs=2)
    params["finetune"]["paper"].update(epochs=2, epochs_by_concept={})
    for setting in ("mini", "paper"):
        crts = params["edit"][setting]
        for name in ("esd_x", "esd_u", "ca"):
            crts[name].update(steps=2, batch=1, checkpoint_every=1)
    params["edit"]["crts"] = ["esd_x", "uce"]  # every CRT's own tests are in test_crts.py
    params["attack"].update(targets=4, prompts=2, images_per_prompt=2,
                            adapt_to=["safety_checker", "espresso"])
    for setting in ("mini", "paper"):
        budgets = params["attack"][setting]
        for name in ("typo", "pez"):
            budgets[name].update(tokens=4, steps=5, candidates=3, selection_images=1)
        budgets["cce"].update(steps=2, batch=2, selection_images=1)
        budgets["ringbell"].update(tokens=4, population=8, generations=2, candidates=3,
                                   selection_images=1)
    return params
