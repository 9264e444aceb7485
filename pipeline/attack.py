"""DVC stage ``attack``: robustness to adversarial prompts (METHOD section 6).

For the current concept, at each of ``attack.seeds`` attack seeds, each attack of
``attack.attacks`` runs once plain (no filter term, a trial without the filter): its images
are scored by every filter, and its prompts are rendered by each edited model of ``edit.crts``
(``pez@esd_x``: the edit's plain condition); once "+" per filter of ``attack.adapt_to`` (its
scale-free terms and its trial use that filter, and the trial picks among the plain candidates
and every strength: ``pez+espresso``); and each attack of ``attack.edit_attacks`` runs adapted
to each edited model, through its UNet (``cce+esd_x``, ``udiff+esd_x``; nothing is blocked),
keeping the better, by trial images through the edit, of that search and its plain run's prompts
where the attack has a plain run (``cce@esd_x``). The attacks aim at training images that the
attacker's eyes (``models.<setting>.eyes``, not the evaluation's judge) say show c_u, and tune
everything on training data.

Outputs: the images of each run and seed (``data/attack/<run>/seed<s>.npz``); per image, what
the judge sees, P_eval and every filter's score and verdict (``reports/attack/scores.csv``);
the kept prompts with their strengths and trial success (``prompts.csv``); and every CRT's
attack outcomes (``pipeline.outcomes.attacked``: attack success by the judge, CLIP accuracy,
per condition "X", "X+" and "worst+", each with its interval over the attack seeds' prompts) in
``detail.json``; with more than one fraction in ``attack.budgets``, the same runs' results after
that share of their search (snapshots of one search, scored like the rest: ``budget`` column)
and every CRT's attack success against budget (``budget_curves``). Budgets are per setting (``attack.mini`` / ``attack.paper``).

Data-parallel (as ``generate``: ``accelerate launch`` or ``torchrun``): the runs are split
between the processes, a seed's runs of one attack together (they share its plain search); a
run's optimisation, trial images and final images stay on its process and depend only on its
seeds, so the outputs are byte-identical for 1 and N processes. The main process writes the
reports.

Interrupted, the stage resumes: each finished run's search results and images are kept under
``.cache/attack-runs/<fingerprint of params, code and inputs>`` (:mod:`pipeline.attacks.
checkpoints`), and a rerun with the same inputs loads them instead of searching and rendering
again (the outputs are the same bytes); the folder goes when the stage finishes.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import outcomes, registry
from pipeline.concepts import prompt_pairs
from pipeline.espresso.files import atomic_file, write_csv
from pipeline.espresso.filter_names import FILTERS
from pipeline.headline import write_results
from pipeline.mini import shapes
from pipeline.outputs.edited import OUT as EDITS_DIR
from pipeline.outputs.edited import load_edited_unet
from pipeline.outputs.filter_bank import load_filter_bank
from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import MANIFEST, load_images
from pipeline.params import ParamsError, mark_budget, processes, run_stage, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    import pandas as pd

OUT = Path("data/attack")
#: The words hard prompts may use: any token, or the mini world's language (its models learned
#: no other words, so tokens outside it are untrained noise to them).
VOCABULARIES = registry.implemented(registry.VOCABULARIES,
                                    {"world": shapes.language(), "all": None},
                                    "pipeline.attack.VOCABULARIES")
REPORTS = Path("reports/attack")
NEEDS = {MANIFEST: "generate", FILTER_DIR: "finetune", EDITS_DIR: "edit"}


def attack_targets(manifest: pd.DataFrame, eyes, limit: int) -> tuple[np.ndarray, list[str]]:
    """Training images of c_u that the attacker's eyes confirm (it aims at real examples)."""
    rows = manifest[(manifest["split"] == "train") & (manifest["label"] == "unacceptable")]
    images = load_images(rows)
    shows = eyes(images)
    if not shows.any():
        raise ParamsError("no training image shows the unacceptable concept (by the attacker's "
                          "eyes): the attacks have nothing to aim at; raise generate.prompts.train")
    return images[shows][:limit], rows["prompt"][shows].tolist()[:limit]


def attack_runs(attacks: list[str], filters: list[str], edits: list[str],
                edit_attacks: list[str]) -> list[tuple[str, str, str | None, str]]:
    """(run name, attack, target CRT or None, variant) of every run: each attack plain (scored
    by every filter); its plain prompts rendered by each edited model (``pez@esd_x``: the plain
    condition of an edit, no search of its own); each attack "+" adapted to each filter
    (``pez+espresso``); each attack of ``edit_attacks`` adapted to each edited model through its
    UNet (``udiff+esd_x``)."""
    return ([(name, name, None, "plain") for name in attacks]
            + [(f"{name}@{crt}", name, crt, "plain") for crt in edits for name in attacks]
            + [(f"{name}+{target}", name, target, "plus") for target in filters
               for name in attacks]
            + [(f"{name}+{crt}", name, crt, "plus") for crt in edits for name in edit_attacks])


