"""DVC experiments for the cross-concept tools (``pipeline.summary``, ``pipeline.export``):
running one per concept (one after another, or through DVC's queue) and reading every recorded
experiment back from ``dvc exp show``. Apart from what they compute, so that both read
experiments the same way."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from pipeline.concepts import known_concepts
from pipeline.espresso.filter_names import FILTERS
from pipeline.params import Interrupted, apply_budget, exit_on_signals, interrupted_line
from pipeline.provenance import cat_files

#: Params that pick no score a summary reads (report: how images are shown; statistics: the
#: summary recomputes every interval itself): experiments that differ only in them are one sweep
#: (``presets``: compared as merged by ``budget``, :func:`same_sweep`).
NOT_SWEPT = ("concept", "summary", "statistics", "report", "presets")
#: Within a section: params that only add outputs (``attack.budgets``: budget-curve points, and
#: ``attack.curve_images_per_prompt``: how many images each point scores; the full budget's
#: results are the same with or without them, ``tests/test_attacks.py``, ``test_pipeline``).
NOT_SWEPT_KEYS = (("attack", "budgets"), ("attack", "curve_images_per_prompt"))
#: Where ``dvc exp run --temp`` copies the repository (``tmp*`` folders, one per experiment);
#: a killed run leaves its copy there, which nothing else removes.
EXPERIMENT_COPIES = Path(".dvc/tmp/exps")


def dvc(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def concept_runs(setting: str, overrides: list[str], target: str | None = None,
                 concepts: list[str] | None = None) -> list[list[str]]:
    """The ``dvc exp run`` arguments of one experiment per concept of ``setting`` (or of
    ``concepts``), with the ``KEY=VALUE`` param ``overrides``, up to the stage ``target`` if
    given."""
    sets = [arg for override in overrides for arg in ("-S", override)]
    return [[*sets, "-S", f"concept={concept}", *([target] if target else [])]
            for concept in concepts or known_concepts(setting)]


def run_experiments(runs: list[list[str]], jobs: int = 1) -> None:
    """Each of ``runs`` (``dvc exp run`` arguments) as a DVC experiment in a temporary copy of
    the repository: the workspace keeps its concept and results. ``jobs`` 1: one after another
    (``--temp``). More: all queued (``dvc exp run --queue``, which snapshots the workspace now)
    and run by ``jobs`` queue workers (``dvc queue start --jobs``) until every one has ended;
    with several GPUs each stage claims its own (``pipeline.params.claim_device``). Fails, naming
    them, if any failed."""
    if jobs == 1:
        with removing_copies_if_interrupted():
            for args in tqdm(runs, desc="experiments", unit="experiment"):
                dvc("exp", "run", "--temp", *args)
        return
    names = [re.search(r"Queued experiment '([^']+)'", dvc("exp", "run", "--queue", *args))[1]
             for args in runs]
    # each worker's stages keep TORCH_THREADS threads: sleeping, not spinning, while they wait
    # lets workers share CPU cores (no effect on any output)
    dvc("queue", "start", "--jobs", str(jobs),
        env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ})
    with tqdm(total=len(names), desc=f"experiments ({jobs} workers)", unit="experiment") as bar:
        while True:
            status = queue_status(names)
            ended = [name for name in names if status.get(name, "Queued") not in ("Queued",
                                                                                  "Running")]
            bar.update(len(ended) - bar.n)
            if len(ended) == len(names):
                break
            time.sleep(5)
    failed = [name for name in names if status[name] != "Success"]
    if failed:
        raise RuntimeError(f"experiments {', '.join(failed)} failed: see `dvc queue logs NAME`")


@contextlib.contextmanager
def removing_copies_if_interrupted():
    """On ctrl-C, SIGTERM or SIGHUP in the block: remove the repository copies DVC made in it
    (``EXPERIMENT_COPIES``; its ``dvc exp run`` is killed with this process, and the stages in
    it with that, ``pipeline.params.exit_on_signals``), then exit with one line."""
    exit_on_signals()
    before = set(EXPERIMENT_COPIES.glob("tmp*"))
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as err:
        left = sorted(set(EXPERIMENT_COPIES.glob("tmp*")) - before)
        for copy_dir in left:
            shutil.rmtree(copy_dir, ignore_errors=True)
        line, status = interrupted_line(err)
        print(f"error: {line}: the running experiment stopped, its temporary copy removed "
              f"({len(left)} in {EXPERIMENT_COPIES}); finished ones are kept (dvc exp show)",
              file=sys.stderr)
        raise SystemExit(status) from None


def queue_status(names: list[str]) -> dict[str, str]:
    """Experiment name -> its status in ``dvc queue status`` (Queued, Running, Success, Failed
    or Unknown), for those of ``names`` it lists."""
    rows = (line.split() for line in dvc("queue", "status").splitlines())
    return {row[1]: row[-1] for row in rows if len(row) >= 3 and row[1] in names}


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` with DVC-style ``dotted.key=value`` overrides (values parsed as YAML)."""
    params = copy.deepcopy(params)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"--set {override!r}: expected KEY=VALUE, e.g. attack.adapt_to=[]")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def experiments(shown: list[dict]) -> list[dict]:
    """(name, rev, baseline, params, metrics, detail) of every experiment in ``dvc exp show
    --json`` output, the workspace included (rev "workspace"); ``baseline`` is the commit it ran
    on. ``metrics`` are the stages' headlines (what DVC shows), ``detail`` per stage its
    ``reports/<stage>/detail.json`` (:func:`details`)."""
    out = []
    for rev in shown:
        for entry in [rev, *[e for exp in rev.get("experiments") or [] for e in exp["revs"]]]:
            data = entry.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
            metrics = {path: m.get("data") for path, m in (data.get("metrics") or {}).items()}
            if params and metrics:
                out.append({"name": entry.get("name") or entry.get("rev"), "rev": entry["rev"],
                            "baseline": rev["rev"], "params": params, "metrics": metrics,
                            "timestamp": data.get("timestamp") or ""})
    for run, detail in zip(out, details(out)):
        run["detail"] = detail
    return out


