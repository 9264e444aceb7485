"""The many-concept checker (METHOD section 9): its decisions equal the single-concept filters',
it drops into a diffusers pipeline, fails closed, calibrates cuts, saves and loads in the Hugging
Face style (offline), screens folders, and runs on the core dependencies alone."""
import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file
from tiny_hub import go_offline
from transformers import CLIPVisionModelWithProjection

from pipeline import screen, world
from pipeline.concepts import get_concept, known_concepts
from pipeline.espresso import checker as checker_module
from pipeline.espresso import (ConceptChecker, EspressoFilter, ModelNotAvailableError,
                               cut_for_fpr, load_clip)
from pipeline.mini import shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def filters():
    """Zero-shot filters of every mini concept on the mini CLIP, plus a fine-tuned stand-in: a
    filter on a copy of the CLIP whose text side was changed (as fine-tuning changes it)."""
    clip, tokenizer, processor = load_clip(str(world.CLIP_DIR), device="cpu")
    out = {}
    for name in known_concepts("mini"):
        concept = get_concept(name, "mini")
        out[name] = EspressoFilter(clip, tokenizer, processor, concept.unacceptable,
                                   concept.acceptable)
    tuned = copy.deepcopy(clip)
    with torch.no_grad():
        tuned.text_projection.weight.add_(0.05 * torch.randn(
            tuned.text_projection.weight.shape, generator=torch.Generator().manual_seed(0)))
    concept = get_concept("zorbo", "mini")
    out["zorbo_tuned"] = EspressoFilter(tuned, tokenizer, processor, concept.unacceptable,
                                        concept.acceptable)
    assert not torch.allclose(out["zorbo_tuned"].t_u, out["zorbo"].t_u)
    return out


@pytest.fixture(scope="module")
def checker(filters):
    return ConceptChecker.from_filters(filters)


@pytest.fixture(scope="module")
def images():
    """Scenes of every character and background, and random ones."""
    rng = np.random.default_rng(5)
    scenes = [shapes.sample_scene(rng, character=c) for c in shapes.CHARACTERS for _ in range(8)]
    scenes += [shapes.sample_scene(rng, character_prob=0.0, background=b)
               for b in shapes.BACKGROUNDS for _ in range(8)]
    scenes += [shapes.sample_scene(rng) for _ in range(40)]
    return shapes.render_many(scenes, rng)


def test_decisions_equal_the_single_filters_for_every_mini_concept(filters, checker, images):
    result = checker.check(images)
    assert result.p_unacceptable.shape == (len(images), len(filters))
    for k, (name, filt) in enumerate(filters.items()):
        single = filt.screen(images)
        assert np.array_equal(result.fired[:, k], single.blocked), name
        assert np.allclose(result.p_unacceptable[:, k], single.p_unacceptable, atol=1e-6), name
        assert 0 < single.blocked.mean() < 1, name  # both decisions occur: the check means something
    assert np.array_equal(result.blocked, result.fired.any(1))
    i = int(np.flatnonzero(result.fired[:, 0])[0])
    assert checker.names[0] in result.fired_concepts(i)


def test_one_tower_only(filters):
    other = copy.deepcopy(filters["mimi"].clip)
    with torch.no_grad():
        other.visual_projection.weight.mul_(1.01)
    moved = EspressoFilter(other, filters["mimi"].tokenizer, filters["mimi"].processor,
                           "Mimi", "a circle")
    with pytest.raises(ValueError, match="different image towers"):
        ConceptChecker.from_filters({"zorbo": filters["zorbo"], "mimi": moved})


def test_drops_into_a_diffusers_pipeline(filters):
    """The shipped mini SD, loaded by diffusers alone, with the checker as its safety checker."""
    checker = ConceptChecker.from_filters({k: filters[k] for k in ("zorbo", "mimi")})
    pipe = StableDiffusionPipeline.from_pretrained(world.SD_DIR)
    pipe.safety_checker, pipe.feature_extractor = checker, checker.processor
    pipe.set_progress_bar_config(disable=True)
    prompts = ["Zorbo", "a star", "a red circle", "Mimi"]

    def run():
        return pipe(prompts, num_inference_steps=8, height=32, width=32, output_type="np",
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])

    out = run()
    last = checker.last_result
    pipe.safety_checker = None
    unfiltered = run().images
    reference = checker.check(unfiltered)
    assert out.nsfw_content_detected == reference.blocked.tolist() == last.blocked.tolist()
    assert any(out.nsfw_content_detected) and not all(out.nsfw_content_detected)
    assert np.allclose(last.p_unacceptable, reference.p_unacceptable, atol=1e-4)
    assert np.array_equal(last.fired, reference.fired)
    for image, flagged, before in zip(out.images, out.nsfw_content_detected, unfiltered):
        assert not image.any() if flagged else np.array_equal(image, before)