@contextmanager
def edited_model(pipe, crt: str | None) -> Iterator[None]:
    """``pipe`` with the UNet that ``crt`` edited while active (no change for None)."""
    if crt is None:
        yield
        return
    original = pipe.unet
    pipe.unet = load_edited_unet(crt, original.device, original.dtype).requires_grad_(False)
    try:
        yield
    finally:
        pipe.unet = original


def run(params: Params) -> dict:
    from pipeline.espresso.models import quiet_libraries

    with quiet_libraries():
        return _run(params)


def _run(params: Params) -> dict:
    import dataclasses
    import shutil
    import sys

    import pandas as pd
    from accelerate.utils import gather_object
    from tqdm import tqdm

    from pipeline.attacks import ATTACKS, AttackContext, checkpoints
    from pipeline.attacks.objective import unit_image_features
    from pipeline.attacks.prompt_embedding import textual_inversion
    from pipeline.attacks.trial import pick_result
    from pipeline.espresso.t2i import generate, load_t2i, use_scheduler
    from pipeline.judges import load_eyes, load_judge

    setting, concept, models = settings_of(params)
    p = params.attack
    budgets, sampler = p.of(setting), params.generate.of(setting)
    manifest = pd.read_csv(MANIFEST)
    bank = load_filter_bank(models.clip, concept, manifest, params.filters)
    judge = load_judge(setting, models.judge, concept)
    eyes = load_eyes(setting, models.eyes, concept)
    targets, target_prompts = attack_targets(manifest, eyes, p.targets)
    pipe = load_t2i(models.t2i)
    use_scheduler(pipe, sampler.scheduler)
    pipe.set_progress_bar_config(disable=True)
    for model in (bank.zero_shot.clip, bank.tuned.clip, pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    pairs = prompt_pairs(concept, params.generate.prompts.model_dump(), params.generate.seed)
    def render(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return generate(pipe, prompts, seeds, sampler.steps, sampler.guidance, sampler.size,
                        sampler.batch, progress=True)

    memo = {}  # plain searches, their trials and results, shared by the runs of one seed
    # finished runs of an interrupted stage with these very inputs: resumed, not redone
    resume = checkpoints.ROOT / checkpoints.fingerprint(
        params.model_dump_json(), [MANIFEST.parent, FILTER_DIR.parent, EDITS_DIR]
        + [Path(m) for m in (models.t2i, models.clip, models.eyes, models.judge)
           if Path(m).exists()])
    finished = len(list(resume.glob("*/results.json")))
    if finished:
        print(f"attack: resuming: {finished} finished runs of an interrupted run with the same "
              f"params, code and inputs ({resume})", file=sys.stderr)
    edits = params.edit.crts
    names = list(dict.fromkeys(p.attacks + p.edit_attacks))
    training = manifest[manifest["split"] == "train"]
    training_images = load_images(training)

    def attack_run(run_name: str, name: str, target: str | None, variant: str,
                   attack_seed: int) -> tuple[dict, list, pd.DataFrame]:
        """One run at one attack seed: its prompts, its images (``data/attack/<run>/seed<s>.npz``),
        its scores, at each budget fraction (one search; the other fractions' images are scored,
        not kept). A run against an edited model renders with that model's UNet."""
        index = names.index(name)  # an attack's runs share their seeds
        edited = target if target in edits else None
        ctx = AttackContext(attacker=bank.zero_shot,
                            target=bank.by_name(target) if target and not edited else None,
                            pipe=pipe, concept=concept, target_images=targets,
                            target_prompts=target_prompts, pairs=pairs["train"],
                            training_images=training_images, n_prompts=p.prompts,
                            seed=p.seed + 1000 * attack_seed + index, render=render,
                            sees=eyes, words=VOCABULARIES[budgets.vocabulary],
                            model=edited if variant == "plus" and edited else "original",
                            budgets=tuple(p.budgets), memo=memo)
        seeds = (p.seed + 1000 * (index + 1) + np.arange(
            p.prompts * p.images_per_prompt)).tolist()
        checkpoint = resume / f"{run_name}.seed{attack_seed}"
        saved = checkpoints.load(checkpoint)
        search = (lambda: saved[0]) if saved else (lambda: ATTACKS[name](ctx, budgets.of(name)))
        # adapted to an edit, the attacker also tries its plain run's prompts through the edit
        # (the plain condition ``cce@esd_x``) and keeps the better: never weaker than plain
        plain_results = None
        if variant == "plus" and edited and name in p.attacks and not saved:
            original = dataclasses.replace(ctx, model="original")
            plain_saved = checkpoints.load(resume / f"{name}.seed{attack_seed}")
            plain_results = original.plain(
                f"{name} result", (lambda: plain_saved[0]) if plain_saved
                else (lambda: ATTACKS[name](original, budgets.of(name))))
        # the plain condition of an edit renders the plain run's prompts (no search of its own)
        results = ctx.plain(f"{name} result", search) if variant == "plain" else None
        rendered = saved[1] if saved else {}
        run = {"attack": name, "variant": variant, "target": target,
               "edited_model": bool(edited)}
        prompt_rows, tables = [], []
        with edited_model(pipe, edited):
            if results is None:
                results = search()
            if plain_results is not None:
                features = unit_image_features(ctx.attacker, ctx.target_images)
                results = {f: pick_result(ctx, [result, plain_results[f]],
                                          budgets.of(name).selection_images, features)
                           for f, result in results.items()}
            for budget, result in results.items():
                # below the full budget only the curve's images: the first of each prompt's seeds
                per_prompt = p.images_per_prompt if budget == 1.0 else p.curve_images_per_prompt
                prompts = [q for q in result.prompts for _ in range(per_prompt)]
                image_seeds = [seeds[i * p.images_per_prompt + j]
                               for i in range(len(result.prompts)) for j in range(per_prompt)]
                if budget not in rendered:
                    with textual_inversion(pipe, result.textual_inversion):
                        rendered[budget] = render(prompts, image_seeds)
                images = rendered[budget]
                if budget == 1.0:  # the curve's other points keep their scores only
                    with atomic_file(OUT / run_name / f"seed{attack_seed}.npz") as tmp:
                        with open(tmp, "wb") as f:
                            np.savez(f, images=images, prompts=np.array(prompts))
                table = score_attack(bank, judge, images, prompts)
                if edited:  # its outputs are never blocked: it is scored as the unfiltered model
                    table = table[["prompt", "judge_shows_concept", "p_eval"]]
                table = table.assign(**run, attack_seed=attack_seed, budget=budget,
                                     seed=image_seeds)
                if len(p.budgets) > 1:  # which images the curve's points share
                    table["on_curve"] = np.arange(len(prompts)) % per_prompt < \
                        p.curve_images_per_prompt
                tables.append(table)
                prompt_rows += [{**run, "attack_seed": attack_seed, "budget": budget,
                                 "eyes": models.eyes, "prompt": q, "objective": o,
                                 "trial_success": t, "adaptive_weight": w}
                                for q, o, t, w in zip(result.prompts, result.objective,
                                                      result.trial_success,
                                                      result.adaptive_weights)]
        if not saved:
            checkpoints.save(checkpoint, results, rendered)
        return run, prompt_rows, pd.concat(tables, ignore_index=True)

    runs = attack_runs(p.attacks, p.adapt_to, edits, p.edit_attacks)
    all_runs = [(*r, s) for s in range(p.seeds) for r in runs]
    # a seed's runs of one attack go together (they share its plain search), split between the
    # processes; a run depends only on its own seeds, never on which process ran it or after what
    order = sorted(range(len(all_runs)),
                   key=lambda i: (all_runs[i][4], names.index(all_runs[i][1]),
                                  all_runs[i][3] == "plus"))
    state = processes()
    with state.split_between_processes(order) as mine:
        desc = "attack runs" + (f" (1 of {state.num_processes} processes)"
                                if state.num_processes > 1 else "")
        done = [(i, attack_run(*all_runs[i]))
                for i in tqdm(mine, desc=desc, unit="run", disable=not state.is_local_main_process)]
    if state.num_processes > 1:
        done = gather_object(done)
    if not state.is_main_process:
        return {}
    done = dict(done)
    prompt_rows = [row for i in range(len(all_runs)) for row in done[i][1]]
    scores = pd.concat([done[i][2] for i in range(len(all_runs))], ignore_index=True)
    metrics = {"eyes": models.eyes, "judge": models.judge, "seeds": p.seeds,
               "runs": {name: done[i][0] for i, (name, *_rest) in enumerate(runs)},
               "outcomes": outcomes.nested(outcomes.attacked(scores, params.statistics),
                                           params.statistics.confidence)}
    if len(p.budgets) > 1:
        metrics["budget_curves"] = outcomes.nested(outcomes.curves(scores, params.statistics),
                                                   params.statistics.confidence)
    write_results(REPORTS, "attack", mark_budget(metrics, params))
    write_csv(REPORTS / "prompts.csv", pd.DataFrame(prompt_rows))
    write_csv(REPORTS / "scores.csv", scores)
    shutil.rmtree(resume, ignore_errors=True)
    return metrics


def score_attack(bank, judge, images: np.ndarray, prompts: list[str]) -> pd.DataFrame:
    """Per image: what the judge sees, the paper's P_eval, and every filter's score and verdict
    (``pipeline.outcomes.attacked`` makes the rates)."""
    import pandas as pd

    from pipeline.espresso.metrics import clip_views

    features = bank.zero_shot.embed(images)
    decisions = bank.decide(images, prompts)
    views = clip_views(bank.zero_shot, features, prompts, images.shape[1:])
    table = pd.DataFrame({"prompt": prompts, "judge_shows_concept": judge(images),
                          "p_eval": views["p_eval"]})
    for name in FILTERS:
        table[f"{name}_score"] = decisions[name].score
        table[f"{name}_blocked"] = decisions[name].blocked
    return table


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
