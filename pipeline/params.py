"""Reading and validating ``params.yaml``, the single source of every budget and seed."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import yaml

from pipeline.concepts import Concept, UnknownConceptError, get_concept

PARAMS_FILE = Path("params.yaml")
SETTINGS = ("mini", "paper")


class ParamsError(ValueError):
    """A params value that is missing or not allowed; the message names the key and the fix."""


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """The parsed params file; a missing file is a clear error, not a stack trace."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root (where dvc.yaml is).")
    return yaml.safe_load(path.read_text())


def settings_of(params: dict) -> tuple[str, Concept, dict[str, str]]:
    """The validated setting, concept and model sources of a run."""
    setting = params.get("setting")
    if setting not in SETTINGS:
        raise ParamsError(f"params.yaml: setting is {setting!r}; allowed: {', '.join(SETTINGS)}")
    concept = get_concept(str(params.get("concept")), setting)
    models = (params.get("models") or {}).get(setting)
    if not models or not {"clip", "t2i"} <= set(models):
        raise ParamsError(f"params.yaml: models.{setting} must name 'clip' and 't2i' sources")
    return setting, concept, models


def run_stage(stage: Callable[[dict], object], path: str | Path = PARAMS_FILE) -> None:
    """Run a stage on the params file; a user error ends with its message, not a traceback."""
    from pipeline.espresso.models import ModelNotAvailableError

    try:
        stage(load_params(path))
    except (ParamsError, UnknownConceptError, ModelNotAvailableError) as err:
        sys.exit(f"error: {err}")
