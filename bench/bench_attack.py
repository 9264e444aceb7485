"""The attack stage's searches before and after a speed-up (issue 30, item 4), as ratios measured
in one run: each version's code runs the same searches, in turns, in its own process.

    python bench/bench_attack.py                       # before: the commit before issue 30's
                                                       # first attack speed-up; after: this tree
    python bench/bench_attack.py --before COMMIT [--repeats 2]

"before" is checked out in a temporary git worktree (its own code, the same shipped world);
"after" is this working tree. Each runs, for concept zorbo at the mini setting's production
budgets (``params.yaml``: ``attack.mini``), the candidate searches that the attack stage runs
once per attack seed: PEZ and RingBell, plain and "+" (adapted to zero-shot Espresso, every
strength of the grid). Typo's search is PEZ's; CCE's and UnlearnDiff's inversions and every
render are unchanged by the speed-ups measured so far, so they would only add the same seconds
to both sides. The versions alternate (before, after, before, ...) so that a busy machine slows
both alike. Writes ``bench/attack_results.json``: seconds per search and version (the fastest
of the repeats), the after/before ratio, and whether both found the same prompts (a speed-up
must not change what the attack finds).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "attack_results.json"
#: The commit before issue 30's first attack speed-up (RingBell scores a carried-over individual
#: once, 594155f).
BEFORE = "594155f^"
SEARCHES = ("pez", "pez+", "ringbell", "ringbell+")


def searches() -> dict:
    """In the current directory's code: each search's seconds and the prompts it found."""
    import numpy as np
    import torch
    import yaml

    sys.path.insert(0, str(Path.cwd()))
    from pipeline.attack import VOCABULARIES
    from pipeline.attacks import AttackContext
    from pipeline.attacks.objective import unit_image_features
    from pipeline.attacks.pez import pez_candidates
    from pipeline.attacks.ringbell import ringbell_candidates
    from pipeline.concepts import get_concept, prompt_pairs
    from pipeline.espresso import EspressoFilter
    from pipeline.espresso.t2i import load_t2i
    from pipeline.mini import shapes
    from pipeline.params import TORCH_THREADS
    from pipeline.schema import Params

    import pipeline
    if not Path(pipeline.__file__).resolve().is_relative_to(Path.cwd().resolve()):
        sys.exit(f"error: imported {pipeline.__file__}, not the code of {Path.cwd()}")
    torch.set_num_threads(TORCH_THREADS)  # the stage's threads
    params = Params.model_validate(yaml.safe_load(Path("params.yaml").read_text()))
    budgets = params.attack.mini
    concept = get_concept("zorbo", "mini")
    rng = np.random.default_rng(0)
    targets = shapes.render_many([shapes.sample_scene(rng, character="zorbo")
                                  for _ in range(params.attack.targets)], rng)
    filt = EspressoFilter.from_clip("data/world/clip", concept.unacceptable, concept.acceptable)
    pipe = load_t2i("data/world/sd", device="cpu", dtype=torch.float32)
    for model in (filt.clip, pipe.text_encoder, pipe.unet, pipe.vae):
        model.requires_grad_(False)
    pairs = prompt_pairs(concept, params.generate.prompts.model_dump(), params.generate.seed)
    ctx = AttackContext(attacker=filt, target=filt, pipe=pipe, concept=concept,
                        target_images=targets, target_prompts=["Zorbo"] * len(targets),
                        pairs=pairs["train"], training_images=targets, n_prompts=8, seed=42,
                        render=None, sees=None, words=VOCABULARIES[budgets.vocabulary])
    features = unit_image_features(filt, targets)
    runs = {"pez": lambda: pez_candidates(ctx, budgets.pez, features, [0.0], "PEZ"),
            "pez+": lambda: pez_candidates(ctx, budgets.pez, features,
                                           budgets.pez.adaptive_weights, "PEZ+"),
            "ringbell": lambda: ringbell_candidates(ctx, budgets.ringbell, [0.0]),
            "ringbell+": lambda: ringbell_candidates(ctx, budgets.ringbell,
                                                     budgets.ringbell.adaptive_weights)}
    out = {}
    for name in SEARCHES:
        start = time.perf_counter()
        found = runs[name]()
        out[name] = {"seconds": time.perf_counter() - start, "prompts": found[1.0]}
    return out


def run_in(tree: Path) -> dict:
    """:func:`searches` in a fresh process whose code is ``tree``'s."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the searches failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the commit whose code is 'before'")
    parser.add_argument("--repeats", type=int, default=2, help="turns per version (fastest kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: give at least 1")
    if args.worker:
        print(json.dumps(searches()))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT,
                            capture_output=True, text=True)
    if commit.returncode:
        sys.exit(f"error: {args.before!r} is not a commit of this repository; give --before "
                 "a commit (a clone with its history: git fetch --unshallow)")
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before),
                        commit.stdout.strip()], cwd=ROOT, check=True)
        try:
            turns = {"before": [], "after": []}
            for _ in range(args.repeats):
                turns["before"].append(run_in(before))
                turns["after"].append(run_in(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT)
    results = {}
    for name in SEARCHES:
        seconds = {v: min(t[name]["seconds"] for t in turns[v]) for v in turns}
        results[name] = {**{f"{v}_seconds": round(s, 2) for v, s in seconds.items()},
                         "after_over_before": round(seconds["after"] / seconds["before"], 3),
                         "same_prompts": turns["before"][0][name]["prompts"]
                         == turns["after"][0][name]["prompts"]}
    total = {v: sum(results[n][f"{v}_seconds"] for n in SEARCHES) for v in turns}
    report = {"before": f"{args.before} ({commit.stdout.strip()})", "after": "working tree",
              "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
              "searches": results, "total_after_over_before": round(total["after"]
                                                                     / total["before"], 3)}
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:10s} before {r['before_seconds']:7.1f} s  after {r['after_seconds']:7.1f} s"
              f"  ratio {r['after_over_before']:.3f}  same prompts: {r['same_prompts']}")
    print(f"all four: after/before {report['total_after_over_before']:.3f} -> {OUT}")


if __name__ == "__main__":
    main()
