"""What the project's modules import, read from the source with ``ast`` (imports inside
functions included): shared by the layout test and the DVC deps test."""
import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"


def type_checking_imports(tree: ast.AST) -> list[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:``: read by type checkers, never run."""
    return [node for block in ast.walk(tree) if isinstance(block, ast.If)
            and (getattr(block.test, "id", None) == "TYPE_CHECKING"
                 or getattr(block.test, "attr", None) == "TYPE_CHECKING")
            for statement in block.body for node in ast.walk(statement)
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def imported_modules(source: str, module: str, type_checking: bool = True) -> set[str]:
    """Every module an import statement anywhere in ``source`` (of ``module``) names: for
    ``from package import name`` both the package and ``package.name`` (name may be a module).
    ``type_checking`` False: without the imports that only type checkers read."""
    package = module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    skipped = set() if type_checking else set(map(id, type_checking_imports(tree)))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def lazy_exports(package: str, root: Path = REPO) -> dict[str, str]:
    """Name -> the module it is loaded from, for a package that loads its re-exports on first
    use (a module-level ``__getattr__``, PEP 562), read from its ``_SOURCES`` dict literal
    (name -> submodule); {} for any other module."""
    path = module_file(package, root)
    if path is None or path.name != "__init__.py":
        return {}
    tree = ast.parse(path.read_text())
    if not any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
               for node in tree.body):
        return {}
    sources = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(target, "id", None) == "_SOURCES" for target in node.targets)),
                   None)
    if sources is None:
        raise ValueError(f"{path}: a lazy package needs a _SOURCES dict literal")
    return {name: f"{package}.{module}" for name, module in ast.literal_eval(sources).items()}


def imported_files(module: str, root: Path = REPO) -> set[Path]:
    """The files of ``pipeline`` that running ``module`` can execute: the module, what it imports,
    transitively, and every parent package's ``__init__.py``; of a package that loads its
    re-exports lazily (:func:`lazy_exports`), only the modules of the names imported from it.
    Imports only type checkers read are left out, and so is an empty ``__init__.py``: it runs no
    code (it becomes a dependency the moment it holds anything)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None:
            package, _, attribute = name.rpartition(".")
            todo += [source for exported, source in lazy_exports(package, root).items()
                     if exported == attribute]
            continue
        if path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        is_package = path.name == "__init__.py"
        todo += [m for m in imported_modules(path.read_text(), name + ".__init__" if is_package
                                             else name, type_checking=False)
                 if m.split(".")[0] == "pipeline"]
    return {path for path in seen if path.stat().st_size > 0}


def dvc_stages(root: Path = REPO) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    """The ``pipeline`` module a stage's command runs (``python -m pipeline.<name>``)."""
    cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
    words = cmd.split()
    return words[words.index("-m") + 1]