METRICS_PATH = re.compile(r"reports/(\w+)/metrics\.json")


def details(runs: list[dict]) -> list[dict[str, dict]]:
    """Per run, stage -> its detail.json as that run recorded it, for each stage whose metrics
    it has: an experiment is a git commit and a detail.json (a DVC output with ``cache: false``)
    is committed in it, so it is read from the commit (``git cat-file``); the workspace's from
    disk. A run recorded before the stages split their results has no detail.json: its
    metrics.json is the detail."""
    wanted = [(i, match[1], path) for i, run in enumerate(runs) for path in run["metrics"]
              if (match := METRICS_PATH.fullmatch(path))]
    committed = [(i, stage, path) for i, stage, path in wanted if runs[i]["rev"] != "workspace"]
    found = cat_files([f"{runs[i]['rev']}:reports/{stage}/detail.json"
                       for i, stage, _ in committed])
    texts = dict(zip(((i, stage) for i, stage, _ in committed), found))
    out = [{} for _ in runs]
    for i, stage, path in wanted:
        if runs[i]["rev"] == "workspace":
            local = Path(f"reports/{stage}/detail.json")
            text = local.read_text() if local.is_file() else None
        else:
            text = texts[(i, stage)]
        out[i][stage] = json.loads(text) if text is not None else runs[i]["metrics"][path]
    return out


def newest_per_concept(runs: list[dict], params: dict, stages: tuple[str, ...]) -> dict[str, dict]:
    """Per concept, its newest experiment run with exactly ``params`` (the concept aside) that
    has the metrics of every stage in ``stages``."""
    chosen = {}
    for run in sorted(runs, key=lambda r: r["timestamp"], reverse=True):
        if not all(run["detail"].get(stage) for stage in stages):
            continue
        if not _current_format(run["detail"], stages):
            continue
        if same_sweep(run["params"], params):
            chosen.setdefault(run["params"]["concept"], run)
    return chosen


def _current_format(detail: dict, stages: tuple[str, ...]) -> bool:
    """Results in the format the summary reads: every filter of ``FILTERS`` rated, with
    intervals (older records lack filters or intervals), and the attack runs plain and per
    adapted target."""
    evaluate = detail["evaluate"]
    if not all(isinstance((evaluate.get(name) or {}).get("clip_accuracy"), dict)
               for name in FILTERS):
        return False
    return "attack" not in stages or "runs" in detail["attack"]


def same_sweep(run_params: dict, params: dict) -> bool:
    """One sweep: the same params, each with its budget's preset merged (recorded without a
    budget: full). So a full-budget summary never takes a smoke experiment, and a smoke one
    (``-S budget=smoke``) takes only smoke experiments and says so. ``NOT_SWEPT_KEYS`` differ
    freely."""
    def swept(p: dict) -> dict:
        out = {k: v for k, v in apply_budget({"budget": "full", **p}).items()
               if k not in NOT_SWEPT}
        for section, key in NOT_SWEPT_KEYS:
            out[section] = {k: v for k, v in out.get(section, {}).items() if k != key}
        return out

    return swept(run_params) == swept(params)
