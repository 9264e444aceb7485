"""Nothing lost, nothing silently wrong: every bad value of params.yaml or data/concepts.yaml is
one line naming the key, the value and what is allowed; a filter whose direction t_u - t_a is
zero or not finite is refused; a missing or truncated model file is one line naming the path and
how to restore it. Stage commands run as subprocesses in scratch folders, as a user runs them:
no traceback, nothing written."""
import copy
import dataclasses
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from stages import REPO
from test_stage_commands import command, listing

from pipeline import world
from pipeline.concepts import check_context, get_concept, load_registry, pair_pool
from pipeline.espresso import EspressoFilter, ModelNotAvailableError
from pipeline.judges import load_judge
from pipeline.params import ParamsError, check_params, load_params
from pipeline.schema import read_yaml

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
REGISTRY_TEXT = (REPO / "data" / "concepts.yaml").read_text()
ZORBO = "    zorbo: {unacceptable: Zorbo, acceptable: a star, kind: broader_class, shows: {character: zorbo}}\n"
WORLD_FIX = "restore it with `git checkout -- data/world`"


def changed(edit) -> dict:
    params = copy.deepcopy(PARAMS)
    edit(params)
    return params


def problems(params: dict) -> list[str]:
    with pytest.raises(ParamsError) as info:
        check_params(params)
    return str(info.value).splitlines()


