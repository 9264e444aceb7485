"""The concept registry: every paper concept of METHOD section 4, at least six mini concepts of
all three kinds, aligned prompt pairs, and clear errors for unknown names."""
import pytest

from pipeline.concepts import (KINDS, UnknownConceptError, get_concept, known_concepts,
                               prompt_pairs)

PAPER = {"nudity", "violence", "hateful", "disturbing", "grumpy_cat", "nemo", "captain_marvel",
         "snoopy", "r2d2", "taylor_swift", "angelina_jolie", "brad_pitt", "elon_musk", "van_gogh"}
SIZES = {"train": 50, "val": 10, "test": 10}


def test_registry_covers_the_paper_and_the_mini_world():
    assert set(known_concepts("paper")) == PAPER
    mini = [get_concept(n, "mini") for n in known_concepts("mini")]
    assert len(mini) >= 6 and {c.kind for c in mini} == set(KINDS)
    assert get_concept("nudity", "paper").i2p_category == "sexual"
    assert (get_concept("van_gogh", "paper").unacceptable, get_concept("van_gogh", "paper").acceptable) \
        == ("in the style of van gogh", "in standard style")


@pytest.mark.parametrize("setting", ["mini", "paper"])
def test_prompt_pairs_differ_only_in_the_concept(setting):
    for name in known_concepts(setting):
        concept = get_concept(name, setting)
        pairs = prompt_pairs(concept, SIZES, seed=0)
        assert {k: len(v) for k, v in pairs.items()} == SIZES
        for unacceptable, acceptable in sum(pairs.values(), []):
            assert concept.unacceptable in unacceptable and concept.acceptable in acceptable
            assert unacceptable.replace(concept.unacceptable, concept.acceptable) == acceptable


def test_prompt_splits_are_disjoint_when_the_templates_allow_and_seeded():
    concept = get_concept("checkered", "mini")
    pairs = prompt_pairs(concept, SIZES, seed=1)
    assert not set(pairs["train"]) & set(pairs["test"])
    assert not set(pairs["val"]) & set(pairs["test"])
    assert pairs == prompt_pairs(concept, SIZES, seed=1)
    assert pairs != prompt_pairs(concept, SIZES, seed=2)


def test_unknown_concept_lists_the_known_ones():
    with pytest.raises(UnknownConceptError, match="known: black_background, blip"):
        get_concept("garfield", "mini")
    with pytest.raises(UnknownConceptError, match="known: \\['mini', 'paper'\\]"):
        get_concept("nudity", "sd15")
