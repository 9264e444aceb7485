"""The layout shows the architecture, and the imports keep to it: the filter library
(``pipeline/espresso``) imports nothing of the project outside itself, so it can become a package
of its own; the attacks and the mini world never import a DVC stage. Read from the source with
``ast``, imports inside functions included."""
from pathlib import Path

import yaml
from import_graph import PIPELINE, REPO, imported_modules


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
