"""DVC reruns exactly the stages that run edited code: each stage's deps in dvc.yaml cover every
file of ``pipeline/`` that its module imports (transitively, imports inside functions and parent
packages' ``__init__`` included) and nothing else. Checked statically (imports read with ``ast``)
and by behaviour: in a temporary git + DVC copy, editing each module makes ``dvc status`` report
the stages that import it, and only those (or stages downstream of them).

The frozen stage ``world`` is left out: DVC never checks or reruns it (its models are committed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from import_graph import REPO, dvc_stages, imported_files, stage_module


def code_deps(stage: dict, root: Path) -> list[Path]:
    """The deps of ``stage`` inside ``pipeline/`` (files and folders)."""
    return [root / dep for dep in stage.get("deps", []) if dep.split("/")[0] == "pipeline"]


def runs(stages: dict[str, dict], root: Path) -> dict[str, set[Path]]:
    """Stage -> the files its module can execute, for every stage that DVC runs (not frozen)."""
    return {name: imported_files(stage_module(stage), root)
            for name, stage in stages.items() if not stage.get("frozen")}


def is_covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


def missing_code(stages: dict[str, dict], root: Path) -> dict[str, list[str]]:
    """Stage -> the files it runs that its deps do not cover (DVC would keep a stale result)."""
    out = {}
    for name, files in runs(stages, root).items():
        deps = code_deps(stages[name], root)
        missing = sorted(str(f.relative_to(root)) for f in files if not is_covered(f, deps))
        if missing:
            out[name] = missing
    return out


def spurious_code(stages: dict[str, dict], root: Path) -> dict[str, list[str]]:
    """Stage -> the code deps that hold a file it does not run (DVC would rerun it for nothing).
    An empty ``__init__.py`` in a folder dep is no code, and is ignored."""
    out = {}
    for name, files in runs(stages, root).items():
        extra = []
        for dep in code_deps(stages[name], root):
            held = ({p for p in dep.rglob("*.py") if p.stat().st_size > 0} if dep.is_dir()
                    else {dep})
            extra += sorted(str(p.relative_to(root)) for p in held - files)
        if extra:
            out[name] = extra
    return out


def test_every_stage_depends_on_all_the_code_it_runs():
    missing = missing_code(dvc_stages(), REPO)
    assert not missing, f"dvc.yaml: add these to the stages' deps: {missing}"


def test_no_stage_depends_on_code_it_does_not_run():
    spurious = spurious_code(dvc_stages(), REPO)
    assert not spurious, (f"dvc.yaml: these deps rerun stages that never run them (list the "
                          f"files the stage imports instead of the folder): {spurious}")


@pytest.mark.slow
def test_the_static_checks_see_a_dep_too_few_and_one_too_many():
    stages = dvc_stages()
    stages["certify"]["deps"].remove("pipeline/espresso/certificate.py")  # certify runs it
    stages["generate"]["deps"].append("pipeline/judges.py")  # generate never runs the judges
    assert "pipeline/espresso/certificate.py" in missing_code(stages, REPO)["certify"]
    assert spurious_code(stages, REPO) == {"generate": ["pipeline/judges.py"]}


def test_the_import_closure_follows_function_imports_and_parent_packages(tmp_path):
    package = tmp_path / "pipeline"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")  # empty: runs nothing, is no dependency
    (package / "sub" / "__init__.py").write_text("from pipeline.sub.used import thing\n")
    (package / "sub" / "used.py").write_text("thing = 1\n")
    (package / "sub" / "unused.py").write_text("other = 2\n")
    (package / "helper.py").write_text("def f():\n    from .sub import used\n")
    (package / "stage.py").write_text("def main():\n    import pipeline.helper\n")
    assert imported_files("pipeline.stage", tmp_path) == {
        package / "stage.py", package / "helper.py", package / "sub" / "__init__.py",
        package / "sub" / "used.py"}


# ---- behaviour: what `dvc status` says after an edit, in a temporary git + DVC copy ----

def outs_of(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics", "plots") for o in stage.get(key) or []]


def downstream_of(stages: dict[str, dict], names: set[str]) -> set[str]:
    """The stages that depend, directly or through others, on an output of ``names``."""
    found, frontier = set(), set(names)
    while frontier:
        outs = [Path(o) for name in frontier for o in outs_of(stages[name])]
        frontier = {name for name, stage in stages.items() if name not in found | names
                    and any(is_covered(Path(d), outs) or any(Path(d) in o.parents for o in outs)
                            for d in stage.get("deps", []))}
        found |= frontier
    return found


class DvcCopy:
    """A git + DVC copy of the working tree whose dvc.lock matches it, without running a stage:
    every output is a placeholder, committed with ``dvc commit -f``."""

    def __init__(self, folder: Path, site: Path):
        self.folder = folder
        self.env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(site)}
        listed = self.sh("git", "ls-files", "--cached", "--others", "--exclude-standard",
                         cwd=REPO).splitlines()
        for name in listed:
            if (REPO / name).is_file():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes((REPO / name).read_bytes())
        git = ("git", "-c", "user.email=t@t", "-c", "user.name=t")
        self.sh("git", "init", "-q")
        self.sh(*git, "add", "-A")
        self.sh(*git, "commit", "-qm", "copy")
        for stage in self.stages().values():
            if stage.get("frozen"):
                continue
            for out in map(Path, outs_of(stage)):
                target = folder / out if out.suffix else folder / out / "placeholder"
                if not (folder / out).exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("placeholder\n")
        self.commit()

    def sh(self, *cmd: str, cwd: Path | None = None) -> str:
        result = subprocess.run(cmd, cwd=cwd or self.folder, env=self.env, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def stages(self) -> dict[str, dict]:
        return dvc_stages(self.folder)

    def commit(self) -> None:
        """Record the current deps and outputs in dvc.lock (no stage runs)."""
        self.sh(sys.executable, "-m", "dvc", "commit", "-f", "-q")
        assert self.changed() == set()

    def changed(self) -> set[str]:
        """The stages that ``dvc status`` says are out of date (frozen ones are never checked);
        asked in this process (DVC's API, in this copy's environment): one call per module of
        pipeline/, and a ``dvc`` command would start a fresh interpreter each time."""
        from unittest import mock

        from dvc.repo import Repo

        with mock.patch.dict(os.environ, self.env), Repo(str(self.folder)) as repo:
            # the API names a stage by its address from the cwd: "<path>/dvc.yaml:<stage>"
            return {address.rsplit(":", 1)[-1] for address in repo.status()}

    def rerun_mismatches(self, module: Path) -> list[str]:
        """Append a comment to ``module``, ask ``dvc status``, restore it; the disagreements with
        the imports: a stage that runs the module and is not reported, or one reported that
        neither runs it nor is downstream of one that does."""
        stages = self.stages()
        importers = {name for name, files in runs(stages, self.folder).items() if module in files}
        original = module.read_bytes()
        module.write_bytes(original + b"\n# edited\n")
        try:
            changed = self.changed()
        finally:
            module.write_bytes(original)
        name = module.relative_to(self.folder)
        return ([f"{name}: {s} runs it but dvc status does not report it"
                 for s in sorted(importers - changed)]
                + [f"{name}: dvc status reports {s}, which does not run it"
                   for s in sorted(changed - importers - downstream_of(stages, importers))])


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory) -> DvcCopy:
    root = tmp_path_factory.mktemp("dvc_deps")
    (root / "repo").mkdir()
    return DvcCopy(root / "repo", root / "site")


@pytest.mark.slow
def test_editing_a_module_reruns_the_stages_that_import_it_and_no_others(dvc_copy):
    modules = sorted((dvc_copy.folder / "pipeline").rglob("*.py"))
    assert len(modules) > 30
    mismatches = [m for module in modules for m in dvc_copy.rerun_mismatches(module)]
    assert not mismatches, "\n".join(mismatches)
    assert dvc_copy.changed() == set()  # every module restored


@pytest.mark.slow
def test_the_behaviour_check_sees_a_dep_that_dvc_yaml_misses(dvc_copy):
    dvc_file = dvc_copy.folder / "dvc.yaml"
    original = dvc_file.read_text()
    stages = yaml.safe_load(original)
    stages["stages"]["generate"]["deps"].remove("pipeline/mini/shapes.py")
    dvc_file.write_text(yaml.safe_dump(stages, sort_keys=False))
    try:
        dvc_copy.commit()
        mismatches = dvc_copy.rerun_mismatches(dvc_copy.folder / "pipeline/mini/shapes.py")
    finally:
        dvc_file.write_text(original)
        dvc_copy.commit()
    assert mismatches == ["pipeline/mini/shapes.py: generate runs it but dvc status does not "
                          "report it"]
