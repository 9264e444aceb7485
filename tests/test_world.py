"""The shipped mini world loads offline and reproduces a slice of its measured quality on data
it has never seen (fresh seeds), so a broken or stale model cannot pass."""
import numpy as np
import pytest
import torch

from pipeline import world
from pipeline.espresso import load_clip
from pipeline.espresso.t2i import generate, load_t2i
from pipeline.mini import shapes
from pipeline.mini.judge import Judge
from pipeline.mini.quality import clip_zero_shot, judge_accuracy
from pipeline.params import load_params

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def world_params():
    return load_params().world


@pytest.fixture(scope="module")
def fresh_renders(world_params):
    rng = np.random.default_rng(20261125)  # a seed used nowhere in training or measuring
    scenes = [shapes.sample_scene(rng, character_prob=0.3) for _ in range(240)]
    return shapes.render_many(scenes, rng, world_params.image_size), scenes


@pytest.fixture(scope="module")
def judge():
    return Judge.from_pretrained(world.JUDGE_DIR).float().eval()


def test_models_are_committed_small_fp16_safetensors():
    files = [f for f in world.OUT.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 40e6
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 5  # clip, vae, unet, judge, eyes: the text encoder is stored once
    assert not any(f.suffix in (".bin", ".pt", ".pth", ".ckpt") for f in files)
    from safetensors import safe_open
    for f in weights:
        with safe_open(f, "pt") as sf:
            # every float is half; integers are BatchNorm's step counters, not weights
            assert {sf.get_slice(k).get_dtype() for k in sf.keys()} <= {"F16", "I64"}


def test_mini_clip_zero_shot_on_fresh_renders(monkeypatch, fresh_renders):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip, tokenizer, processor = load_clip(str(world.CLIP_DIR), device="cpu", dtype=torch.float32)
    accuracy = clip_zero_shot(clip, tokenizer, processor, *fresh_renders)
    for attr in ("shape", "color", "texture", "background"):
        assert accuracy[attr] >= 0.90, (attr, accuracy)
    for name, value in accuracy["character_vs_class"].items():
        assert value >= 0.90, (name, value)


def test_judge_on_fresh_renders(judge, fresh_renders):
    accuracy = judge_accuracy(judge, *fresh_renders)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_the_attackers_eyes_are_another_accurate_judge(judge, fresh_renders):
    eyes = Judge.from_pretrained(world.EYES_DIR).float().eval()
    assert eyes.heads["shape"].in_features != judge.heads["shape"].in_features  # another net
    assert min(judge_accuracy(eyes, *fresh_renders).values()) >= 0.95


@pytest.mark.slow
def test_mini_stable_diffusion_draws_what_is_asked(monkeypatch, judge, world_params):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_t2i(str(world.SD_DIR), device="cpu",
                    dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(99)
    asked = [(str(rng.choice(shapes.SHAPES)), str(rng.choice(list(shapes.COLORS))))
             for _ in range(24)]
    prompts = [f"a {colour} {shape}" for shape, colour in asked] + ["Zorbo"] * 8
    m = world_params.measure
    seeds = list(range(123, 123 + len(prompts)))
    images = generate(pipe, prompts, seeds, steps=m.inference_steps, guidance=m.guidance_scale)
    assert images.shape == (32, 32, 32, 3)
    pred = judge.predict(images)
    shape_ok = [shapes.SHAPES[s] == a[0] for s, a in zip(pred["shape"][:24], asked)]
    colour_ok = [shapes.VOCAB["color"][c] == a[1] for c, a in zip(pred["color"][:24], asked)]
    assert np.mean(np.logical_and(shape_ok, colour_ok)) >= 0.7
    assert np.mean(pred["character"][24:] == shapes.VOCAB["character"].index("zorbo")) >= 0.6
    # same seed, same images: generation is reproducible
    again = generate(pipe, prompts[:4], seeds[:4], steps=m.inference_steps,
                     guidance=m.guidance_scale, batch=2)
    assert np.array_equal(again, images[:4])


def test_the_shipped_models_load_with_plain_library_calls(monkeypatch):
    """No project loader: diffusers and transformers alone load the mini SD (its text encoder
    and tokenizer are links to the CLIP folder, stored once) and the mini CLIP, in fp32, and
    diffusers' pipeline draws what the project's loader draws."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plain = StableDiffusionPipeline.from_pretrained("data/world/sd")
    clip = CLIPModel.from_pretrained("data/world/clip")
    assert clip.dtype == plain.text_encoder.dtype == plain.unet.dtype == torch.float32
    text, tower = plain.text_encoder.state_dict(), clip.text_model.state_dict()
    assert text.keys() == tower.keys() and all(torch.equal(text[k], tower[k]) for k in text)
    ours = load_t2i(str(world.SD_DIR), device="cpu")
    for pipe in (plain, ours):
        pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red star", "Zorbo"], [1, 2]
    assert np.array_equal(generate(plain, prompts, seeds, steps=6, guidance=5.0),
                          generate(ours, prompts, seeds, steps=6, guidance=5.0))