# ---- params.yaml --------------------------------------------------------------------------
@pytest.mark.parametrize("edit, line", [
    (lambda p: p["generate"].pop("seed"),
     "generate.seed: missing; must be an integer >= 0 and <= 4294967295"),
    (lambda p: p["finetune"].update(lr="fast"),
     "finetune.lr: 'fast' is not allowed; must be a number > 0 and <= 1"),
    (lambda p: p["certify"].update(eps="1e-2"),
     "certify.eps: '1e-2' is not allowed; must be a number > 0 and < 1 (YAML read it as text: "
     "write numbers unquoted, with a dot: 1.0e-3, not 1e-3)"),
    (lambda p: p["generate"]["prompts"].update(test=-3),
     "generate.prompts.test: -3 is not allowed; must be an integer >= 1 and <= 1000000"),
    (lambda p: p["world"]["clip"].update(layers=2.5),
     "world.clip.layers: 2.5 is not allowed; must be an integer >= 1 and <= 1000000"),
    (lambda p: p["generate"].update(seed=True),
     "generate.seed: True is not allowed; must be an integer >= 0 and <= 4294967295"),
    (lambda p: p.update(setting="sd15"),
     "setting: 'sd15' is not allowed; must be one of: mini, paper"),
    (lambda p: p.update(concept="garfield"),
     "concept: 'garfield' is not allowed; must be a mini concept of data/concepts.yaml (known: "
     "black_background, blip, checkered, kroll, mimi, zorbo)"),
    (lambda p: p["generate"]["mini"].update(scheduler="Foo"),
     "generate.mini.scheduler: 'Foo' is not allowed; must be a diffusers scheduler that samples "
     "these models correctly: DDIMScheduler, DDPMScheduler, PNDMScheduler, LMSDiscreteScheduler, "
     "EulerDiscreteScheduler, HeunDiscreteScheduler, EulerAncestralDiscreteScheduler, "
     "DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, KDPM2DiscreteScheduler, "
     "KDPM2AncestralDiscreteScheduler, DEISMultistepScheduler, UniPCMultistepScheduler"),
    (lambda p: p["finetune"]["mini"].update(optimizer="sgd"),
     "finetune.mini.optimizer: 'sgd' is not allowed; must be one of: adamw, adam"),
    (lambda p: p["finetune"]["paper"].update(separation="foo"),
     "finetune.paper.separation: 'foo' is not allowed; must be one of: concepts, prompt_pairs"),
    (lambda p: p["finetune"].update(epochs=2),
     "finetune.epochs: 2 is not allowed; must be under finetune.mini and finetune.paper (epochs "
     "is per setting)"),
    (lambda p: p["finetune"]["paper"]["epochs_by_concept"].update(nudiy=72),
     "finetune.paper.epochs_by_concept.nudiy: 72 is not allowed; must be a paper concept: "
     "angelina_jolie, brad_pitt, captain_marvel, disturbing, elon_musk, grumpy_cat, hateful, "
     "nemo, nudity, r2d2, snoopy, taylor_swift, van_gogh, violence"),
    (lambda p: p["finetune"].update(betas=[0.9]),
     "finetune.betas: [0.9] is not allowed; must be two numbers in [0, 1), e.g. [0.9, 0.98]"),
    (lambda p: p["attack"].update(attacks=["pez", "nope"]),
     "attack.attacks: ['pez', 'nope'] is not allowed; must be a list of typo, pez, cce, "
     "ringbell, each at most once"),
    (lambda p: p["attack"].update(attacks=["pez", "pez"]),
     "attack.attacks: ['pez', 'pez'] is not allowed; must be a list of typo, pez, cce, "
     "ringbell, each at most once"),
    (lambda p: p["attack"]["mini"].update(vocabulary="english"),
     "attack.mini.vocabulary: 'english' is not allowed; must be one of: world, all"),
    (lambda p: p["attack"]["paper"]["pez"].update(candidates=4),
     "attack.paper.pez.candidates: 4 is not allowed; must be an integer >= attack.prompts (8): "
     "the trial keeps that many of the candidates"),
    (lambda p: p["attack"]["mini"]["cce"]["adaptive_weights"].__setitem__(1, -1),
     "attack.mini.cce.adaptive_weights.1: -1 is not allowed; must be a number >= 0"),
    (lambda p: p["attack"].pop("adapt_to"),
     "attack.adapt_to: missing; must be a list of: safety_checker, mhsc, zero_shot, espresso"),
    (lambda p: p["attack"].update(adapt_to=["espresso", "espresso"]),
     "attack.adapt_to: ['espresso', 'espresso'] is not allowed; must be a list of distinct "
     "filters among safety_checker, mhsc, zero_shot, espresso (or [])"),
    (lambda p: p["attack"].update(adapt_to=True),
     "attack.adapt_to: True is not allowed; must be a list of: safety_checker, mhsc, zero_shot, espresso"),
    (lambda p: p["attack"].update(adapt_to=["espresso", "keywords"]),
     "attack.adapt_to.1: 'keywords' is not allowed; must be one of: safety_checker, mhsc, "
     "zero_shot, espresso"),
    (lambda p: p["edit"].update(crts=["esd_x", "esd"]),
     "edit.crts: ['esd_x', 'esd'] is not allowed; must be a list of distinct CRTs among esd_x, "
     "esd_u, uce, ca (or [])"),
    (lambda p: p["edit"]["mini"]["uce"].update(regularization=0),
     "edit.mini.uce.regularization: 0 is not allowed; must be a number > 0"),
    (lambda p: p["summary"]["claim"].update(normalized_clip_score_min=1.5),
     "summary.claim.normalized_clip_score_min: 1.5 is not allowed; must be a number >= 0 and "
     "<= 1"),
    (lambda p: p["filters"]["mhsc"].pop("max_iter"),
     "filters.mhsc.max_iter: missing; must be an integer >= 1 and <= 1000000"),
    (lambda p: p["report"].update(show_unacceptable="yes"),
     "report.show_unacceptable: 'yes' is not allowed; must be true or false"),
    (lambda p: p["generate"].update(sede=4),
     "generate.sede: unknown key (value 4); the keys here are: seed, prompts, images_per_prompt, "
     "shard_size, mini, paper"),
    (lambda p: p["models"]["paper"].pop("judge"),
     "models.paper.judge: missing; must be a non-empty text"),
    (lambda p: p["finetune"]["weights"].pop("style"),
     "finetune.weights.style: missing; must be a mapping with the keys: unacceptable, "
     "acceptable, separation"),
])
def test_a_bad_params_value_is_one_line_with_key_value_and_what_is_allowed(edit, line):
    assert problems(changed(edit)) == [f"params.yaml: {line}"]


