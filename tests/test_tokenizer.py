"""The locally built CLIP tokenizer gives the same ids as open_clip's (= OpenAI CLIP's)."""
import open_clip
import pytest

from pipeline.mini.tokenizer import build_clip_tokenizer

STRINGS = [
    "a striped red star on a black background",
    "Zorbo, a star",
    "a photo of Taylor Swift in the style of van gogh",
    "nude, violent, hateful, disturbing!",
    "R2D2 and Snoopy meet Grumpy Cat in 2024...",
    "  multiple   spaces\tand\nnewlines ",
    "it's a dog's life; we're fine",
    "Captain Marvel, a female superhero",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_clip_tokenizer(context_length=77).save_pretrained(folder)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder), open_clip.get_tokenizer("ViT-L-14")


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_open_clip(tokenizers, text):
    ours, reference = tokenizers
    expected = [i for i in reference([text])[0].tolist() if i != 0]  # open_clip pads with 0
    assert ours(text).input_ids == expected
    assert expected[0] == 49406 and expected[-1] == 49407


def test_vocabulary_size_and_padding(tokenizers):
    ours, _ = tokenizers
    assert len(ours) == 49408
    ids = ours("a star", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[-1] == ours.eos_token_id == 49407
