"""Finished attack runs of an interrupted ``attack`` stage, so that a rerun resumes instead of
starting over (a full mini comparison's attack stage is about an hour of 132 runs on 2 cores).

A run's checkpoint is what costs: its search results at every budget fraction (prompts, scores,
strengths, CCE's learned token vectors) and its rendered images; its scoring is cheap and is
redone. Checkpoints live under ``.cache/attack-runs/<fingerprint>/`` (git-ignored), where the
fingerprint is a SHA-256 of everything a run depends on: the params, every source file of
``pipeline/``, and every file of the stage's input folders. A change to any of them is another
folder, so a resumed stage computes exactly what a fresh one would (each run depends only on its
own seeds). The stage removes its folder when it finishes; the whole ``.cache/attack-runs`` can
be deleted at any time. Saved as JSON, safetensors and ``.npz`` without pickles."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.attacks.context import AttackResult, Results

ROOT = Path(".cache/attack-runs")


def fingerprint(params_json: str, inputs: list[Path], sources: Path = Path("pipeline")) -> str:
    """SHA-256 of the params (as JSON), every ``.py`` file under ``sources`` and every file
    under ``inputs`` (folders or files), each with its path."""
    digest = hashlib.sha256(params_json.encode())
    files = sorted(sources.rglob("*.py")) + sorted(
        f for p in inputs for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file())
    for path in files:
        digest.update(path.as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def save(folder: Path, results: Results, images: dict[float, np.ndarray]) -> None:
    """A finished run: ``results`` and its rendered ``images`` per budget fraction, written
    to a temporary folder and renamed (a killed write leaves no checkpoint)."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    record, vectors = [], {}
    for k, (budget, result) in enumerate(results.items()):
        record.append({"budget": budget, "prompts": result.prompts,
                       "objective": result.objective, "trial_success": result.trial_success,
                       "adaptive_weights": result.adaptive_weights,
                       "tokens": list(result.textual_inversion)})
        for j, vector in enumerate(result.textual_inversion.values()):
            vectors[f"{k}.{j}"] = vector.detach().cpu().contiguous()
        np.savez(tmp / f"images{k}.npz", images=images[budget])
    (tmp / "results.json").write_text(json.dumps(record))
    save_file(vectors, tmp / "vectors.safetensors")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load(folder: Path) -> tuple[Results, dict[float, np.ndarray]] | None:
    """The results and images of a finished run, or None where it has no checkpoint."""
    from safetensors.torch import load_file

    if not (folder / "results.json").is_file():
        return None
    vectors = load_file(folder / "vectors.safetensors")
    results, images = {}, {}
    for k, entry in enumerate(json.loads((folder / "results.json").read_text())):
        budget = entry["budget"]
        results[budget] = AttackResult(
            entry["prompts"], entry["objective"], entry["trial_success"],
            entry["adaptive_weights"],
            {token: vectors[f"{k}.{j}"] for j, token in
             enumerate(entry["tokens"])})
        with np.load(folder / f"images{k}.npz", allow_pickle=False) as saved:
            images[budget] = saved["images"]
    return results, images