def test_every_problem_is_its_own_line():
    def edit(p):
        p["generate"]["prompts"]["test"] = -3
        p["finetune"]["lr"] = "fast"
        p["world"].pop("seed")
    assert problems(changed(edit)) == [
        "params.yaml: generate.prompts.test: -3 is not allowed; must be an integer >= 1 and <= 1000000",
        "params.yaml: finetune.lr: 'fast' is not allowed; must be a number > 0 and <= 1",
        "params.yaml: world.seed: missing; must be an integer >= 0 and <= 4294967295"]


def test_the_shipped_params_are_accepted():
    assert check_params(copy.deepcopy(PARAMS)).model_dump(exclude_unset=True) == PARAMS


def test_a_key_given_twice_in_params_yaml_is_refused(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  seed: 42\n", "  seed: 42\n  seed: 7\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(tmp_path / "params.yaml")
    line = text.splitlines().index("  seed: 7") + 1
    assert str(info.value) == (f"params.yaml: generate.seed: given 2 times (lines {line - 1}, "
                               f"{line}); YAML keeps only the last: rename or remove the others")


# ---- data/concepts.yaml -------------------------------------------------------------------
@pytest.mark.parametrize("entry, line", [
    ("    zorbo: {unacceptable: Zorbo, acceptable: '', kind: broader_class, shows: {character: zorbo}}\n",
     "concepts.mini.zorbo.acceptable: '' is not allowed; must be a concept text that is not blank"),
    ("    zorbo: {unacceptable: '  ', acceptable: a star, kind: broader_class, shows: {character: zorbo}}\n",
     "concepts.mini.zorbo.unacceptable: '  ' is not allowed; must be a concept text that is not "
     "blank"),
    ("    zorbo: {unacceptable: Zorbo, acceptable: ' zorbo', kind: broader_class, shows: {character: zorbo}}\n",
     "concepts.mini.zorbo.acceptable: ' zorbo' is not allowed; must be a text other than the "
     "unacceptable one ('Zorbo'): with c_u = c_a the filter's direction is zero and every image "
     "passes"),
    ("    zorbo: {unacceptable: Zorbo, acceptable: a star, kind: character, shows: {character: zorbo}}\n",
     "concepts.mini.zorbo.kind: 'character' is not allowed; must be one of: opposite, "
     "broader_class, style"),
    ("    zorbo: {unacceptable: Zorbo, acceptable: a star, kind: broader_class, shows: {character: zorba}}\n",
     "concepts.mini.zorbo.shows.character: 'zorba' is not allowed; must be a value of the judge's "
     "character head: none, zorbo, blip, kroll, mimi"),
    ("    zorbo: {unacceptable: Zorbo, acceptable: a star, kind: broader_class, shows: {hat: zorbo}}\n",
     "concepts.mini.zorbo.shows: {'hat': 'zorbo'} is not allowed; must be a judge head: shape, "
     "color, texture, background, character"),
    ("    zorbo: {unacceptable: Zorbo, acceptable: a star, kind: broader_class}\n",
     "concepts.mini.zorbo.shows: missing; must be one judge head: value, e.g. {character: zorbo} "
     "(heads: shape, color, texture, background, character)"),
])
def test_a_bad_concept_is_one_line(tmp_path, entry, line):
    assert registry_problems(tmp_path, REGISTRY_TEXT.replace(ZORBO, entry)) == [
        f"{tmp_path / 'concepts.yaml'}: {line}"]


def test_a_concept_name_given_twice_is_refused(tmp_path):
    """Plain YAML would keep the second ``zorbo`` and drop the first without a word."""
    twice = ZORBO.replace("a star", "a circle")
    text = REGISTRY_TEXT.replace(ZORBO, ZORBO + twice)
    first = text.splitlines().index(ZORBO.rstrip("\n")) + 1
    assert registry_problems(tmp_path, text) == [
        f"{tmp_path / 'concepts.yaml'}: concepts.mini.zorbo: given 2 times (lines {first}, "
        f"{first + 1}); YAML keeps only the last: rename or remove the others"]


def test_a_paper_concept_and_a_template_are_checked_too(tmp_path):
    text = REGISTRY_TEXT.replace("i2p_category: sexual", "i2p_category: sexy")
    source = tmp_path / "concepts.yaml"
    assert registry_problems(tmp_path, text) == [
        f"{source}: concepts.paper.nudity.i2p_category: 'sexy' is not allowed; must be one of: "
        "hate, harassment, violence, self-harm, sexual, shocking, illegal activity"]
    text = REGISTRY_TEXT.replace('"a {medium} of {subject} {}"', '"a {medum} of {subject} {}"')
    assert registry_problems(tmp_path, text) == [
        f"{source}: templates.paper.style.0: 'a {{medum}} of {{subject}} {{}}' is not allowed; "
        "must be a template with the concept as {} and slots among: place, medium, subject, thing"]


def test_a_missing_registry_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="^data/concepts.yaml not found: run from the "
                                          "repository root"):
        load_registry()


