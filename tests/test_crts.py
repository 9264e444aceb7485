"""The prior concept-removal techniques (pipeline/crts): each changes only the UNet parameters its
paper trains, an interrupted edit resumes to the same weights, UCE's closed form gives its known
answer, and on the mini world each edit clearly lowers how often c_u prompts draw c_u."""
import copy
import json

import numpy as np
import pytest
import torch
from tiny_hub import tiny_clip, tiny_sd

from pipeline.concepts import get_concept, prompt_pairs
from pipeline.crts import EDITS, EditTask, encode, trainable_names
from pipeline.crts.uce import aligned_states
from pipeline.espresso.t2i import generate, load_t2i, use_scheduler
from pipeline.judges import load_judge
from pipeline.mini.tokenizer import build_clip_tokenizer
from pipeline.params import load_params, settings_of
from pipeline.schema import EditBudgets


def budget(crt: str, **values):
    """A CRT's budget as the edit stage hands it over: its model of ``edit.<setting>``."""
    return EditBudgets.model_fields[crt].annotation(**values)


pytestmark = pytest.mark.slow  # CRT edits on the mini world's Stable Diffusion

#: Budgets that take a few steps: enough for every trainable parameter to move.
TINY = {"esd_x": budget("esd_x", steps=2, lr=1e-3, eta=1.0, sample_guidance=3.0, batch=1,
                        checkpoint_every=1),
        "ca": budget("ca", steps=2, lr=1e-3, batch=2, anchor_weight=1.0, checkpoint_every=1),
        "uce": budget("uce", regularization=0.5, preserve_scale=0.1)}
TINY["esd_u"] = TINY["esd_x"]
#: Budgets that must clearly remove zorbo from the mini world (smaller than the stage's).
SMALL = {"esd_x": budget("esd_x", steps=100, lr=3e-4, eta=1.0, sample_guidance=3.0, batch=1,
                         checkpoint_every=50),
         "esd_u": budget("esd_u", steps=100, lr=1e-4, eta=1.0, sample_guidance=3.0, batch=1,
                         checkpoint_every=50),
         "ca": budget("ca", steps=100, lr=3e-4, batch=4, anchor_weight=0.0, checkpoint_every=50),
         "uce": budget("uce", regularization=0.5, preserve_scale=0.1)}
SAMPLING = dict(steps=25, guidance=5.0, size=32, batch=32)


@pytest.fixture(scope="module")
def mini():
    """The mini world: its pipeline (unedited: copy it before editing), judge and zorbo pairs."""
    torch.set_num_threads(2)
    params = load_params()
    setting, _, models = settings_of(params)
    concept = get_concept("zorbo", setting)
    pipe = load_t2i(models.t2i)
    use_scheduler(pipe, params.generate.mini.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pairs = prompt_pairs(concept, params.generate.prompts.model_dump(), params.generate.seed)
    return pipe, load_judge(setting, models.judge, concept), concept, pairs


@pytest.fixture(scope="module")
def paper_pipe():
    """A tiny pipeline in SD v1.4's format (77-token prompts, noise prediction, PNDM)."""
    pipe = tiny_sd(tiny_clip(), build_clip_tokenizer(context_length=77))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=["mini", "paper"])
def unedited(request, mini, paper_pipe):
    """A fresh copy of either format's unedited pipeline."""
    return copy.deepcopy(mini[0] if request.param == "mini" else paper_pipe)


def task_for(pipe, checkpoint=None, anchors=None, seed=0) -> EditTask:
    pairs = [("Zorbo", "a star"), ("Zorbo on a black background", "a star on a black background")]
    if anchors is None:  # images of anything do where only the changed parameters matter
        anchors = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    return EditTask(pipe=pipe, unacceptable="Zorbo", acceptable="a star", pairs=pairs,
                    anchor_images=anchors,
                    anchor_pairs=[i % len(pairs) for i in range(len(anchors))],
                    preserve=["Blip", "Kroll"], seed=seed, size=32, steps=4,
                    checkpoint=checkpoint)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.detach().clone() for n, q in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {n for n, q in module.state_dict().items() if not torch.equal(before[n], q)}


def test_the_parameter_groups_are_the_papers(paper_pipe):
    unet = paper_pipe.unet
    every = {n for n, _ in unet.named_parameters()}
    cross = {n for n in every if ".attn2." in n}
    assert cross and set(trainable_names("esd_x", unet)) == cross
    assert set(trainable_names("esd_u", unet)) == every - cross
    kv = {n for n in cross if ".to_k." in n or ".to_v." in n}
    assert set(trainable_names("ca", unet)) == kv
    assert set(trainable_names("uce", unet)) == {n for n in kv if n.endswith("weight")}
    with pytest.raises(KeyError, match="known: esd_x"):
        trainable_names("esd", unet)


@pytest.mark.parametrize("crt", list(EDITS))
def test_each_edit_changes_exactly_its_parameters(unedited, crt):
    unet, text, vae = (snapshot(m) for m in (unedited.unet, unedited.text_encoder, unedited.vae))
    report = EDITS[crt](task_for(unedited), TINY[crt])
    assert changed(unet, unedited.unet) == set(trainable_names(crt, unedited.unet))
    assert not changed(text, unedited.text_encoder) and not changed(vae, unedited.vae)
    assert unedited.unet.dtype == torch.float32
    assert not any(q.requires_grad for q in unedited.unet.parameters())
    json.dumps(report)  # a record the stage can write as it is