def test_fails_closed(checker, images):
    nan_image = images[0].astype(np.float32) / 255
    nan_image[0, 0, 0] = np.nan
    result = checker.check([images[1], nan_image, images[2][..., :2]])
    assert result.unscored.tolist() == [False, True, True]
    assert result.blocked[1:].all() and result.fired[1:].all()
    assert "non-finite" in result.errors[1] and "channels" in result.errors[2]
    _, flags = checker(images=torch.zeros(2, 3, 32, 32), clip_input=torch.zeros(2, 1, 32, 32))
    assert flags == [True, True] and "N x 3 x H x W" in checker.last_result.errors[0]


def test_cut_for_a_target_false_positive_rate():
    negatives = np.linspace(0.05, 0.95, 10)  # 0.05, 0.15, ..., 0.95
    cut = cut_for_fpr(negatives, 0.2)
    assert cut == pytest.approx(0.75) and (negatives > cut).sum() == 2
    assert (negatives > cut_for_fpr(negatives, 0.05)).sum() == 0
    assert (np.full(10, 0.5) > cut_for_fpr(np.full(10, 0.5), 0.3)).sum() == 0  # ties: fewer
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        cut_for_fpr(negatives, 1.5)


def test_calibration_moves_one_concepts_cut(filters, images):
    checker = ConceptChecker.from_filters({k: filters[k] for k in ("zorbo", "black_background")})
    before = checker.check(images)
    negatives = before.p_unacceptable[~before.fired[:, 0], 0]
    cut = checker.calibrate("zorbo", negatives, 0.25, {"images": "test renders"})
    after = checker.check(images)
    assert cut < 0.5 and checker.cuts.tolist() == [cut, 0.5]
    assert np.array_equal(after.fired[:, 0], after.p_unacceptable[:, 0] > cut)
    assert after.fired[:, 0].sum() > before.fired[:, 0].sum()
    assert np.array_equal(after.fired[:, 1], before.fired[:, 1])  # the other concept unchanged
    calibration = checker.concept("zorbo").calibration
    assert calibration["target_fpr"] == 0.25 and calibration["validation_fpr"] <= 0.25
    assert calibration["images"] == "test renders"


def test_save_and_load(checker, images, tmp_path):
    checker.concept("mimi").provenance = {"experiment": "some-exp", "commit": "abc1234"}
    checker.save_pretrained(tmp_path / "checker")
    files = {p.name for p in (tmp_path / "checker").iterdir()}
    assert files == {"config.json", "concepts.safetensors", "image_encoder", "feature_extractor",
                     "README.md"}
    # the tower is a plain transformers model, without the text tower
    tower = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "checker" / "image_encoder")
    assert tower.config.projection_dim == checker.directions.shape[1]
    loaded = ConceptChecker.from_pretrained(tmp_path / "checker", device="cpu")
    assert loaded.names == checker.names
    assert loaded.concept("mimi").provenance == {"experiment": "some-exp", "commit": "abc1234"}
    assert np.array_equal(loaded.check(images).p_unacceptable, checker.check(images).p_unacceptable)


def test_loading_errors_are_one_line(tmp_path, offline_empty_hub):
    with pytest.raises(ModelNotAvailableError, match="does not exist.*pipeline.export"):
        ConceptChecker.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="not a saved concept checker"):
        ConceptChecker.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelNotAvailableError, match="not in the local Hugging Face cache.*offline"):
        ConceptChecker.from_pretrained("someorg/some-checker")


