"""What the project's modules import, read from the source with ``ast`` (imports inside
functions included): shared by the layout test and the DVC deps test."""
import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"


def imported_modules(source: str, module: str) -> set[str]:
    """Every module an import statement anywhere in ``source`` (of ``module``) names: for
    ``from package import name`` both the package and ``package.name`` (name may be a module)."""
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a project module (a package: its ``__init__.py``); None for other modules
    and for names that are not modules (``from package import function``)."""
    path = root / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def imported_files(module: str, root: Path = REPO) -> set[Path]:
    """The files of ``pipeline`` that running ``module`` can execute: the module, what it imports,
    transitively, and every parent package's ``__init__.py``. An empty ``__init__.py`` runs no
    code and is left out (it becomes a dependency the moment it holds anything)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        is_package = path.name == "__init__.py"
        todo += [m for m in imported_modules(path.read_text(), name + ".__init__" if is_package
                                             else name)
                 if m.split(".")[0] == "pipeline"]
    return {path for path in seen if path.stat().st_size > 0}


def dvc_stages(root: Path = REPO) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    """The ``pipeline`` module a stage's command runs (``python -m pipeline.<name>``)."""
    cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
    words = cmd.split()
    return words[words.index("-m") + 1]
