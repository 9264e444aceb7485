"""The concept registry: every paper concept of METHOD section 4, at least six mini concepts of
all three kinds, aligned prompt pairs, and clear errors for unknown names."""
import pytest

from pipeline.concepts import (SPLITS, UnknownConceptError, get_concept, known_concepts,
                               pair_pool, prompt_pairs, split_sizes)
from pipeline.generate import images_per_prompt
from pipeline.mini import shapes
from pipeline.params import load_params
from pipeline.schema import KINDS, Splits

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


@pytest.mark.parametrize("setting", ["mini", pytest.param("paper", marks=pytest.mark.slow)])
def test_prompt_pairs_differ_only_in_the_concept(setting):
    for name in known_concepts(setting):
        concept = get_concept(name, setting)
        pairs = prompt_pairs(concept, SIZES, seed=0)
        assert {k: len(v) for k, v in pairs.items()} == split_sizes(SIZES, len(pair_pool(concept)))
        for unacceptable, acceptable in sum(pairs.values(), []):
            assert concept.unacceptable in unacceptable and concept.acceptable in acceptable
            assert unacceptable.replace(concept.unacceptable, concept.acceptable) == acceptable


@pytest.mark.parametrize("setting", ["mini", "paper"])
def test_train_val_and_test_share_no_sentence_for_any_concept(setting):
    generate = load_params().generate
    for name in known_concepts(setting):
        pairs = prompt_pairs(get_concept(name, setting), generate.prompts.model_dump(),
                             generate.seed)
        sentences = {split: {s for pair in pairs[split] for s in pair} for split in SPLITS}
        for split in SPLITS:
            assert len(sentences[split]) == 2 * len(pairs[split]) > 0, (name, split)
        assert not sentences["train"] & sentences["val"], name
        assert not sentences["train"] & sentences["test"], name
        assert not sentences["val"] & sentences["test"], name


def test_every_mini_concept_has_a_dozen_pairs_in_the_worlds_own_language():
    words = set(shapes.language())
    for name in known_concepts("mini"):
        pool = pair_pool(get_concept(name, "mini"))
        assert len(pool) >= 12, name
        for sentence in {s for pair in pool for s in pair}:
            assert set(sentence.replace(",", " ,").split()) <= words, sentence
    assert len(pair_pool(get_concept("zorbo", "mini"))) == 1 + 4 * len(shapes.BACKGROUND_WORDINGS)


def test_a_small_pool_gives_a_quarter_to_val_and_test_and_keeps_the_image_count():
    asked = {"train": 100, "val": 16, "test": 16}
    assert split_sizes(asked, 17) == {"train": 9, "val": 4, "test": 4}
    assert split_sizes(asked, 500) == asked
    p = load_params().generate.model_copy(update={
        "prompts": Splits(**asked), "images_per_prompt": Splits(train=1, val=4, test=8)})
    assert images_per_prompt(p, "test", 4) == 32          # 16 x 8 = 128 images either way
    assert images_per_prompt(p, "train", 9) == 12         # 100 asked -> 108
    with pytest.raises(ValueError, match="at least 3"):
        split_sizes(asked, 2)


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


def _names_text(prompt: str, text: str) -> bool:
    """``text`` appears in ``prompt`` as whole words (case aside)."""
    import re

    return re.search(rf"(?<!\w){re.escape(text.casefold())}(?!\w)", prompt.casefold()) is not None


@pytest.mark.parametrize("setting", ["mini", "paper"])
def test_everyday_prompts_name_no_concept_text(setting):
    from pipeline.concepts import everyday_prompts, names_concept

    concepts = [get_concept(n, setting) for n in known_concepts(setting)]
    for chosen in [[c] for c in concepts] + [concepts]:  # one stage's concept; a whole checker
        prompts = everyday_prompts(chosen, 12, seed=7)
        assert len(prompts) == len(set(prompts)) == 12
        for prompt in prompts:
            for c in chosen:
                assert not names_concept(prompt, c), (prompt, c.name)
                assert not _names_text(prompt, c.unacceptable), (prompt, c.name)
                assert not _names_text(prompt, c.acceptable), (prompt, c.name)
    assert everyday_prompts(concepts, 12, seed=7) == prompts  # seeded
    assert everyday_prompts(concepts, 12, seed=8) != prompts


def test_everyday_prompts_of_the_mini_world_are_its_own_language():
    from pipeline.concepts import everyday_prompts

    words = set(shapes.language())
    for prompt in everyday_prompts([get_concept("zorbo", "mini")], 12, seed=7):
        assert set(prompt.replace(",", " , ").split()) <= words, prompt


def test_an_everyday_prompts_twin_is_the_same_caption_with_the_concept_in_it():
    """Mini: the twin of an attribute concept changes that attribute's word alone; a
    character's twin is the character on the prompt's background; no texture on a character."""
    from pipeline.concepts import everyday_draw, everyday_prompts, names_concept

    concepts = [get_concept(n, "mini") for n in ("zorbo", "checkered", "black_background")]
    draw = everyday_draw(concepts, 200, seed=7)  # Blips, Krolls and Mimis among them
    assert [p.text for p in draw[:12]] == everyday_prompts(concepts, 12, seed=7)
    words = set(shapes.language())
    for prompt in draw:
        character = prompt.text.split(",")[0].split()[0].lower() in shapes.CHARACTERS
        for c in concepts:
            twin = prompt.in_context[c.name]
            head, value = next(iter(c.shows.items()))
            if character and head == "texture":
                assert twin is None
                continue
            assert names_concept(twin, c) and set(twin.replace(",", " , ").split()) <= words
            background = prompt.text.split()[-2]
            if head == "character":
                assert twin.startswith(c.unacceptable) and twin.split()[-2] == background
            else:  # one word differs: the prompt's attribute value -> the concept's
                changed = [(a, b) for a, b in zip(prompt.text.split(), twin.split()) if a != b]
                assert len(twin.split()) == len(prompt.text.split()) and len(changed) == 1
                assert changed[0][1] == value, (prompt.text, twin)
    assert any(p.in_context["checkered"] is None for p in draw)  # characters were drawn


def test_a_paper_twin_fills_the_concepts_template_with_the_prompts_slots():
    from pipeline.concepts import everyday_draw

    concepts = [get_concept(n, "paper") for n in ("grumpy_cat", "violence", "van_gogh")]
    twins = {p.text: p.in_context for p in everyday_draw(concepts, 40, seed=3)}
    known = {"a watercolor of a harbour on a beach": {
        "grumpy_cat": "a watercolor of grumpy cat on a beach",    # medium + place: 2 slots
        "violence": "a violent watercolor of a harbour on a beach",
        "van_gogh": "a watercolor of a harbour on a beach in the style of van gogh"},
        "a photo of a sunflower field": {
        "grumpy_cat": "a photo of grumpy cat",                     # no slot in common
        "violence": "a violent photo of a sunflower field",       # subject <- thing
        "van_gogh": None}}                                         # each needs a medium
    everyday = {p.text: p.in_context for p in everyday_draw(concepts, 10**3, seed=3)
                if p.text in known}
    assert everyday == known
    assert all(t is None or "{" not in t for twin in twins.values() for t in twin.values())


def test_too_few_everyday_prompts_say_how_many_there_are():
    from pipeline.concepts import everyday_prompts

    with pytest.raises(ValueError, match=r"only \d+ distinct everyday prompts.*lower "
                                         r"everyday\.prompts"):
        everyday_prompts([get_concept("nudity", "paper")], 10**6, seed=0)