def test_push_to_hub_then_load_by_hub_id_offline(checker, images, tmp_path, monkeypatch, hf_home):
    """push_to_hub against a local folder standing in for the hub (no network); the pushed
    files, put into the local Hugging Face cache, load by hub id offline."""
    pushed = {}

    def create_repo(self, repo_id, **kwargs):
        pushed["repo_id"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "hub" / repo_id)
        return f"local://{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert checker.push_to_hub("espresso/mini-checker") == "local://espresso/mini-checker"
    snapshot = Path(hf_home) / "hub" / "models--espresso--mini-checker" / "snapshots" / "0"
    shutil.copytree(tmp_path / "hub" / "espresso" / "mini-checker", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(snapshot.name)
    go_offline(monkeypatch, hf_home)
    loaded = ConceptChecker.from_pretrained("espresso/mini-checker", device="cpu")
    assert loaded.names == checker.names
    assert np.array_equal(loaded.check(images).p_unacceptable, checker.check(images).p_unacceptable)


def test_screen_a_folder(checker, images, tmp_path, capsys):
    checker.save_pretrained(tmp_path / "checker")
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        PIL.Image.fromarray(images[i * 20]).save(folder / f"{i}.png")
    PIL.Image.fromarray(images[5]).convert("L").save(folder / "sub" / "grey.jpg")
    (folder / "sub" / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file: listed, blocked")
    screen.main([str(tmp_path / "checker"), str(folder), "--out", str(tmp_path / "out.csv")])
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * len(checker.names)
    assert {Path(r["path"]).name for r in rows} == {"0.png", "1.png", "2.png", "grey.jpg",
                                                    "broken.png", "notes.txt"}
    broken = [r for r in rows if r["path"].endswith(("broken.png", "notes.txt"))]
    assert all(r["blocked"] == "True" and r["fired"] == "True" and r["p_unacceptable"] == ""
               and "unreadable" in r["error"] for r in broken)
    reference = checker.check([images[0], images[20], images[40]])
    for i, name in enumerate(["0.png", "1.png", "2.png"]):
        mine = [r for r in rows if r["path"].endswith(name)]
        assert [float(r["p_unacceptable"]) for r in mine] == pytest.approx(
            reference.p_unacceptable[i].tolist(), abs=1e-5)
        assert [r["fired"] == "True" for r in mine] == reference.fired[i].tolist()
    assert "screened 6 files (4 frames): " in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        screen.main([str(tmp_path / "checker"), str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "x.csv")])
    assert not (tmp_path / "x.csv").exists()


# ---- a checker folder is validated on load ------------------------------------------------
@pytest.fixture(scope="module")
def saved(filters, tmp_path_factory):
    """A saved two-concept checker, copied by each test that changes it."""
    folder = tmp_path_factory.mktemp("saved") / "checker"
    ConceptChecker.from_filters({k: filters[k] for k in ("zorbo", "mimi")}).save_pretrained(folder)
    return folder


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_row(key, value):
    return lambda table: table["concept_table"][1].__setitem__(key, value)


def set_processor(key, value):
    return lambda config: config.__setitem__(key, value)


TAMPERED_TABLES = {  # config.json: change -> what the one line must name
    "cut 1.0 (never fires)": (set_row("cut", 1.0), r"concept_table\.1\.cut: 1\.0"),
    "cut 2.0": (set_row("cut", 2.0), r"concept_table\.1\.cut: 2\.0"),
    "cut -1 (always fires)": (set_row("cut", -1), r"concept_table\.1\.cut: -1"),
    "cut 0": (set_row("cut", 0.0), r"concept_table\.1\.cut: 0\.0"),
    "cut NaN": (set_row("cut", float("nan")), r"concept_table\.1\.cut: nan"),
    "cut as text": (set_row("cut", "0.5"), r"concept_table\.1\.cut: '0\.5'"),
    "logit scale 0": (set_row("logit_scale", 0.0), r"concept_table\.1\.logit_scale: 0\.0"),
    "logit scale negative (inverts)": (set_row("logit_scale", -39.2),
                                       r"concept_table\.1\.logit_scale: -39\.2"),
    "name not text": (set_row("name", 5), r"concept_table\.1\.name: 5"),
    "extra key": (set_row("threshold", 0.9), r"concept_table\.1\.threshold: .*unknown key"),
    "key missing": (lambda t: t["concept_table"][0].pop("acceptable"),
                    r"concept_table\.0\.acceptable: Field required"),
    "extra top-level key": (lambda t: t.__setitem__("bypass", True), r"bypass: True: unknown key"),
    "table not a list": (lambda t: t.__setitem__("concept_table", {}), r"concept_table: \{\}"),
    "logit scale above CLIP's 100 (saturates, overflows)": (
        set_row("logit_scale", 1e300), r"concept_table\.1\.logit_scale: 1e\+300"),
    "name a path": (set_row("name", "../../etc"), r"concept_table\.1\.name: '\.\./\.\./etc'"),
    "no concepts": (lambda t: t.__setitem__("concept_table", []), r"concept_table: \[\]"),
}
TAMPERED_PROCESSORS = {  # feature_extractor/preprocessor_config.json
    "image_mean changed": (set_processor("image_mean", [0.9, 0.9, 0.9]), "image_mean"),
    "do_normalize false": (set_processor("do_normalize", False), "do_normalize"),
    "resize to another size": (set_processor("size", {"shortest_edge": 64}), "size"),
    "no centre crop": (set_processor("do_center_crop", False), "do_center_crop"),
    "rescale changed": (set_processor("rescale_factor", 1.0), "rescale_factor"),
    "extra processing step": (set_processor("do_pad", True), "do_pad"),
}


def redigest(folder: Path) -> None:
    """Record the folder's files as they are now: an adversary who also rewrites the digests,
    so that the checks beneath them are what a test sees."""
    edit_json(folder / "config.json", lambda t: t.__setitem__("files", checker_module._digests(
        folder)))


def refusal(folder: Path) -> str:
    """The one-line refusal of loading ``folder`` (it must be refused)."""
    with pytest.raises(ModelNotAvailableError) as err:
        ConceptChecker.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert "\n" not in message and "refusing" in message or "pickle" in message, message
    return message


@pytest.mark.parametrize("case", TAMPERED_TABLES)
def test_a_tampered_concept_table_is_refused_in_one_line_naming_the_key(saved, tmp_path, case):
    change, named = TAMPERED_TABLES[case]
    shutil.copytree(saved, tmp_path / "checker")
    edit_json(tmp_path / "checker" / "config.json", change)
    assert re.search(named, refusal(tmp_path / "checker"))


@pytest.mark.parametrize("case", TAMPERED_PROCESSORS)
def test_a_changed_processor_is_refused_in_one_line_naming_the_setting(saved, tmp_path, case):
    change, named = TAMPERED_PROCESSORS[case]
    shutil.copytree(saved, tmp_path / "checker")
    edit_json(tmp_path / "checker" / "feature_extractor" / "preprocessor_config.json", change)
    redigest(tmp_path / "checker")
    assert f"feature extractor: {named} " in refusal(tmp_path / "checker")


LOADED_FILES = ["image_encoder/config.json", "image_encoder/model.safetensors",
                "feature_extractor/preprocessor_config.json", "concepts.safetensors"]


@pytest.mark.parametrize("name", LOADED_FILES)
def test_a_file_changed_after_export_is_refused_by_its_digest(saved, tmp_path, name):
    """One byte more in any file the checker loads, however harmless it looks, is named."""
    shutil.copytree(saved, tmp_path / "checker")
    with open(tmp_path / "checker" / name, "ab") as handle:
        handle.write(b" ")
    assert f"checker/{name} changed after export" in refusal(tmp_path / "checker")


def test_a_file_added_or_removed_after_export_is_refused(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "checker")
    (tmp_path / "checker" / "image_encoder" / "extra.safetensors").write_bytes(b"")
    assert "extra.safetensors was added after export" in refusal(tmp_path / "checker")
    shutil.rmtree(tmp_path / "checker")
    shutil.copytree(saved, tmp_path / "checker")
    edit_json(tmp_path / "checker" / "config.json", lambda t: t.pop("files"))
    assert "files: Field required" in refusal(tmp_path / "checker")


def test_a_key_given_twice_is_refused(saved, tmp_path):
    """JSON's last-one-wins would read a second, hidden cut."""
    shutil.copytree(saved, tmp_path / "checker")
    path = tmp_path / "checker" / "config.json"
    path.write_text(path.read_text().replace('"cut": 0.5,', '"cut": 0.5, "cut": 0.9999,', 1))
    assert "the key 'cut' is given twice" in refusal(tmp_path / "checker")


def set_vector(key, change):
    def apply(folder: Path) -> None:
        vectors = load_file(folder / "concepts.safetensors")
        vectors[key] = change(vectors[key])
        save_file(vectors, folder / "concepts.safetensors")
    return apply


def set_tower(key, value):
    return lambda folder: edit_json(folder / "image_encoder" / "config.json",
                                    lambda c: c.__setitem__(key, value))


def drop_weight(folder: Path) -> None:
    weights = load_file(folder / "image_encoder" / "model.safetensors")
    weights.pop(sorted(weights)[3])
    save_file(weights, folder / "image_encoder" / "model.safetensors")


TAMPERED_BENEATH = {  # digests rewritten too: what the checks beneath must still name
    "a zero t_u (the concept compares with nothing)": (
        set_vector("t_u", lambda v: v * torch.tensor([[0.0], [1.0]])), "t_u has norm 0"),
    "a scaled t_a": (set_vector("t_a", lambda v: 3 * v), "t_a has norm 3"),
    "vectors in float16": (set_vector("t_u", lambda v: v.half()), r"t_u \(torch.float16\) not float32"),
    "a million layers (building would hang)": (
        set_tower("num_hidden_layers", 10**6), "num_hidden_layers is 1000000, but its weights hold"),
    "a wider tower": (set_tower("hidden_size", 192), "config.json does not describe its weights"),
    "a weight removed (left at random)": (drop_weight, "is missing from the weights"),
}


@pytest.mark.parametrize("case", TAMPERED_BENEATH)
def test_a_change_that_keeps_the_digests_is_refused_by_what_it_breaks(saved, tmp_path, case):
    change, named = TAMPERED_BENEATH[case]
    shutil.copytree(saved, tmp_path / "checker")
    change(tmp_path / "checker")
    redigest(tmp_path / "checker")
    started = time.monotonic()
    assert re.search(named, refusal(tmp_path / "checker"))
    assert time.monotonic() - started < 30


def test_a_clip_folder_whose_config_does_not_fit_its_weights_is_refused_fast(tmp_path):
    """The same check guards every CLIP load (EspressoFilter, the pipeline's models)."""
    shutil.copytree(REPO / "data" / "world" / "clip", tmp_path / "clip")
    edit_json(tmp_path / "clip" / "config.json",
              lambda c: c["text_config"].__setitem__("num_hidden_layers", 10**6))
    started = time.monotonic()
    with pytest.raises(ModelNotAvailableError,
                       match=r"text_config\.num_hidden_layers is 1000000, but its weights hold"):
        load_clip(str(tmp_path / "clip"), device="cpu")
    assert time.monotonic() - started < 30


def test_the_untouched_folder_loads(saved):
    """The refusals above are of the changes, not of the folder."""
    assert ConceptChecker.from_pretrained(saved, device="cpu").names == ["zorbo", "mimi"]


def test_a_pickle_only_checker_is_refused_before_unpickling(saved, tmp_path, monkeypatch):
    shutil.copytree(saved, tmp_path / "checker")
    encoder = tmp_path / "checker" / "image_encoder"
    tower = CLIPVisionModelWithProjection.from_pretrained(encoder)
    (encoder / "model.safetensors").unlink()
    torch.save(tower.state_dict(), encoder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was unpickled"))
    assert "pickle weights only (pytorch_model.bin)" in refusal(tmp_path / "checker")


def test_a_screen_of_a_tampered_checker_stops_with_one_line(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "checker")
    edit_json(tmp_path / "checker" / "config.json", set_row("cut", 1.0))
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=r"^error: .*concept_table\.1\.cut: 1\.0.*refusing"):
        screen.main([str(tmp_path / "checker"), str(tmp_path / "a.png"), "--out",
                     str(tmp_path / "out.csv")])
    assert not (tmp_path / "out.csv").exists()


def test_a_checker_with_a_cut_or_scale_that_switches_a_concept_off_cannot_be_built(filters):
    for change in ({"cut": 1.0}, {"cut": 0.0}, {"logit_scale": -1.0}, {"logit_scale": 0}):
        checker = ConceptChecker.from_filters({"zorbo": filters["zorbo"]})
        concept = copy.copy(checker.concepts[0])
        for key, value in change.items():
            setattr(concept, key, value)
        with pytest.raises(ValueError, match=f"concept 'zorbo': {' '.join(change)}".replace(
                "_", " ")):
            ConceptChecker(checker.image_encoder, checker.processor, [concept])


def test_a_calibration_that_saturates_is_refused(filters):
    """Scores of 0.0 (float underflow) would give cut 0, at which the concept always fires."""
    checker = ConceptChecker.from_filters({"zorbo": filters["zorbo"]})
    with pytest.raises(ValueError, match=r"gives cut 0\.0, outside \(0, 1\)"):
        checker.calibrate("zorbo", np.zeros(20), 0.05)
    assert checker.cuts.tolist() == [0.5]


def test_last_result_is_the_calling_threads(checker, images):
    """Threads sharing one checker each read their own call's result, even when every other
    thread has called it since."""
    count = 4
    barrier = threading.Barrier(count)
    pixels = checker.pixel_values(images[:count])
    seen = [None] * count

    def call(i):
        checker(images=torch.zeros(1, 3, 8, 8), clip_input=pixels[i:i + 1])
        barrier.wait()  # every thread has called before any reads
        seen[i] = checker.last_result.p_unacceptable[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = checker.check(images[:count]).p_unacceptable
    assert len({tuple(row) for row in reference}) == count  # distinct answers: the test can fail
    assert np.allclose(np.stack(seen), reference, atol=1e-5)


def test_one_image_that_fails_blocks_only_itself(checker, images, monkeypatch):
    """A chunk on which scoring raises is scored again image by image."""
    original = checker.pixel_values

    def fails_on_wide(batch, value_range=None):
        if any(np.asarray(im).shape[1] > 100 for im in batch):
            raise MemoryError("the resize of a 1 x 200000 image")
        return original(batch, value_range)

    monkeypatch.setattr(checker, "pixel_values", fails_on_wide)
    wide = np.zeros((8, 400, 3), np.uint8)
    result = checker.check([images[0], wide, images[20]])
    assert result.unscored.tolist() == [False, True, False]
    assert "MemoryError" in result.errors[1] and result.blocked[1]
    assert np.allclose(result.p_unacceptable[[0, 2]],
                       checker.check([images[0], images[20]]).p_unacceptable)


# ---- installable without the pipeline -------------------------------------------------------
def distribution_closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, transitively (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a GPU-only dependency): not importable either
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def core_site_packages(folder: Path, core: list[str]) -> set[str]:
    """``folder`` holding links to the top-level modules of the core distributions only."""
    folder.mkdir()
    names = distribution_closure(core)
    for name in names:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists() and ".." not in top:
                (folder / top).symlink_to(source)
    return names


@pytest.mark.slow
def test_the_library_runs_on_the_core_dependencies_alone(checker, images, tmp_path):
    """In an interpreter that can import only the core distributions (and their own
    dependencies), the filter and the checker build, check, save, load and screen; the
    pipeline's packages are absent there."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [r.split(">")[0].split("=")[0].split("<")[0].strip() for r in project["dependencies"]]
    assert {c.lower() for c in core} >= {"torch", "transformers", "safetensors", "numpy",
                                         "pillow"}
    installed = core_site_packages(tmp_path / "site", core)
    assert not installed & {"diffusers", "dvc", "pandas", "scikit-learn", "matplotlib", "scipy"}
    (tmp_path / "img").mkdir()
    for i in range(3):
        PIL.Image.fromarray(images[i * 20]).save(tmp_path / "img" / f"{i}.png")
    script = f"""
import importlib.util, json, sys
for absent in ("diffusers", "dvc", "pandas", "sklearn", "scipy", "matplotlib", "statsmodels"):
    assert importlib.util.find_spec(absent) is None, absent
from pipeline.espresso import ConceptChecker, EspressoFilter
checker = ConceptChecker.from_clip({str(REPO / world.CLIP_DIR)!r},
                                   {{"zorbo": ("Zorbo", "a star"), "mimi": ("Mimi", "a circle")}},
                                   device="cpu")
checker.save_pretrained({str(tmp_path / 'checker')!r})
from pipeline import screen
screen.main([{str(tmp_path / 'checker')!r}, {str(tmp_path / 'img')!r}, "--out",
             {str(tmp_path / 'out.csv')!r}])
try:  # smoothing needs scipy: one line saying how to get it
    screen.main([{str(tmp_path / 'checker')!r}, {str(tmp_path / 'img')!r}, "--out",
                 {str(tmp_path / 'smoothed.csv')!r}, "--smoothing", "0.25"])
except SystemExit as err:
    assert err.code == 2
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO)])
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert {"torch", "transformers", "pipeline"} <= loaded
    assert not loaded & {"diffusers", "dvc", "pandas", "sklearn", "scipy", "matplotlib"}
    with open(tmp_path / "out.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 2
    assert "pip install 'espresso-filter[smoothing]'" in result.stderr
    assert not (tmp_path / "smoothed.csv").exists()
