"""The layout shows the architecture, and the imports keep to it: the filter library
(``pipeline/espresso``) imports nothing of the project outside itself, so it can become a package
of its own; the attacks and the mini world never import a DVC stage, and no stage or command
imports another stage (what a stage's readers need of its outputs is in ``pipeline/outputs``).
Read from the source with ``ast``, imports inside functions included. Commands answer ``--help``
without loading a model library."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from import_graph import (PIPELINE, REPO, dvc_stages, imported_files, imported_modules,
                          lazy_exports, stage_module)

#: The project's commands besides the stages.
COMMANDS = ("pipeline.summary", "pipeline.export", "pipeline.screen", "pipeline.plan",
            "pipeline.provenance")
#: Libraries that take seconds to import: no command loads one before it parses its arguments.
HEAVY = ("torch", "diffusers", "transformers", "pandas", "sklearn", "matplotlib", "open_clip",
         "scipy")


def stage_modules() -> set[str]:
    """``pipeline.<stage>`` of every stage in dvc.yaml (each one module at the top level)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {f"pipeline.{name}" for name in stages}


def modules_under(folder: str) -> dict[str, set[str]]:
    """Module name -> the modules it imports, for every file under ``pipeline/<folder>``."""
    files = sorted((PIPELINE / folder).rglob("*.py"))
    assert files, folder
    out = {}
    for path in files:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name] = imported_modules(path.read_text(), name)
    return out


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_stage_is_one_module_at_the_top_level():
    for module in stage_modules():
        assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file(), module


def test_the_library_imports_nothing_outside_itself():
    for name, imports in modules_under("espresso").items():
        outside = {m for m in imports
                   if is_within(m, "pipeline") and m != "pipeline"
                   and not is_within(m, "pipeline.espresso")}
        assert not outside, f"{name} imports {sorted(outside)}"


def test_attacks_and_the_mini_world_import_no_stage():
    stages = stage_modules()
    for folder in ("attacks", "mini"):
        for name, imports in modules_under(folder).items():
            used = {m for m in imports for stage in stages if is_within(m, stage)}
            assert not used, f"{name} imports the stage module(s) {sorted(used)}"


def test_the_import_reader_sees_imports_inside_functions():
    source = ("def f():\n    from pipeline import generate\n"
              "def g():\n    from ..mini import shapes\n    import pipeline.world\n")
    found = imported_modules(source, "pipeline.espresso.filter")
    assert {"pipeline.generate", "pipeline.mini.shapes", "pipeline.world"} <= found


def module_imports(module: str) -> set[str]:
    path = (REPO / Path(*module.split("."))).with_suffix(".py")
    return imported_modules(path.read_text(), module)


@pytest.mark.parametrize("module", sorted(stage_modules()) + list(COMMANDS))
def test_no_stage_or_command_imports_a_stage(module):
    used = {m for m in module_imports(module) for stage in stage_modules() - {module}
            if is_within(m, stage)}
    assert not used, f"{module} imports the stage module(s) {sorted(used)}"


def test_the_checker_is_a_dep_only_of_stages_that_import_it():
    checker = REPO / "pipeline/espresso/checker.py"
    for name, stage in dvc_stages().items():
        if stage.get("frozen"):
            continue  # DVC never checks a frozen stage's deps
        deps = [REPO / dep for dep in stage.get("deps", [])]
        if any(checker == dep or dep in checker.parents for dep in deps):
            assert checker in imported_files(stage_module(stage)), (
                f"{name} depends on {checker.relative_to(REPO)} but never imports it")


def test_the_library_re_exports_every_name_from_the_module_that_defines_it():
    import pipeline.espresso as espresso

    sources = lazy_exports("pipeline.espresso")
    assert sorted(sources) == sorted(espresso.__all__)
    for name, module in sources.items():
        assert getattr(espresso, name).__module__ == module, name


def run_python(code: str) -> str:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_the_filter_does_not_load_the_checker():
    loaded = run_python("import sys, pipeline.espresso\n"
                        "pipeline.espresso.EspressoFilter\n"
                        "print('pipeline.espresso.filter' in sys.modules, "
                        "'pipeline.espresso.checker' in sys.modules)")
    assert loaded.split() == ["True", "False"]


def test_every_command_answers_help_without_loading_a_model_library():
    """Each ``python -m <command> --help``, one after another in one process: after each, the
    heavy libraries loaded so far (the first command to list one loaded it)."""
    commands = [stage_module(stage) for stage in dvc_stages().values()] + list(COMMANDS)
    code = f"""
import contextlib, io, json, runpy, sys
loaded = {{}}
for name in {commands!r}:
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    loaded[name] = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps(loaded))
"""
    loaded = json.loads(run_python(code))
    assert loaded == {name: [] for name in commands}
