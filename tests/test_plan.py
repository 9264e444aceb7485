"""The plan before a long run: work counts against hand-counted answers, FLOPs of the paper's
models against their known sizes, and the GPU schedule."""
import pytest

from pipeline import plan
from pipeline.params import check_params


def test_generated_images_count_guided_unet_evaluations():
    work = plan.Work()
    work.images(10, steps=25, guidance=5.0)
    work.images(4, steps=25, guidance=1.0)  # no guidance: one evaluation per step
    assert work.evaluations == {"unet": 10 * 25 * 2 + 4 * 25, "t2i_text": 28, "vae_decode": 14}


def test_stage_work_of_the_tiny_params(tiny_params):
    work = plan.stage_work(check_params(tiny_params))
    sampler = tiny_params["generate"]["mini"]
    images = 2 * (4 * 1 + 2 * 2 + 2 * 2)  # 2 labels x (train, val, test) prompts x images each
    assert work["generate"].evaluations["unet"] == images * sampler["steps"] * 2
    assert work["generate"].evaluations["vae_decode"] == images
    crts = tiny_params["edit"]["crts"]
    assert work["edit"].evaluations["vae_decode"] == len(crts) * 2 * 2 * 2  # each edit's test set
    a = tiny_params["attack"]
    runs = a["seeds"] * (len(a["attacks"]) * (1 + len(a["adapt_to"]) + len(crts))
                         + len(a["edit_attacks"]) * len(crts))
    final = a["prompts"] * a["images_per_prompt"]
    assert work["attack"].evaluations["vae_decode"] >= runs * final


def test_flops_of_the_paper_models_match_their_size(tiny_params):
    tiny_params["generate"]["paper"]["size"] = 512
    paper = check_params({**tiny_params, "setting": "paper", "concept": "nudity"})
    flops = plan.flops_per_evaluation("paper", paper)
    assert 7.5e11 < flops["unet"] < 8.5e11       # SD v1.4 UNet at 64 x 64 latents: ~0.8 TFLOPs
    assert 1.5e11 < flops["clip_image"] < 1.7e11  # ViT-L/14 at 224 px: ~81 GMACs
    assert flops["clip_text"] == pytest.approx(flops["t2i_text"], rel=0.01)


def test_hours_and_the_gpu_schedule():
    work = {"generate": plan.Work()}
    work["generate"].add("unet", 7200)
    flops = {m: 1.0 for m in plan.MODELS}
    assert plan.gpu_hours(work, flops, steps_per_second=0.5) == {"generate": 2.0}
    assert plan.wall_hours([3, 3, 2, 2, 2], gpus=2) == 7  # longest first: 3+2+2 and 3+2
    assert plan.wall_hours([3, 3, 2, 2, 2], gpus=8) == 3


def test_mini_cpu_minutes_of_the_tiny_params(tiny_params):
    """Counted by hand: 2 x 2 test images per label; 2 attack seeds x (4 attacks x (plain + its
    prompts through 2 CRTs + 2 filters) + 2 edit attacks x 2 CRTs) = 48 runs of 2 x 2 final
    images; certify embeds both with two filters."""
    work = plan.stage_work(check_params(tiny_params))
    assert set(work) == set(plan.STAGES)
    assert work["certify"].evaluations == {"clip_image": 2 * (2 * 4 + 48 * 4)}
    assert work["report"].evaluations == {}
    assert dict(work["generate"].evaluations) == {"unet": 24 * 4 * 2, "t2i_text": 48,
                                                  "vae_decode": 24}
    unit = {"seconds_per_evaluation": {m: 1.0 for m in plan.MODELS}, "stage_start_seconds": 60}
    minutes = plan.cpu_minutes(work, unit)
    assert minutes["generate"] == pytest.approx(1 + (192 + 48 + 24) / 60)
    assert minutes["certify"] == pytest.approx(1 + 400 / 60)
    assert minutes["report"] == 1


@pytest.mark.slow
def test_the_mini_plan_prints_cpu_minutes_per_stage(capsys):
    plan.main(["--setting", "mini"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:2 + len(plan.STAGES)]}
    assert "CPU min" in out.splitlines()[1] and set(rows) == set(plan.STAGES)
    assert all(float(row[-1]) > 0 for row in rows.values())
    assert "CPU minutes on 2 cores" in out


def test_the_profilers_count_of_a_real_generation_is_the_planners():
    """``bench/profile_stages.py --count`` counts what a stage really evaluates; on two guided
    images of the mini SD its count equals ``Work.images``' (UNet items x steps x 2, a text
    encoding and a decode per image): the count the planner's check rests on."""
    import importlib.util
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from pipeline.espresso import t2i

    path = Path(__file__).resolve().parents[1] / "bench" / "profile_stages.py"
    spec = importlib.util.spec_from_file_location("profile_stages", path)
    profile_stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_stages)
    load, forward = t2i.load_t2i, UNet2DConditionModel.forward
    with profile_stages.counted_evaluations() as counts:
        pipe = t2i.load_t2i("data/world/sd")
        pipe.set_progress_bar_config(disable=True)
        t2i.generate(pipe, ["a red star", "a blue circle"], [1, 2], steps=3, guidance=5.0,
                     size=32, batch=2)
    work = plan.Work()
    work.images(2, steps=3, guidance=5.0)
    assert counts == work.evaluations
    assert (t2i.load_t2i, UNet2DConditionModel.forward) == (load, forward)  # patches undone
