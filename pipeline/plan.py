"""A plan before a long run: the work of every stage for the current params, per concept, and
an estimate of the GPU-hours it takes on 1 and N GPUs.

Work is counted as evaluations (forward passes of one item) of each model: the T2I UNet and
VAE decoder at the setting's resolution, its text encoder, CLIP's text and image towers; a
training step counts as three forward passes (forward + backward). Each evaluation's FLOPs are
counted once, exactly, on the models' architectures built on the meta device (no weights:
``torch.utils.flop_counter``); the mini world's from its folders, the paper's from SD v1.4's
and CLIP ViT-L/14's published configurations. Time = FLOPs / the GPU's effective FLOP rate,
calibrated on a published SD v1.4-architecture figure: ``--unet-steps-per-second`` (default
31.19 denoising steps per second with classifier-free guidance, i.e. 62.4 UNet evaluations per
second: diffusers with PyTorch 2.1 SDPA on one A100 80 GB SXM, SD v1.5 at 512 px, 50 steps,
github.com/fal-ai/stable-diffusion-benchmarks; SD v1.5 has SD v1.4's UNet). Small batches,
text models and training run below that efficiency, so read the hours as a lower bound.

On N GPUs: each concept's experiment on one GPU (parallel sweeps, ``dvc queue``), longest
first, and, as a bound, the work divided evenly (data-parallel stages); the GPU-hours do not
change.

The mini world runs on a CPU, and its models are far below the scale where a FLOP rate carries
over, so its time is calibrated on the mini models themselves: CPU minutes = a stage's start
(imports, model loads) + each model's evaluations x its measured seconds per evaluation
(measured on 2 cores by ``bench/bench_plan_mini.py``, which writes
``bench/plan_mini_results.json``). Work that is no model evaluation (the attacks' vocabulary
projections and genetic search bookkeeping, file writes) is not counted.

    python -m pipeline.plan                        # the current setting's concepts, 1 and 8 GPUs
    python -m pipeline.plan --setting paper --gpus 1 8
"""
from __future__ import annotations

import argparse
import heapq
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.architectures import sd_v14_unet_and_vae, vit_l14_config
from pipeline.concepts import known_concepts
from pipeline.params import ParamsError, load_params
from pipeline.schema import Params

#: fal-ai/stable-diffusion-benchmarks, "Diffusers (torch 2.1, SDPA)", A100 80 GB SXM.
PUBLISHED_STEPS_PER_SECOND = 31.19
MODELS = ("unet", "vae_decode", "t2i_text", "clip_text", "clip_image")
TRAIN = 3  # a training step: forward + backward = three forward passes
STAGES = ("generate", "finetune", "edit", "evaluate", "everyday", "attack", "certify", "report")
#: The mini world's calibration on 2 CPU cores, as ``bench/bench_plan_mini.py`` measures and
#: writes it: seconds per evaluation of each model at the stages' batch sizes, and a stage's start
#: (a fresh process importing the libraries and loading the mini models).
MINI_CALIBRATION = Path(__file__).resolve().parents[1] / "bench" / "plan_mini_results.json"


@dataclass
class Work:
    """Evaluations of each model (``MODELS``) one stage does for one concept."""

    evaluations: Counter = field(default_factory=Counter)

    def add(self, model: str, n: float) -> None:
        self.evaluations[model] += n

    def images(self, n: float, steps: int, guidance: float) -> None:
        """``n`` generated images: ``steps`` UNet evaluations each (two with guidance), a text
        encoding per prompt and its empty prompt, and a VAE decode."""
        self.add("unet", n * steps * (2 if guidance > 1 else 1))
        self.add("t2i_text", 2 * n)
        self.add("vae_decode", n)


