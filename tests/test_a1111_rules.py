"""A1111's rules at their exact boundaries, where an off-by-one (< for <=, > for >=) hides from ordinary inputs.

Prompt chunks hold 75 tokens; an embedding is never split; a full chunk moves the words after its last comma when that
comma is at most 20 tokens back; training's placeholder is cut the same way; a picture is split when its aspect ratio
is at or below the threshold; a .txt caption beats the caption made from the file name.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from utils.embeddings import Embedding
from utils.prompts import CHUNK_LENGTH, COMMA_BACKTRACK, EmbeddingLookup, PromptChunker
from utils.textual_inversion import tokenize_with_placeholder
from utils.tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer

CAT, DOG, BIRD, COMMA, X = 2368, 1929, 3329, 267, 343


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def _emb(name: str, n: int) -> Embedding:
    return Embedding(name, torch.randn(n, 32, generator=torch.Generator().manual_seed(n)))


def _chunks(tokenizer, prompt: str, embeddings=None):
    return PromptChunker(tokenizer, EmbeddingLookup(tokenizer, embeddings or {}))(prompt)


def test_token_ids_used_below(tokenizer):
    ids = tokenizer("cat dog bird , x", add_special_tokens=False).input_ids
    assert ids == [CAT, DOG, BIRD, COMMA, X] and (CHUNK_LENGTH, COMMA_BACKTRACK) == (75, 20)


def test_an_embedding_of_75_vectors_fills_one_chunk(tokenizer):
    t = _chunks(tokenizer, "big", {"big": _emb("big", 75)})
    assert len(t.chunks) == 1 and t.token_count == 75 and t.token_limit == 75
    assert [(off, e.name) for off, e in t.chunks[0].fixes] == [(0, "big")]
    assert t.chunks[0].tokens == [BOS_ID] + [0] * 75 + [EOS_ID]
    with pytest.raises(Exception, match="at most 75"):
        _chunks(tokenizer, "huge", {"huge": _emb("huge", 76)})


def test_an_embedding_that_exactly_fills_the_rest_of_a_chunk_stays_in_it(tokenizer):
    emb = _emb("five", 5)
    t = _chunks(tokenizer, "cat " * 70 + "five dog", {"five": emb})
    first, second = t.chunks
    assert [(off, e.name) for off, e in first.fixes] == [(70, "five")]
    assert first.tokens[1:71] == [CAT] * 70 and first.tokens[71:76] == [0] * 5 and first.tokens[76] == EOS_ID
    assert second.fixes == [] and second.tokens[1] == DOG
    # one more word before it and it no longer fits: the whole embedding opens chunk 2
    t = _chunks(tokenizer, "cat " * 71 + "five", {"five": emb})
    assert t.chunks[0].fixes == [] and t.chunks[0].tokens[72:] == [EOS_ID] * 5
    assert [(off, e.name) for off, e in t.chunks[1].fixes] == [(0, "five")]


def test_the_last_comma_exactly_20_tokens_back_moves_the_words_after_it(tokenizer):
    # 55 cats, a comma at index 55, 19 dogs: the chunk is full (75) when "bird" comes; 75 - 55 = 20 <= 20
    t = _chunks(tokenizer, "cat " * 55 + ", " + "dog " * 19 + "bird")
    first, second = t.chunks
    assert first.tokens[1:57] == [CAT] * 55 + [COMMA] and first.tokens[57:] == [EOS_ID] * 20
    assert second.tokens[1:21] == [DOG] * 19 + [BIRD] and second.tokens[21] == EOS_ID
    assert t.token_count == 75 + 20


def test_a_comma_21_tokens_back_moves_nothing(tokenizer):
    t = _chunks(tokenizer, "cat " * 54 + ", " + "dog " * 20 + "bird")
    first, second = t.chunks
    assert first.tokens[1:76] == [CAT] * 54 + [COMMA] + [DOG] * 20
    assert second.tokens[1:3] == [BIRD, EOS_ID]


def test_72_words_and_a_3_vector_placeholder_fill_one_chunk_in_training_and_inference(tokenizer):
    prompt = "x " * 72 + "my-emb"
    ids = tokenize_with_placeholder(tokenizer, [prompt], "my-emb", 3)[0].tolist()
    assert ids[:73] == [BOS_ID] + [X] * 72 and ids[73:76] == [-1, -2, -3] and ids[76] == EOS_ID
    t = _chunks(tokenizer, prompt, {"my-emb": _emb("my-emb", 3)})
    assert len(t.chunks) == 1 and [(off, e.name) for off, e in t.chunks[0].fixes] == [(72, "my-emb")]
    assert t.token_count == 75
    # 73 words: the placeholder no longer fits; training drops it whole rather than cutting it
    ids = tokenize_with_placeholder(tokenizer, ["x " * 73 + "my-emb"], "my-emb", 3)[0].tolist()
    assert ids == [BOS_ID] + [X] * 73 + [EOS_ID] * 3


def test_a_2_to_1_picture_is_split_at_the_default_threshold():
    from utils.crops import CropConfig, SplitConfig, make_outputs, should_split, split_ratio

    assert split_ratio(128, 64, 64, 64) == 0.5 and SplitConfig().threshold == 0.5
    assert should_split(128, 64, 64, 64, 0.5) and should_split(64, 128, 64, 64, 0.5)
    assert not should_split(126, 64, 64, 64, 0.5)  # ratio 0.508: kept whole
    picture = Image.new("RGB", (128, 64), (200, 10, 10))
    out = make_outputs(picture, CropConfig(width=64, height=64, split=SplitConfig()))
    assert [im.size for im in out.images] == [(64, 64)] * 3  # tiles at 0, 32, 64 (overlap 0.2)


def test_a_txt_caption_wins_over_the_filename_regex(tmp_path):
    from utils.data import DataConfig, scan_dataset

    for stem in ("00001-red_cat", "00002-blue_dog"):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{stem}.png")
    (tmp_path / "00001-red_cat.txt").write_text("a painting of a lion\n", encoding="utf-8")
    cfg = DataConfig(train_data_dir=str(tmp_path), resolution=64, filename_word_regex=r"[a-z]+",
                     filename_join_string=" and ")
    captions = {e.path.rsplit("/", 1)[-1]: e.caption for e in scan_dataset(cfg).examples}
    assert captions == {"00001-red_cat.png": "a painting of a lion", "00002-blue_dog.png": "blue and dog"}
