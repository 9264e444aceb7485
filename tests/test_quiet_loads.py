"""Loading the shipped models prints no library noise: no transformers "LOAD REPORT" (unexpected
or missing keys) and no diffusers "Expected types for ..." warning about a component's class.

Each load runs twice: as shipped, and with the loaders' own quieting switched off and the
libraries at their default verbosity (warnings on), so that a cause hidden by the quieting (a
checkpoint with keys the model does not use, a component of another class) still fails here.
"""
import contextlib
import logging
from pathlib import Path

import diffusers
import pytest
import transformers

from pipeline.espresso import ConceptChecker, EspressoFilter, load_clip
from pipeline.espresso import models
from pipeline.espresso.t2i import load_t2i
from pipeline.mini.judge import Judge

DATA = Path(__file__).resolve().parents[1] / "data"
CHECKER, WORLD = DATA / "checker", DATA / "world"
NOISE = ("LOAD REPORT", "Expected types for", "UNEXPECTED", "MISSING")


@pytest.fixture(params=["as shipped", "library warnings on"])
def loud(request, monkeypatch):
    if request.param == "library warnings on":
        monkeypatch.setattr(models, "quiet_libraries",
                            lambda verbosity=logging.ERROR: contextlib.nullcontext())
        logs = (transformers.utils.logging, diffusers.utils.logging)
        levels = [log.get_verbosity() for log in logs]
        for log in logs:
            log.set_verbosity_warning()
        yield
        for log, level in zip(logs, levels):
            log.set_verbosity(level)
    else:
        yield


def assert_quiet(capfd, caplog):
    out, err = capfd.readouterr()
    printed = out + err + caplog.text
    assert not [word for word in NOISE if word in printed], printed


def test_loading_the_shipped_checker_prints_no_load_report(loud, capfd, caplog):
    checker = ConceptChecker.from_pretrained(CHECKER, device="cpu")
    assert checker.names
    assert_quiet(capfd, caplog)


def test_loading_the_mini_clip_and_a_filter_prints_no_load_report(loud, capfd, caplog):
    clip, _, _ = load_clip(str(WORLD / "clip"), device="cpu")
    EspressoFilter.from_clip(str(WORLD / "clip"), "Zorbo", "a star", device="cpu")
    for folder in (WORLD / "judge", WORLD / "eyes"):
        Judge.load(str(folder))
    assert clip.config.projection_dim
    assert_quiet(capfd, caplog)


def test_loading_the_mini_sd_with_the_checker_prints_no_warning(loud, capfd, caplog):
    """The mini SD's text encoder folder is the whole mini CLIP (a link): only its text tower
    is read. The checker joins the pipeline as its safety checker without a type warning."""
    pipe = load_t2i(str(WORLD / "sd"), device="cpu")
    checker = ConceptChecker.from_pretrained(CHECKER, device="cpu")
    pipe.safety_checker, pipe.feature_extractor = checker, checker.processor
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert_quiet(capfd, caplog)
