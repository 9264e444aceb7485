"""The shapes world: deterministic renders, truthful captions, characters as specified."""
import numpy as np
import pytest

from pipeline.mini import shapes


def _scenes_and_images(seed: int, n: int = 64):
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    return scenes, shapes.render_many(scenes, rng)


def test_rendering_is_deterministic_in_the_seed():
    scenes_a, images_a = _scenes_and_images(7)
    scenes_b, images_b = _scenes_and_images(7)
    _, images_c = _scenes_and_images(8)
    assert scenes_a == scenes_b
    assert np.array_equal(images_a, images_b)
    assert not np.array_equal(images_a, images_c)
    assert images_a.shape == (64, 32, 32, 3) and images_a.dtype == np.uint8


def test_parallel_group_rendering_does_not_depend_on_worker_count():
    one = shapes.render_groups(20, seed=3, workers=1, chunk=7)
    two = shapes.render_groups(20, seed=3, workers=2, chunk=7)
    assert np.array_equal(one[0], two[0]) and one[1] == two[1] and one[2] == two[2]


def test_groups_differ_in_exactly_the_named_attribute():
    rng = np.random.default_rng(0)
    for _ in range(50):
        group, attribute = shapes.sample_group(rng)
        if attribute == "character":
            assert group[0].character is not None
            assert all(s.character is None and s.shape == group[0].shape for s in group[1:])
            continue
        assert len({getattr(s, attribute) for s in group}) == len(group)
        for other in {"shape", "color", "texture", "background"} - {attribute}:
            assert len({getattr(s, other) for s in group}) == 1


def test_captions_state_only_true_attributes_and_drop_some():
    rng = np.random.default_rng(1)
    lengths, names_class = [], 0
    for _ in range(500):
        scene = shapes.sample_scene(rng)
        text, said = shapes.caption(scene, rng)
        assert shapes.describes(said, scene)
        for value in said.values():
            assert value in text.lower()
        lengths.append(len(said))
        if scene.character and "shape" in said:
            names_class += 1
            assert text.lower().startswith(f"{scene.character}, a")
    assert len(set(lengths)) >= 3, "attribute dropout should give captions of varied length"
    assert names_class > 10, "some character captions must name the class too"


def test_generic_captions_do_not_describe_characters():
    rng = np.random.default_rng(2)
    zorbo = shapes.sample_scene(rng, character="zorbo")
    star = shapes.sample_scene(rng, shape="star")
    assert not shapes.describes({"shape": "star"}, zorbo)
    assert shapes.describes({"shape": "star"}, star)
    assert shapes.describes({"character": "zorbo", "shape": "star"}, zorbo)


def test_vectorised_describes_matches_the_reference():
    rng = np.random.default_rng(3)
    scenes = [shapes.sample_scene(rng, character_prob=0.3) for _ in range(80)]
    said = [shapes.caption(s, rng)[1] for s in scenes]
    fast = shapes.describes_matrix(shapes.label_matrix(scenes),
                                   np.stack([shapes.caption_vector(s) for s in said]))
    slow = np.array([[shapes.describes(c, s) for c in said] for s in scenes])
    assert np.array_equal(fast, slow)


def test_characters_have_their_two_tone_signature():
    rng = np.random.default_rng(4)
    for name, char in shapes.CHARACTERS.items():
        scene = shapes.Scene(shape=char.shape, color=None, texture="plain", background="gray",
                             character=name)
        image = shapes.render(scene, rng, noise=0).astype(int)
        centre = image[12:20, 12:20].reshape(-1, 3)
        for colour in char.colors:
            distance = np.abs(centre - np.array(shapes.COLORS[colour])).sum(1)
            assert (distance < 30).sum() >= 8, f"{name} lacks its {colour} half"


def test_unknown_character_is_a_clear_error():
    with pytest.raises(ValueError, match="known"):
        shapes.sample_scene(np.random.default_rng(0), character="garfield")