def stage_work(params: Params) -> dict[str, Work]:
    """The work of every stage for one concept, from the params' budgets (``setting``'s)."""
    setting = params.setting
    g, f = params.generate, params.finetune
    sampler = g.of(setting)
    per_label = {s: getattr(g.prompts, s) * getattr(g.images_per_prompt, s)
                 for s in ("train", "val", "test")}
    work = {name: Work() for name in STAGES}

    def render(stage: str, n: float) -> None:
        work[stage].images(n, sampler.steps, sampler.guidance)

    render("generate", 2 * sum(per_label.values()))
    epochs = f.of(setting).epochs_of(params.concept)
    work["finetune"].add("clip_image", 2 * (per_label["train"] + per_label["val"]))
    work["finetune"].add("clip_text", epochs * 2 * (per_label["train"] * TRAIN + per_label["val"]))

    crts, edit = params.edit.crts, params.edit.of(setting)
    for crt in crts:
        p = edit.of(crt)
        if crt in ("esd_x", "esd_u"):  # partial sampling (mean half the steps, paired), teacher
            per_item = (sampler.steps - 1) / 2 * 2 + 2 + TRAIN
            work["edit"].add("unet", p.steps * p.batch * per_item)
        elif crt == "ca":  # frozen teacher + trained student
            work["edit"].add("unet", p.steps * p.batch * (1 + TRAIN))
        render("edit", 2 * per_label["test"])  # each edited model's test images
    work["evaluate"].add("clip_image", 2 * per_label["test"] * (1 + len(crts)))
    everyday = params.everyday.prompts * params.everyday.images_per_prompt
    render("everyday", everyday * (1 + len(crts)))  # the unedited and every edited model
    work["everyday"].add("clip_image", everyday * (2 + len(crts)))  # CLIP scores, the filters

    a = params.attack
    budgets, filters = a.of(setting), a.adapt_to
    final = a.prompts * a.images_per_prompt
    work["attack"].add("clip_image", per_label["train"] * 2 * len(filters))  # margin scales

    def text_search(attack: str, adaptive: bool) -> None:
        """One batched search of PEZ / Typo (a step trains the soft prompt and evaluates it
        typed) or RingBell (every member of every generation, typed)."""
        p = budgets.of(attack)
        if attack == "ringbell":  # the first population, then each generation's new children
            evals = p.candidates * (p.population + p.generations * ringbell_new_children(p))
            work["attack"].add("t2i_text", evals)
            work["attack"].add("clip_text", evals * adaptive)
        else:
            per_step = TRAIN + 1 + (TRAIN + 1) * adaptive
            work["attack"].add("clip_text", p.steps * p.candidates * per_step)

    def inversion(attack: str, weight: bool) -> None:
        """CCE's textual inversion (with the filter loss on the decoded prediction if
        ``weight``) or UnlearnDiff's prefix search: UNet steps through the model under attack."""
        p = budgets.of(attack)
        rows = p.batch * (p.candidates if attack == "udiff" else 1)
        work["attack"].add("unet", p.steps * rows * TRAIN)
        work["attack"].add("t2i_text", p.steps * rows * TRAIN)
        if weight:
            work["attack"].add("vae_decode", p.steps * rows * TRAIN)
            work["attack"].add("clip_image", p.steps * rows * TRAIN)

    def trial(n: float) -> None:
        """Rendered and looked at once per budget fraction (one search, snapshots of it)."""
        render("attack", n * len(a.budgets))
        work["attack"].add("clip_image", 2 * n * len(a.budgets))  # the eyes and the filter

    for _ in range(a.seeds):
        for attack in a.attacks:  # plain once (its trial and result shared), then "+"
            p = budgets.of(attack)
            if attack == "cce":
                inversion(attack, False)
                trial(p.selection_images)
                for _ in filters:
                    for _ in p.adaptive_weights:
                        inversion(attack, True)
                    trial(len(p.adaptive_weights) * p.selection_images)  # plain's: memoised
            else:
                text_search(attack, False)
                trial(p.candidates * p.selection_images)
                for _ in filters:
                    text_search(attack, True)
                    trial(p.candidates * p.selection_images)
        for _ in crts:  # each edit adapted to by every edit attack, through its UNet
            for attack in a.edit_attacks:
                p = budgets.of(attack)
                inversion(attack, False)
                trial(p.selection_images if attack == "cce" else p.candidates * p.selection_images)
        runs = len(a.attacks) * (1 + len(crts) + len(filters)) + len(a.edit_attacks) * len(crts)
        trial(runs * final)  # every run's final images, scored by every filter
    runs = a.seeds * (len(a.attacks) * (1 + len(crts) + len(filters))
                      + len(a.edit_attacks) * len(crts))
    # two filters (zero-shot, fine-tuned) embed the test images and every run's final images
    # (at the full budget: the curve's other points are scored, not kept)
    work["certify"].add("clip_image", 2 * (2 * per_label["test"] + runs * final))
    return work  # report: tables and figures from the other stages' files, no model


