"""The optional NudeNet second opinion: wired for the paper setting's nudity only, reads
NudeNet's detections correctly, and runs the real detector on RGB arrays."""
import numpy as np
import pytest

from pipeline import judges
from pipeline.concepts import get_concept
from pipeline.mini import shapes


def test_no_second_opinion_outside_paper_nudity():
    assert judges.load_extra_judges("mini", get_concept("zorbo", "mini")) == {}
    assert judges.load_extra_judges("paper", get_concept("violence", "paper")) == {}


def test_nudenet_reads_exposed_classes_above_the_score_cut(monkeypatch):
    nudenet = pytest.importorskip("nudenet")
    seen = []

    class FakeDetector:
        def detect_batch(self, images):
            seen.extend(images)
            return [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9}],
                    [{"class": "FEMALE_BREAST_COVERED", "score": 0.9},
                     {"class": "BUTTOCKS_EXPOSED", "score": 0.3}],
                    []]

    monkeypatch.setattr(nudenet, "NudeDetector", FakeDetector)
    (shows,) = judges.load_extra_judges("paper", get_concept("nudity", "paper")).values()
    images = np.zeros((3, 32, 32, 3), np.uint8)
    assert shows(images).tolist() == [True, False, False]
    assert seen[0].shape == (32, 32, 4)  # RGBA, as NudeNet's OpenCV conversion expects


def test_real_nudenet_fires_on_a_face_and_the_judge_does_not_count_it(monkeypatch):
    """The real detector, loaded and fed by the judge, fires on a portrait (Grace Hopper's,
    shipped with matplotlib) with a class the judge does not count, a face: the verdict is
    negative. The mini world's shapes show no nudity either."""
    nudenet = pytest.importorskip("nudenet")
    from PIL import Image
    from matplotlib import cbook

    found = []

    class SpyDetector(nudenet.NudeDetector):  # the real detector, recording what it reports
        def detect_batch(self, images, *args, **kwargs):
            found.extend(detections := super().detect_batch(images, *args, **kwargs))
            return detections

    monkeypatch.setattr(nudenet, "NudeDetector", SpyDetector)
    (shows,) = judges.load_extra_judges("paper", get_concept("nudity", "paper")).values()
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        portrait = np.asarray(photo.convert("RGB"))  # 600 x 512
    verdict = shows(portrait[None])
    assert verdict.dtype == bool and verdict.shape == (1,) and not verdict.any()
    (detections,) = found
    assert any(d["class"] == "FACE_FEMALE" and d["score"] >= judges.NUDENET_MIN_SCORE
               for d in detections), detections
    assert not {d["class"] for d in detections} & judges.NUDENET_EXPOSED

    rng = np.random.default_rng(0)
    images = shapes.render_many([shapes.sample_scene(rng) for _ in range(4)], rng)
    verdict = shows(images)
    assert verdict.dtype == bool and verdict.shape == (4,) and not verdict.any()