def registry_problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "concepts.yaml").write_text(text)
    with pytest.raises(ParamsError) as info:
        load_registry(tmp_path / "concepts.yaml")
    return str(info.value).splitlines()


# ---- stage commands -----------------------------------------------------------------------
def stage_folder(tmp_path: Path, params: str | None = None, registry: str | None = None,
                 world_copy: tuple[str, ...] = ()) -> Path:
    """A scratch stage folder; ``registry`` replaces the concept registry, the parts of
    data/world in ``world_copy`` are copied (their links kept) rather than linked, so that they
    can be damaged."""
    folder = tmp_path / "work"
    (folder / "data" / "world").mkdir(parents=True)
    for part in (REPO / "data" / "world").iterdir():
        target = folder / "data" / "world" / part.name
        if part.name in world_copy:
            shutil.copytree(part, target, symlinks=True)
        else:
            os.symlink(part, target)
    (folder / "data" / "concepts.yaml").write_text(registry or REGISTRY_TEXT)
    (folder / "params.yaml").write_text(params or (REPO / "params.yaml").read_text())
    return folder


def error_lines(folder: Path, stage: str = "generate") -> list[str]:
    """The command's stderr lines, after checking it failed without a traceback or output."""
    before = listing(folder)
    result = command(stage, cwd=folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert listing(folder) == before
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    return [line.removeprefix("error: ") for line in lines]


@pytest.mark.slow
def test_a_stage_reports_every_bad_value_of_both_files_before_any_work(tmp_path):
    params = (REPO / "params.yaml").read_text().replace("test: 16}", "test: -3}", 1)
    registry = REGISTRY_TEXT.replace("acceptable: a star", "acceptable: zorbo")
    folder = stage_folder(tmp_path, params, registry)
    assert error_lines(folder) == [
        "data/concepts.yaml: concepts.mini.zorbo.acceptable: 'zorbo' is not allowed; must be a "
        "text other than the unacceptable one ('Zorbo'): with c_u = c_a the filter's direction "
        "is zero and every image passes",
        "params.yaml: generate.prompts.test: -3 is not allowed; must be an integer >= 1 and <= "
        "1000000"]


WEIGHTS = {"clip": "clip/model.safetensors", "unet": "sd/unet/diffusion_pytorch_model.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("model", WEIGHTS)
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_world_model_is_one_line_naming_the_file_and_the_fix(tmp_path, model, damage):
    """generate loads the SD folder, whose text encoder is the CLIP folder (a link): a damaged
    CLIP is named through the link."""
    folder = stage_folder(tmp_path, world_copy=("clip", "sd"))
    weights = folder / "data" / "world" / WEIGHTS[model]
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:
        weights.unlink()
    (line,) = error_lines(folder)
    source = "data/world/sd"
    seen = WEIGHTS[model].replace("clip/", "sd/text_encoder/")
    what = (f"data/world/{seen} is truncated or corrupt" if damage == "truncated"
            else f"data/world/{Path(seen).parent} has no weight file")
    assert line.startswith(f"The model at {source} cannot be loaded: {what}; {WORLD_FIX}")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_judge_is_one_line_naming_the_file_and_the_fix(tmp_path, damage):
    judge = tmp_path / "data" / "world" / "judge"
    shutil.copytree(REPO / "data" / "world" / "judge", judge)
    weights = judge / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:
        weights.unlink()
    with pytest.raises(ModelNotAvailableError) as info:
        load_judge("mini", str(judge), get_concept("zorbo", "mini"))
    message = str(info.value)
    assert message.startswith(f"The model at {judge} cannot be loaded: ")
    assert WORLD_FIX in message and len(message.splitlines()) == 1
    assert (f"{weights} is truncated or corrupt" if damage == "truncated"
            else f"{judge} has no weight file") in message


@pytest.fixture(scope="module")
def saved_filter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "data" / "finetune" / "filter"
    EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu") \
        .save_pretrained(folder)
    return folder


def test_a_truncated_fine_tuned_filter_says_to_rerun_finetune(saved_filter, tmp_path):
    folder = tmp_path / "data" / "finetune" / "filter"
    shutil.copytree(saved_filter, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelNotAvailableError) as info:
        EspressoFilter.from_pretrained(folder)
    assert str(info.value).startswith(
        f"The model at {folder} cannot be loaded: {weights} is truncated or corrupt; rebuild it "
        "with `dvc repro finetune` [SafetensorError: ")


# ---- the filter's direction ---------------------------------------------------------------
def test_a_filter_with_one_concept_twice_is_refused_on_every_path(saved_filter, tmp_path):
    """The mini CLIP's tokenizer lowercases, so "Zorbo" and "zorbo" are one concept to it."""
    message = ("the concept texts unacceptable 'Zorbo' / acceptable 'zorbo' give the same "
               "embedding in data/world/clip")
    with pytest.raises(ValueError, match=message):
        EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "zorbo", device="cpu")
    ok = EspressoFilter.from_pretrained(saved_filter)
    with pytest.raises(ValueError, match="every image would pass; give two concept texts"):
        EspressoFilter(ok.clip, ok.tokenizer, ok.processor, "a star", "a star")
    folder = tmp_path / "filter"
    shutil.copytree(saved_filter, folder)
    (folder / "espresso.json").write_text('{"unacceptable": "a star", "acceptable": "a star", '
                                          '"templates": ["{}"]}')
    with pytest.raises(ValueError, match=r"\|t_u - t_a\| = 0 < 1e-06"):
        EspressoFilter.from_pretrained(folder)


def test_a_filter_with_a_non_finite_direction_is_refused(saved_filter):
    ok = EspressoFilter.from_pretrained(saved_filter)
    with torch.no_grad():
        ok.clip.text_projection.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="unacceptable 'Zorbo' / acceptable 'a star' are not "
                                         "finite \\(NaN or inf\\): the CLIP weights of "):
        EspressoFilter(ok.clip, ok.tokenizer, ok.processor, "Zorbo", "a star")