def ringbell_new_children(p) -> float:
    """Individuals a RingBell generation must score (an upper bound of the expectation): the
    carried-over ones keep their loss (``pipeline.attacks.ringbell``). The release's operators
    keep the fitter half and copy the first parent unchanged with probability (1 - crossover)
    (1 - mutation); ours keep the elite. Repeats among the children of a converging population
    are not counted: measured on the mini world they save as much again (docs/benchmarks.md)."""
    if p.operators == "release":
        children = p.population - max(1, p.population // 2)
        return children * (1 - (1 - p.crossover) * (1 - p.mutation))
    return p.population - max(1, int(p.elite * p.population))


def flops_per_evaluation(setting: str, params: Params) -> dict[str, float]:
    """FLOPs of one evaluation of each model (``MODELS``), counted on meta-device models."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPConfig, CLIPModel

    size = params.generate.of(setting).size
    with torch.device("meta"):
        if setting == "paper":
            unet, vae = sd_v14_unet_and_vae(size)
            clip = CLIPModel(vit_l14_config())
        else:
            models = params.models.mini
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(f"{models.t2i}/unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(f"{models.t2i}/vae"))
            clip = CLIPModel(CLIPConfig.from_pretrained(models.clip))
    text_len = clip.config.text_config.max_position_embeddings
    image = clip.config.vision_config.image_size
    latent = size // 2 ** (len(vae.config.block_out_channels) - 1)
    calls = {
        "unet": lambda: unet(torch.randn(1, unet.config.in_channels, latent, latent), 1,
                             encoder_hidden_states=torch.randn(1, text_len,
                                                               unet.config.cross_attention_dim)),
        "vae_decode": lambda: vae.decode(torch.randn(1, vae.config.latent_channels, latent,
                                                     latent)),
        "t2i_text": lambda: clip.text_model(torch.zeros(1, text_len, dtype=torch.long)),
        "clip_text": lambda: clip.get_text_features(torch.zeros(1, text_len, dtype=torch.long)),
        "clip_image": lambda: clip.get_image_features(torch.randn(1, 3, image, image)),
    }
    out = {}
    with torch.device("meta"), torch.no_grad():
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[name] = float(counter.get_total_flops())
    return out


def gpu_hours(work: dict[str, Work], flops: dict[str, float], steps_per_second: float) -> dict:
    """GPU-hours per stage: FLOPs over the rate of a UNet doing ``steps_per_second`` guided
    denoising steps (two evaluations each)."""
    rate = flops["unet"] * 2 * steps_per_second
    return {stage: sum(n * flops[m] for m, n in w.evaluations.items()) / rate / 3600
            for stage, w in work.items()}


def cpu_minutes(work: dict[str, Work], calibration: dict | None = None) -> dict[str, float]:
    """CPU minutes per stage: its start plus each model's evaluations times its seconds per
    evaluation (default: the mini world's models, measured: ``MINI_CALIBRATION``)."""
    calibration = calibration or json.loads(MINI_CALIBRATION.read_text())
    per_eval = calibration["seconds_per_evaluation"]
    return {stage: (calibration["stage_start_seconds"]
                    + sum(n * per_eval[m] for m, n in w.evaluations.items())) / 60
            for stage, w in work.items()}


def wall_hours(per_concept: list[float], gpus: int) -> float:
    """Longest-first assignment of the concepts' experiments to ``gpus`` GPUs: the makespan."""
    loads = [0.0] * gpus
    for hours in sorted(per_concept, reverse=True):
        heapq.heapreplace(loads, loads[0] + hours)
    return max(loads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("mini", "paper"),
                        help="plan for this setting (default: params.yaml's)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], metavar="N")
    parser.add_argument("--unet-steps-per-second", type=float, default=PUBLISHED_STEPS_PER_SECOND,
                        help="guided SD denoising steps per second on one GPU "
                             f"(default {PUBLISHED_STEPS_PER_SECOND}: A100, see above)")
    args = parser.parse_args(argv)
    if args.unet_steps_per_second <= 0 or min(args.gpus) < 1:
        parser.error("--unet-steps-per-second and --gpus must be positive")
    try:
        params = load_params()
    except ParamsError as err:
        raise SystemExit("\n".join(f"error: {line}" for line in str(err).splitlines())) from None
    setting = args.setting or params.setting
    concepts = known_concepts(setting)
    flops = flops_per_evaluation(setting, params)
    plans = {c: stage_work(params.model_copy(update={"setting": setting, "concept": c}))
             for c in concepts}
    work = plans[concepts[0]]
    print(f"setting {setting}, per concept ({concepts[0]}); FLOPs per evaluation: "
          + ", ".join(f"{m} {flops[m] / 1e9:.3g} G" for m in MODELS))
    paper = setting == "paper"
    print(f"{'stage':<10}" + "".join(f"{m:>14}" for m in MODELS)
          + (f"{'GPU-hours':>12}" if paper else f"{'CPU min':>12}"))
    times = (gpu_hours(work, flops, args.unet_steps_per_second) if paper
             else cpu_minutes(work))
    for stage, w in work.items():
        print(f"{stage:<10}" + "".join(f"{w.evaluations[m]:>14,.0f}" for m in MODELS)
              + f"{times[stage]:>12.2f}")
    if not paper:
        per_concept = [sum(cpu_minutes(w).values()) for w in plans.values()]
        print(f"\nper concept: {sum(times.values()):.1f} CPU minutes on 2 cores (model "
              f"evaluations, measured by bench/bench_plan_mini.py, plus each stage's start; "
              f"attack work other than model evaluations is not counted); {len(concepts)} "
              f"concepts: {sum(per_concept):.0f} minutes")
        return
    per_concept = [sum(gpu_hours(w, flops, args.unet_steps_per_second).values())
                   for w in plans.values()]
    total = sum(per_concept)
    print(f"\n{len(concepts)} concepts: {total:.1f} GPU-hours "
          f"({min(per_concept):.1f}-{max(per_concept):.1f} per concept)")
    print(f"{'GPUs':>6}{'concepts in parallel (h)':>28}{'work divided evenly (h)':>26}")
    for n in args.gpus:
        print(f"{n:>6}{wall_hours(per_concept, n):>28.1f}{total / n:>26.1f}")


if __name__ == "__main__":
    main()
