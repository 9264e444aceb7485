"""Reading ``params.yaml``, the single source of every budget and seed."""
from __future__ import annotations

from pathlib import Path

import yaml

PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """The parsed params file; a missing file is a clear error, not a stack trace."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path} not found: run from the repository root (where dvc.yaml is).")
    return yaml.safe_load(path.read_text())