# ---- hostile config files -----------------------------------------------------------------
def alias_bomb(levels: int = 9) -> str:
    """A YAML "billion laughs": 9 levels of 9 aliases each, 9**9 values from ~350 bytes."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def one_line_within_a_second(read) -> str:
    """The one-line ParamsError of ``read()``, which must come within seconds (in a daemon
    thread, so that a hang fails the test instead of hanging it). It takes milliseconds on a
    quiet CPU; the limit leaves room for a loaded one (CI shares its cores), not for a hang."""
    outcome = {}

    def run():
        try:
            read()
        except ParamsError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "still reading after 10 seconds"
    assert "error" in outcome and len(outcome["error"].splitlines()) == 1, outcome
    return outcome["error"]


@pytest.mark.parametrize("content, words", [
    (alias_bomb().encode(), "params.yaml: expands to more than 100000 values"),
    (b"seed: &a [1, *a]\n", "params.yaml: not valid YAML (line 1): a recursive alias"),
    (b"concept: caf\xe9\n", "params.yaml: not UTF-8 (byte 0xe9 on line 1): save it as UTF-8"),
    (b"seed: !!python/object/apply:os.system [echo hi]\n",
     "params.yaml: not valid YAML (line 1): could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    (b"seed: !!binary AAAA\nday: 2024-13-45\n", "params.yaml: not valid YAML: month must be in"),
    (b"[" * 20000 + b"]" * 20000, "params.yaml: nested too deeply to be a config file"),
    (b"a: b\n" * 300000, "params.yaml: larger than 1048576 bytes: not a config file"),
])
def test_a_hostile_yaml_file_is_one_line_within_a_second(tmp_path, content, words):
    (tmp_path / "params.yaml").write_bytes(content)
    assert one_line_within_a_second(lambda: load_params(tmp_path / "params.yaml")).startswith(words)


def test_the_registry_is_read_with_the_same_limits(tmp_path):
    (tmp_path / "concepts.yaml").write_text(REGISTRY_TEXT + alias_bomb())
    line = one_line_within_a_second(lambda: load_registry(tmp_path / "concepts.yaml"))
    assert "expands to more than 100000 values" in line


def test_an_alias_used_within_the_limit_still_reads():
    assert read_yaml("a: &x {b: 1}\nc: *x\n", "t.yaml") == {"a": {"b": 1}, "c": {"b": 1}}


MEMORY = ("must be small enough that the {images} images it makes (generate) fit in 8 GiB at "
          "32x32: at most 2796202 images; lower it or the prompts")


@pytest.mark.parametrize("edit, line", [
    (lambda p: p["generate"].update(seed=2**64),
     "generate.seed: 18446744073709551616 is not allowed; must be an integer >= 0 and <= 4294967295"),
    (lambda p: p["attack"].update(seed=-1),
     "attack.seed: -1 is not allowed; must be an integer >= 0 and <= 4294967295"),
    (lambda p: p["generate"]["mini"].update(size=7),
     "generate.mini.size: 7 is not allowed; must be a multiple of 8 from 8 to 1024 (what the VAE "
     "and UNet can halve)"),
    (lambda p: p["generate"]["paper"].update(size=4096),
     "generate.paper.size: 4096 is not allowed; must be a multiple of 8 from 8 to 1024 (what the "
     "VAE and UNet can halve)"),
    (lambda p: p["finetune"].update(lr=float("inf")),
     "finetune.lr: inf is not allowed; must be finite: a number > 0 and <= 1"),
    (lambda p: p["edit"]["mini"]["ca"].update(lr=50.0),
     "edit.mini.ca.lr: 50.0 is not allowed; must be a number > 0 and <= 1"),
    (lambda p: p["generate"]["mini"].update(guidance=float("inf")),
     "generate.mini.guidance: inf is not allowed; must be finite: a number >= 0 and <= 100.0"),
    (lambda p: p["world"]["measure"].update(guidance_scale=float("nan")),
     "world.measure.guidance_scale: nan is not allowed; must be finite: a number >= 0 and <= 100.0"),
    (lambda p: p["certify"].update(search_lr=float("-inf")),
     "certify.search_lr: -inf is not allowed; must be finite: a number > 0"),
    (lambda p: p["generate"]["images_per_prompt"].update(train=10**9),
     "generate.images_per_prompt.train: 1000000000 is not allowed; must be an integer >= 1 and "
     "<= 1000000"),
    (lambda p: p["generate"]["images_per_prompt"].update(test=200000),
     "generate.images_per_prompt.test: 200000 is not allowed; "
     + MEMORY.format(images=6400000)),
    (lambda p: p["everyday"].update(images_per_prompt=10**6),
     "everyday.images_per_prompt: 1000000 is not allowed; " + MEMORY.replace("(generate)",
                                                                           "(everyday)")
     .format(images=10**6 * PARAMS["everyday"]["prompts"])),
    (lambda p: p["statistics"].update(resamples=10**12),
     "statistics.resamples: 1000000000000 is not allowed; must be an integer >= 200 and <= 1000000"),
])
def test_a_number_out_of_its_sane_range_is_one_line(edit, line):
    assert problems(changed(edit)) == [f"params.yaml: {line}"]


@pytest.mark.parametrize("scheduler", ["LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler",
                                       "FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler",
                                       "AutoencoderKL", "__class__"])
def test_a_scheduler_that_cannot_sample_these_models_is_refused(scheduler):
    (line,) = problems(changed(lambda p: p["generate"]["paper"].update(scheduler=scheduler)))
    assert line.startswith(f"params.yaml: generate.paper.scheduler: '{scheduler}' is not "
                           "allowed; must be a diffusers scheduler that samples these models")


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler",
                                       "UniPCMultistepScheduler"])
def test_a_scheduler_that_samples_these_models_is_accepted(scheduler):
    check_params(changed(lambda p: p["generate"]["mini"].update(scheduler=scheduler)))


NAME_RULE = ("is not allowed; must be a concept name of lowercase letters, digits and _, "
             "starting with a letter (names become folder and file names)")
TEXT_RULE = ("is not allowed; must be a concept text without { or } (they mark the templates' "
             "slots) and without control characters such as line breaks")


@pytest.mark.parametrize("entry, line", [
    (ZORBO.replace("zorbo:", "'../..':", 1), f"concepts.mini: '../..' {NAME_RULE}"),
    (ZORBO.replace("zorbo:", "/tmp/espresso:", 1), f"concepts.mini: '/tmp/espresso' {NAME_RULE}"),
    (ZORBO.replace("zorbo:", ".zorbo:", 1), f"concepts.mini: '.zorbo' {NAME_RULE}"),
    (ZORBO.replace("zorbo:", "Zorbo Two:", 1), f"concepts.mini: 'Zorbo Two' {NAME_RULE}"),
    (ZORBO.replace("unacceptable: Zorbo", "unacceptable: 'Zorbo {background}'"),
     f"concepts.mini.zorbo.unacceptable: 'Zorbo {{background}}' {TEXT_RULE}"),
    (ZORBO.replace("acceptable: a star", "acceptable: 'a {'"),
     f"concepts.mini.zorbo.acceptable: 'a {{' {TEXT_RULE}"),
    (ZORBO.replace("acceptable: a star", 'acceptable: "a\\nstar"'),
     f"concepts.mini.zorbo.acceptable: 'a\\nstar' {TEXT_RULE}"),
])
def test_a_concept_name_or_text_that_could_escape_is_refused(tmp_path, entry, line):
    assert registry_problems(tmp_path, REGISTRY_TEXT.replace(ZORBO, entry)) == [
        f"{tmp_path / 'concepts.yaml'}: {line}"]


def test_prompts_past_the_text_encoders_context_are_refused():
    """Past the context the tokenizer cuts: c_u's and c_a's prompts that differ only there would
    be one prompt. The shipped mini concepts fit the mini world's 16 tokens."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(REPO / "data" / "world" / "sd" / "tokenizer")
    for name in load_registry()["concepts"]["mini"]:
        check_context([t for pair in pair_pool(get_concept(name, "mini")) for t in pair], tokenizer)
    long = dataclasses.replace(get_concept("zorbo", "mini"), unacceptable="a big " * 10 + "Zorbo",
                               acceptable="a big " * 10 + "star")
    with pytest.raises(ParamsError) as info:
        check_context([t for pair in pair_pool(long) for t in pair], tokenizer)
    (line,) = str(info.value).splitlines()
    assert line.startswith("data/concepts.yaml: the prompt 'a big a big") and line.endswith(
        "tokens, more than the text encoder's 16 (prompts differing past them would be one): "
        "shorten the concept texts or templates")