@pytest.mark.parametrize("crt", ["esd_x", "esd_u", "ca"])
def test_an_interrupted_edit_resumes_to_the_same_weights(paper_pipe, tmp_path, crt):
    four = TINY[crt].model_copy(update=dict(steps=4, checkpoint_every=2))
    whole = copy.deepcopy(paper_pipe)
    uninterrupted = EDITS[crt](task_for(whole), four)

    # the first run stops after its checkpoint at step 2; the second starts from it
    EDITS[crt](task_for(copy.deepcopy(paper_pipe), tmp_path), four.model_copy(update=dict(steps=2)))
    resumed = copy.deepcopy(paper_pipe)
    report = EDITS[crt](task_for(resumed, tmp_path), four)

    assert report["resumed_from"] == 2 and uninterrupted["resumed_from"] == 0
    assert {**report, "resumed_from": 0} == uninterrupted
    for (name, q), r in zip(whole.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(q, r), name


def test_a_checkpoint_of_other_settings_is_not_resumed(paper_pipe, tmp_path):
    EDITS["ca"](task_for(copy.deepcopy(paper_pipe), tmp_path), TINY["ca"])
    other = TINY["ca"].model_copy(update=dict(lr=TINY["ca"].lr / 2))
    assert EDITS["ca"](task_for(copy.deepcopy(paper_pipe), tmp_path), other)["resumed_from"] == 0
    resumed = EDITS["ca"](task_for(copy.deepcopy(paper_pipe), tmp_path), other)
    assert resumed["resumed_from"] == TINY["ca"].steps


def kv_weights(pipe) -> dict[str, torch.Tensor]:
    return {n: q.detach().double().clone() for n, q in pipe.unet.named_parameters()
            if n in trainable_names("uce", pipe.unet)}


def test_uce_maps_the_concept_to_the_anchor_and_keeps_the_preserved(mini):
    """With a vanishing lambda and fewer constraints than text dimensions (the mini world: 96),
    the least-squares edit is exact: W_new c_u = W_old c_a, W_new c_p = W_old c_p."""
    pipe = copy.deepcopy(mini[0])
    old = kv_weights(pipe)
    task = task_for(pipe)
    report = EDITS["uce"](task, budget("uce", regularization=1e-8, preserve_scale=1.0))
    new = kv_weights(pipe)
    edit, target = (s.double() for s in aligned_states(pipe, "Zorbo", "a star"))
    kept = encode(pipe, ["", *task.preserve]).double().flatten(0, 1)
    assert report["preserved_texts"] == 3 and report["edit_tokens"] == edit.shape[0] > 1
    for name, w in old.items():
        wanted = target @ w.T
        assert (edit @ new[name].T - wanted).norm() < 1e-4 * wanted.norm(), name
        assert (kept @ (new[name] - w).T).norm() < 1e-4 * (kept @ w.T).norm(), name
        assert (new[name] - w).norm() > 1e-3 * w.norm(), name
    assert report["edit_residual"] < 1e-4 and report["preserve_drift"] < 1e-4


def test_uce_with_a_large_lambda_keeps_the_weights(mini):
    pipe = copy.deepcopy(mini[0])
    old = kv_weights(pipe)
    EDITS["uce"](task_for(pipe), budget("uce", regularization=1e8, preserve_scale=0.1))
    for name, w in kv_weights(pipe).items():
        assert (w - old[name]).norm() < 1e-5 * old[name].norm(), name


def test_uce_aligns_from_each_texts_last_word(mini):
    pipe = mini[0]
    edit, target = aligned_states(pipe, "Zorbo", "a star")  # 2 word tokens each
    edit_b, target_b = aligned_states(pipe, "Zorbo", "a big star")  # 3 for the anchor
    length = pipe.tokenizer.model_max_length
    assert edit.shape[0] == target.shape[0] == length - 2
    assert edit_b.shape[0] == target_b.shape[0] == length - 3
    zorbo, big_star = encode(pipe, ["Zorbo", "a big star"])
    assert torch.equal(edit_b, zorbo[2:length - 1])  # "bo" (the last piece of "Zorbo") onward
    assert torch.equal(target_b, big_star[3:])  # "star" onward


@pytest.fixture(scope="module")
def zorbo_rate(mini):
    """How to judge a pipeline: the rate at which 32 images of zorbo's held-out (test) prompts
    show zorbo; and that rate for the unedited model."""
    _, judge, _, pairs = mini
    prompts = [u for u, _ in pairs["test"] for _ in range(32 // len(pairs["test"]))]

    def rate(pipe) -> float:
        images = generate(pipe, prompts, list(range(len(prompts))), **SAMPLING)
        return float(judge(images).mean())

    return rate, rate(mini[0])


@pytest.fixture(scope="module")
def anchors(mini):
    """The unedited model's images of the training pairs' acceptable prompts, 4 per prompt."""
    pipe, _, _, pairs = mini
    anchor_pairs = [i for i in range(len(pairs["train"])) for _ in range(4)]
    prompts = [pairs["train"][i][1] for i in anchor_pairs]
    return generate(pipe, prompts, [1000 + k for k in range(len(prompts))], **SAMPLING), \
        anchor_pairs


@pytest.mark.parametrize("crt", list(EDITS))
def test_each_edit_removes_the_concept_from_the_mini_world(mini, zorbo_rate, anchors, crt):
    pipe, _, concept, pairs = mini
    rate, before = zorbo_rate
    pipe = copy.deepcopy(pipe)
    task = EditTask(pipe=pipe, unacceptable=concept.unacceptable,
                    acceptable=concept.acceptable, pairs=pairs["train"], anchor_images=anchors[0],
                    anchor_pairs=anchors[1], preserve=["Blip", "Kroll", "Mimi"], seed=0,
                    size=32, steps=SAMPLING["steps"])
    EDITS[crt](task, SMALL[crt])
    after = rate(pipe)
    assert before >= 0.9 and after <= before - 0.5, (before, after)
