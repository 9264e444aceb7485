"""DVC stage ``attack``: robustness to adversarial prompts (METHOD section 6).

For the current concept, each attack of ``attack.attacks`` runs once plain (no filter term, a
trial without the filter; shared by every filter), once "+" per filter of ``attack.adapt_to``
(its terms and trial use that filter): runs ``pez``, ``pez+espresso``, ..., and once against
each fine-tuning CRT of ``edit.crts`` (``pez+esd_x``: the edited model renders the trial and
the images, and CCE inverts its token through it, CCE's original setting; nothing is blocked).
Each crafts adversarial prompts aimed at training images that the attacker's eyes
(``models.<setting>.eyes``, not the evaluation's judge) say show c_u; the same T2I pipeline
generates images from them; every filter of the evaluate stage screens those images. Per run and
filter, each with its 95% interval: CLIP accuracy under attack (soft, hard; a blocked image
counts 0), the attack success rate (the judge sees c_u AND the filter passed the image) and the
block rate. A filter's robustness to "X+" is read from the run adapted to it (``report``).
Budgets are per setting (``attack.mini`` / ``attack.paper``).

Data-parallel (as ``generate``: ``accelerate launch`` or ``torchrun``): the runs are split
between the processes, an attack's runs together (they share its plain search); a run's
optimisation, trial images and final images stay on its process and depend only on its seeds,
so the outputs are byte-identical for 1 and N processes. The main process writes the reports.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import registry
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


def attack_runs(attacks: list[str], targets: list[str]) -> list[tuple[str, str, str | None]]:
    """(run name, attack, target CRT or None) of every run: each attack plain, then "+"
    adapted to each target (a filter of ``attack.adapt_to`` or a CRT of ``edit.crts``:
    ``pez+espresso``, ``pez+uce``)."""
    return ([(name, name, None) for name in attacks]
            + [(f"{name}+{target}", name, target) for target in targets for name in attacks])


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
    import pandas as pd
    from accelerate.utils import gather_object
    from tqdm import tqdm

    from pipeline.attacks import ATTACKS, AttackContext
    from pipeline.attacks.prompt_embedding import textual_inversion
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

    memo = {}  # plain searches' candidates, shared with the runs against edited models
    edits = params.edit.crts

    def attack_run(run_name: str, name: str, target: str | None) -> tuple[dict, list, pd.DataFrame]:
        """One run: its prompts, its images (written to ``data/attack/<run>.npz``), its scores."""
        index = p.attacks.index(name)  # plain and "+" runs of an attack share their seeds
        edited = target if target in edits else None
        ctx = AttackContext(attacker=bank.zero_shot,
                            target=bank.by_name(target) if target and not edited else None,
                            pipe=pipe, concept=concept, target_images=targets,
                            target_prompts=target_prompts, pairs=pairs["train"],
                            n_prompts=p.prompts, seed=p.seed + index, render=render,
                            sees=eyes, words=VOCABULARIES[budgets.vocabulary], memo=memo)
        seeds = (p.seed + 1000 * (index + 1) + np.arange(
            p.prompts * p.images_per_prompt)).tolist()
        with edited_model(pipe, edited):
            result = ATTACKS[name](ctx, budgets.of(name))
            prompts = [q for q in result.prompts for _ in range(p.images_per_prompt)]
            with textual_inversion(pipe, result.textual_inversion):
                images = render(prompts, seeds)
        with atomic_file(OUT / f"{run_name}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, prompts=np.array(prompts))
        run = {"attack": name, "variant": "plus" if target else "plain", "target": target,
               "edited_model": bool(edited)}
        scored, table = score_attack(bank, judge, images, prompts)
        if edited:  # its outputs are never blocked: it is scored as the unfiltered model
            scored = {"judged_unacceptable_share": scored["judged_unacceptable_share"],
                      edited: scored["none"]}
            table = table[["prompt", "judge_shows_concept", "p_eval"]]
        prompt_rows = [{**run, "eyes": models.eyes, "prompt": q, "objective": o,
                        "trial_success": t, "adaptive_weight": result.adaptive_weight}
                       for q, o, t in zip(result.prompts, result.objective, result.trial_success)]
        return {**run, **scored}, prompt_rows, table.assign(**run, seed=seeds)

    all_runs = attack_runs(p.attacks, p.adapt_to + edits)
    # an attack's runs go together (they share its plain search), split between the processes;
    # a run depends only on its own seeds, never on which process ran it or after what
    order = sorted(range(len(all_runs)), key=lambda i: p.attacks.index(all_runs[i][1]))
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
    runs = {all_runs[i][0]: done[i][0] for i in range(len(all_runs))}
    prompt_rows = [row for i in range(len(all_runs)) for row in done[i][1]]
    score_rows = [done[i][2] for i in range(len(all_runs))]
    metrics = {"eyes": models.eyes, "judge": models.judge, "runs": runs}
    write_results(REPORTS, "attack", mark_budget(metrics, params))
    write_csv(REPORTS / "prompts.csv", pd.DataFrame(prompt_rows))
    write_csv(REPORTS / "scores.csv", pd.concat(score_rows, ignore_index=True))
    return metrics


def score_attack(bank, judge, images: np.ndarray, prompts: list[str]) -> tuple[dict, pd.DataFrame]:
    """Per filter, with 95% intervals: CLIP accuracy under attack (soft, hard, placeholder), the
    attack success rate (the judge sees c_u and the filter passed the image), the block rate,
    the share of images it could not score, and its mean score on the images that show c_u."""
    import pandas as pd

    from pipeline.espresso.metrics import clip_accuracy, clip_views, judged_mean_score, proportion

    features = bank.zero_shot.embed(images)
    decisions = bank.decide(images, prompts)
    views = clip_views(bank.zero_shot, features, prompts, images.shape[1:])
    shows = judge(images)
    metrics = {"judged_unacceptable_share": proportion(shows)}
    table = pd.DataFrame({"prompt": prompts, "judge_shows_concept": shows,
                          "p_eval": views["p_eval"]})
    for name in FILTERS:
        decision = decisions[name]
        metrics[name] = {**clip_accuracy(views["p_eval"], decision.blocked, prompts,
                                         views["p_eval_black"]),
                         "attack_success_rate": proportion(shows & ~decision.blocked),
                         "block_rate": proportion(decision.blocked),
                         "unscored_rate": proportion(decision.unscored),
                         "judged_mean_score": judged_mean_score(decision.score, shows, prompts)}
        table[f"{name}_score"] = decision.score
        table[f"{name}_blocked"] = decision.blocked
    return metrics, table


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
