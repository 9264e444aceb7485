r"""Each stage's results in two files: ``reports/<stage>/detail.json``, every number the stage
measured (nested: per CRT, per attack run, each rate with its 95% interval), which the reports
read; and ``reports/<stage>/metrics.json``, DVC's metrics file, a flat headline of the few numbers
a person compares across experiments (``dvc metrics show``, ``dvc exp show``).

The headline is a pure function of the detail (:func:`headline`), one mechanism for every stage
with the stage's rules in ``HEADLINES``: so any metrics.json can be checked against the
detail.json beside it (``python -m pipeline.headline``).

A rule is (key, path, reduction). The path is a dotted path into the detail; ``{crt}`` in both
key and path is each name of ``CRTS`` in turn (a CRT the detail lacks has no key); any other
``{name}`` in the path matches whatever is there (one or more names) and the reduction
(``max``, ``min``) takes the worst or best of what it matches. So the attack stage's
``worst_clip_accuracy.espresso`` is the highest CLIP accuracy of any attack adapted to Espresso
fine-tuned (``outcomes.espresso.<attack>+``): the worst adapted attack.

To compare experiments without the params and code columns (params.yaml alone has ~200 keys):

    dvc exp show --drop '^(data|pipeline|reports)/' \
        --drop '^(models|generate|finetune|edit|filters|attack|certify|everyday|report|statistics|summary|world)\.'
    dvc exp show --only-changed --drop '^(data|pipeline|reports)/'   # what a sweep changed

``python -m pipeline.headline`` checks that every stage's metrics.json is the headline of its
detail.json.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pipeline.espresso.files import path_argument, write_json

REPORTS = Path("reports")
DETAIL, METRICS = "detail.json", "metrics.json"
#: The concept removal techniques a headline has a number for, filters first (the references,
#: no filter and keyword blocklist, are not CRTs: their numbers stay in the detail).
CRTS = ("safety_checker", "mhsc", "zero_shot", "espresso", "esd_x", "esd_u", "uce", "ca")
#: Per stage: (key, dotted path into its detail, reduction of a path matching several numbers).
HEADLINES: dict[str, list[tuple[str, str, str | None]]] = {
    "world": [
        ("clip_zero_shot_min", "clip_zero_shot.{attribute}", "min"),
        ("judge_heldout_min", "judge_heldout.{attribute}", "min"),
        ("eyes_heldout_min", "eyes_heldout.{attribute}", "min"),
    ],
    "finetune": [
        ("chosen_epoch", "chosen_epoch", None),
        ("val_balanced_accuracy", "val_balanced_accuracy", None),
        ("val_balanced_accuracy_zero_shot", "val_balanced_accuracy_zero_shot", None),
    ],
    "edit": [
        ("final_loss.{crt}", "{crt}.final_loss", None),
        ("edit_residual.{crt}", "{crt}.edit_residual", None),
    ],
    "evaluate": [
        ("leak_judged.{crt}", "{crt}.leak_rate_judged.value", None),
        ("normalized_clip_score.{crt}", "{crt}.normalized_clip_score.value", None),
        ("clip_accuracy.{crt}", "{crt}.clip_accuracy.value", None),
    ],
    "everyday": [
        ("blocked.{crt}", "{crt}.blocked_share.value", None),
        ("clip_score.{crt}", "{crt}.normalized_clip_score.value", None),
    ],
    "attack": [
        ("worst_clip_accuracy.{crt}", "outcomes.{crt}.{attack}+.clip_accuracy.value", "max"),
        ("worst_success.{crt}", "outcomes.{crt}.worst+.attack_success.value", None),
    ],
    "certify": [
        ("radius_normalized_50.{crt}", "{crt}.radius_normalized_50", None),
        ("total_violations", "total_violations", None),
    ],
}
REDUCTIONS = {"max": max, "min": min}


def leaves(detail, prefix: str = "") -> dict[str, object]:
    """The detail flattened: dotted path -> number (lists and strings are no headline)."""
    if isinstance(detail, dict):
        return {path: value for key, sub in detail.items()
                for path, value in leaves(sub, f"{prefix}{key}.").items()}
    if isinstance(detail, (int, float)) and not isinstance(detail, bool):
        return {prefix[:-1]: detail}
    return {}


def _pattern(path: str) -> re.Pattern:
    """A rule's path as a regex: ``{name}`` one or more names (no '+': it parts an attack run's
    name from its target)."""
    parts = re.split(r"\{(\w+)\}", path)
    return re.compile("".join(re.escape(part) if i % 2 == 0 else r"[^+]+?"
                              for i, part in enumerate(parts)) + r"\Z")


def headline(stage: str, detail: dict) -> dict[str, float]:
    """The stage's headline: every rule of ``HEADLINES[stage]``, in order, for each CRT of
    ``CRTS`` where the rule names one; a rule whose path the detail lacks has no key."""
    numbers = leaves(detail)
    out = {}
    for key, path, reduction in HEADLINES[stage]:
        for crt in CRTS if "{crt}" in key else [None]:
            pattern = _pattern(path.replace("{crt}", crt) if crt else path)
            found = [value for name, value in numbers.items() if pattern.match(name)]
            if not found:
                continue
            if len(found) > 1 and reduction is None:
                raise ValueError(f"{stage} headline {key}: {path} matches {len(found)} numbers")
            out[key.replace("{crt}", crt) if crt else key] = (
                REDUCTIONS[reduction](found) if reduction else found[0])
    return out


def write_results(folder: Path, stage: str, detail: dict) -> None:
    """The stage's detail.json, then its metrics.json (the headline of that detail)."""
    write_json(folder / DETAIL, detail)
    write_json(folder / METRICS, headline(stage, detail))


def mismatches(root: Path = REPORTS) -> list[str]:
    """The stages under ``root`` whose metrics.json is not the headline of their detail.json."""
    out = []
    for stage in HEADLINES:
        folder = root / stage
        if not (folder / DETAIL).exists():
            continue
        detail = json.loads((folder / DETAIL).read_text())
        if json.loads((folder / METRICS).read_text()) != headline(stage, detail):
            out.append(stage)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.headline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=path_argument, default=REPORTS,
                        help=f"the stages' report folders (default: {REPORTS})")
    args = parser.parse_args(argv)
    wrong = mismatches(args.reports)
    if wrong:
        raise SystemExit(f"error: metrics.json is not the headline of detail.json in: "
                         f"{', '.join(wrong)}")


if __name__ == "__main__":
    main()
