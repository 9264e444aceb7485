"""Where a stage's seconds go (issue 30): each stage of the current params run in this process
under cProfile, its time split by kind of work.

Kinds (cumulative time of the functions that do them; they do not nest in one another):
UNet passes, text-encoder passes, image-tower passes (CLIP's, the judge's and the eyes' towers),
VAE decodes, backward passes (the attacks' and edits' gradients), optimiser steps, file
reads and writes (numpy, safetensors, PIL); what is left is the stage's own Python, the
schedulers and the bookkeeping. cProfile's own cost lands mostly in the Python share, so that
share is an upper bound.

The attack stage's 44 runs per seed are sampled (``--attack-runs``: the first of each kind of
run in the stage's order, for attack seed 0) and the measured seconds per run scaled to the
whole stage by kind of run; the planner's counts (``pipeline.plan``) are shown beside it.

    python bench/profile_stages.py [--stages generate finetune edit evaluate everyday attack certify]
                                   [--attack-runs 6]

Run it in a clone whose earlier stages' outputs are in place (``dvc repro`` of the params there);
each stage rewrites its own outputs with the same bytes. Writes ``bench/profile_results.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import pstats
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Kind of work -> (file suffix, function name) pairs whose cumulative time it is.
KINDS = {
    "UNet": [("unets/unet_2d_condition.py", "forward")],
    "text encoder": [("clip/modeling_clip.py", "CLIPTextModel.forward")],
    "image towers": [("clip/modeling_clip.py", "CLIPVisionModel.forward"),
                     ("pipeline/mini/judge.py", "forward")],
    "VAE decode": [("autoencoders/autoencoder_kl.py", "decode")],
    "backward": [("torch/_tensor.py", "backward"), ("torch/autograd/__init__.py", "grad")],
    "optimiser steps": [("torch/optim/optimizer.py", "wrapper")],
    "file I/O": [("numpy/lib/_npyio_impl.py", "savez"), ("numpy/lib/_npyio_impl.py", "load"),
                 ("safetensors/torch.py", "save_file"), ("safetensors/torch.py", "load_file"),
                 ("PIL/Image.py", "save"), ("PIL/Image.py", "open")],
}


@contextmanager
def counted_evaluations():
    """A Counter of model evaluations per ``pipeline.plan.MODELS`` kind while active (the models'
    classes patched: a forward's batch items, times ``plan.TRAIN`` where its output carries a
    gradient). The T2I's text encoder is told from CLIP's text tower (the same class) by being
    a loaded pipeline's."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers.models.clip import modeling_clip

    from pipeline.espresso import t2i
    from pipeline.plan import TRAIN

    counts, t2i_encoders, restore = Counter(), set(), []

    def items(value) -> int:
        return len(value) if isinstance(value, torch.Tensor) else 0

    def trained(out) -> bool:
        first = out[0] if isinstance(out, tuple) else getattr(out, "sample", None)
        if first is None and hasattr(out, "last_hidden_state"):
            first = out.last_hidden_state
        if first is None:
            first = getattr(out, "pooler_output", None)
        return isinstance(first, torch.Tensor) and first.requires_grad

    def patch(owner, name, kind, first_input):
        original = getattr(owner, name)

        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            n = items(args[0] if args else kwargs.get(first_input))
            counts[kind(self)] += n * (TRAIN if trained(out) else 1)
            return out

        setattr(owner, name, wrapper)
        restore.append((owner, name, original))

    def load_t2i(*args, **kwargs):
        pipe = original_load(*args, **kwargs)
        t2i_encoders.add(id(pipe.text_encoder))
        return pipe

    original_load = t2i.load_t2i
    t2i.load_t2i = load_t2i
    restore.append((t2i, "load_t2i", original_load))
    patch(UNet2DConditionModel, "forward", lambda _: "unet", "sample")
    patch(AutoencoderKL, "decode", lambda _: "vae_decode", "z")
    patch(modeling_clip.CLIPTextModel, "forward",
          lambda m: "t2i_text" if id(m) in t2i_encoders else "clip_text", "input_ids")
    patch(modeling_clip.CLIPVisionModel, "forward", lambda _: "clip_image", "pixel_values")
    try:
        yield counts
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def kind_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds per kind: the outermost calls only (a recursive or re-entered function
    is counted once through pstats' cumulative time)."""
    out = Counter()
    for (path, line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        for kind, marks in KINDS.items():
            if any(path.endswith(suffix) and function in (name, _qualname(path, line))
                   for suffix, function in marks):
                out[kind] += cumulative
    return dict(out)


def _qualname(path: str, line: int) -> str:
    """``Class.method`` of the function defined at ``path:line`` (for the kinds that name a
    class: CLIP's text and vision transformers share a file and a method name)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return ""
    # cProfile's line is the first decorator's where there is one: the def follows
    definition = next((text.strip() for text in lines[line - 1:] if text.strip().startswith(
        ("def ", "async def "))), "")
    method = definition.removeprefix("async ").removeprefix("def ").split("(")[0]
    for text in reversed(lines[:line]):
        if text.startswith("class "):
            return f"{text[6:].split('(')[0].split(':')[0]}.{method}"
    return method


def profile(call, dump: Path | None = None) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``call()`` and its seconds per kind; the raw profile to ``dump`` (for
    ``python -m pstats``)."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(call)
    wall = time.perf_counter() - start
    if dump is not None:
        profiler.dump_stats(dump)
    kinds = kind_seconds(pstats.Stats(profiler))
    kinds["Python and the rest"] = max(0.0, wall - sum(kinds.values()))
    return wall, kinds


def planner_check(params, stage: str, counts: Counter) -> dict[str, dict[str, float]]:
    """Per model: the evaluations counted and those ``pipeline.plan`` plans for the stage."""
    from pipeline.plan import MODELS, stage_work

    planned = stage_work(params)[stage].evaluations
    return {model: {"counted": counts[model], "planned": planned[model]} for model in MODELS
            if counts[model] or planned[model]}


def sampled_attack(params, runs: int, dump: Path | None = None):
    """The attack stage on the first run of each kind (plain, plain through an edit, "+" on a
    filter, through an edit's UNet) for attack seed 0, up to ``runs`` runs; and how many runs of
    each kind the whole stage has."""
    from pipeline import attack

    p = params.attack
    edits = params.edit.crts
    every = attack.attack_runs(p.attacks, p.adapt_to, edits, p.edit_attacks)

    def kind(run) -> str:
        name, _attack, target, variant = run
        return ("plain" if target is None else "plain through an edit" if variant == "plain"
                else "through an edit's UNet" if target in edits else "+ on a filter")

    firsts = [next(run for run in every if kind(run) == k) for k in dict.fromkeys(map(kind, every))]
    picked = firsts + [run for run in every if run not in firsts][:max(0, runs - len(firsts))]
    counts = Counter(kind(run) for run in every)
    original = attack.attack_runs
    attack.attack_runs = lambda *a, **k: picked
    params = params.model_copy(update={"attack": p.model_copy(update={"seeds": 1})})
    try:
        wall, kinds = profile(lambda: attack.run(params), dump)
    finally:
        attack.attack_runs = original
    sample = Counter(kind(run) for run in picked)
    return wall, kinds, {k: {"sampled": sample[k], "in the stage": counts[k] * p.seeds}
                         for k in counts}


def dump_of(args, stage: str) -> Path | None:
    if args.dump is None:
        return None
    args.dump.mkdir(parents=True, exist_ok=True)
    return args.dump / f"{stage}.prof"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=["generate", "finetune", "edit",
                                                        "evaluate", "everyday", "attack",
                                                        "certify"])
    parser.add_argument("--attack-runs", type=int, default=6)
    parser.add_argument("--count", action="store_true",
                        help="count every model evaluation beside the planner's (the attack "
                             "stage run whole); writes bench/plan_check_results.json")
    parser.add_argument("--dump", type=Path, metavar="DIR",
                        help="also write each stage's raw profile there (<stage>.prof)")
    args = parser.parse_args()
    from pipeline.params import load_params

    params = load_params()
    if args.count:
        return check_planner(params, args.stages)
    results = {"concept": params.concept, "budget": params.budget, "stages": {}}
    for stage in args.stages:
        if stage == "attack":
            wall, kinds, runs = sampled_attack(params, args.attack_runs, dump_of(args, stage))
            results["stages"][stage] = {"seconds": wall, "kinds": kinds, "runs": runs}
        else:
            module = importlib.import_module(f"pipeline.{stage}")
            wall, kinds = profile(lambda: module.run(params), dump_of(args, stage))
            results["stages"][stage] = {"seconds": wall, "kinds": kinds}
        shares = ", ".join(f"{k} {v / wall:.0%}" for k, v in sorted(
            kinds.items(), key=lambda kv: -kv[1]) if v / wall >= 0.01)
        print(f"{stage}: {wall:.0f} s: {shares}", flush=True)
    out = ROOT / "bench" / "profile_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


def check_planner(params, stages: list[str]) -> None:
    """``--count``: each stage run whole, its evaluations beside the planner's."""
    p = params.attack
    results = {"concept": params.concept, "budget": params.budget,
               "attack": {"seeds": p.seeds, "attacks": p.attacks, "adapt_to": p.adapt_to,
                          "edit_crts": params.edit.crts, "edit_attacks": p.edit_attacks},
               "stages": {}}
    for stage in stages:
        module = importlib.import_module(f"pipeline.{stage}")
        with counted_evaluations() as counts:
            module.run(params)
        results["stages"][stage] = check = planner_check(params, stage, counts)
        print(f"{stage}: " + ", ".join(
            f"{model} {c['counted']:,.0f} counted / {c['planned']:,.0f} planned"
            for model, c in check.items()), flush=True)
    out = ROOT / "bench" / "plan_check_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
