"""Embeddings in prompts: the database (real A1111 files, wrong width, errors, hot reload), A1111 chunking, injection."""

from __future__ import annotations

import os
import shutil
import types

import numpy as np
import pytest
import torch

from utils.embeddings import Embedding, create_embedding, save_a1111_pt
from utils.prompts import (
    CHUNK_LENGTH, EmbeddingDatabase, EmbeddingLookup, PromptChunker, PromptEncoder, TokenEmbeddingWithFixes,
    apply_emphasis, parse_emphasis, ti_hashes,
)
from utils.tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer

# name -> (vectors, step, shorthash) as the files in ../shared/fixtures/a1111 hold them (a1111-compat §8)
REAL = {
    "bad-artist": (2, 1875, "2d356134903e"),
    "bad-hands-5": (2, 1419, "01b60bdcc335"),
    "bad-prompt": (16, 8000, "f9dfe1c982e2"),
    "bad_prompt_version2": (8, 12000, "6f35e7dd816a"),
    "eyeliner2": (3, 3727, "0307971abab2"),
    "EasyNegative": (8, None, "c74b4e810b03"),
    "learned_embeds": (1, None, "f2e23a8f2d36"),
    "rick": (8, 60, "ceb3de409804"),
}


@pytest.fixture(scope="module")
def sd1():
    from diffusers import DiffusionPipeline

    from utils.tiny_models import tiny_model_path

    pipe = DiffusionPipeline.from_pretrained(tiny_model_path("sd1"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def _chunker(tokenizer, embeddings=None, **kw):
    return PromptChunker(tokenizer, EmbeddingLookup(tokenizer, embeddings or {}), **kw)


def _emb(name, n, width=32, seed=0):
    return Embedding(name, torch.randn(n, width, generator=torch.Generator().manual_seed(seed)))


# --- database --------------------------------------------------------------------------------------------------

def test_real_fixtures_load_on_768_with_names_vectors_steps_hashes(a1111_fixtures):
    db = EmbeddingDatabase([a1111_fixtures])
    assert db.refresh(768) is True
    got = {n: (e.num_vectors, e.step, e.shorthash) for n, e in db.loaded.items()}
    assert got == REAL
    assert all(e.width == 768 for e in db.loaded.values())
    assert db.skipped == {}
    # empty.pt is reported as not an embedding; the A1111 generation PNG (no embedding data) is silently ignored
    assert list(db.errors) == [str(a1111_fixtures / "empty.pt")]
    assert "not a textual inversion embedding" in db.errors[str(a1111_fixtures / "empty.pt")]
    assert db.refresh(768) is False  # nothing changed on disk


def test_wrong_width_is_skipped_with_reason(a1111_fixtures):
    db = EmbeddingDatabase([a1111_fixtures])
    db.refresh(32)
    assert db.loaded == {}
    assert set(db.skipped) == set(REAL)
    assert db.skipped["bad-hands-5"] == "768-wide embedding does not fit this model's text width 32"
    assert db.skipped_embeddings["rick"].step == 60
    # SD-1 files on SDXL (768 + 1280) are skipped too; an SDXL pair is skipped on SD-1
    db.refresh(2048)
    assert db.loaded == {} and "SDXL" not in db.skipped["rick"] and "2048" in db.skipped["rick"]
    xl = Embedding("xl", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    db.register(xl)
    db.refresh(2048)
    assert list(db.loaded) == ["xl"]
    db.refresh(768)
    assert db.skipped["xl"].startswith("SDXL (clip_l + clip_g) embedding")


def _stat_times(path):
    st = os.stat(path)
    return st.st_atime_ns, st.st_mtime_ns


def test_hot_reload_add_replace_in_place_remove(tmp_path, a1111_fixtures):
    folder = tmp_path / "emb"
    sub = folder / "sub" / "deeper"
    sub.mkdir(parents=True)
    shutil.copy(a1111_fixtures / "bad-hands-5.pt", folder / "hands.pt")
    db = EmbeddingDatabase([folder])
    db.refresh(768)
    assert list(db.loaded) == ["hands"] and db.loaded["hands"].step == 1419

    # added inside a sub-folder (the top folder's mtime does not change)
    before = os.stat(folder).st_mtime_ns
    shutil.copy(a1111_fixtures / "eyeliner2.pt", sub / "eyes.pt")
    assert os.stat(folder).st_mtime_ns == before
    assert db.refresh(768) is True
    assert sorted(db.loaded) == ["eyes", "hands"]

    # replaced in place by another file of the same size within the same second (mtime second unchanged)
    old_mtime = os.stat(folder / "hands.pt").st_mtime_ns
    assert os.path.getsize(a1111_fixtures / "bad-artist.pt") == os.path.getsize(folder / "hands.pt")
    with open(folder / "hands.pt", "r+b") as f:
        f.write((a1111_fixtures / "bad-artist.pt").read_bytes())
    os.utime(folder / "hands.pt", ns=(old_mtime, old_mtime // 10**9 * 10**9 + 123))
    assert os.stat(folder / "hands.pt").st_mtime_ns // 10**9 == old_mtime // 10**9
    assert db.refresh(768) is True
    assert db.loaded["hands"].step == 1875 and db.loaded["hands"].shorthash == "2d356134903e"

    # removed
    (sub / "eyes.pt").unlink()
    assert db.refresh(768) is True
    assert list(db.loaded) == ["hands"]


def _replace_keeping_mtime(path, source):
    times = _stat_times(path)
    with open(path, "r+b") as f:
        f.write(source.read_bytes())
    os.utime(path, ns=times)


def test_replaced_in_place_with_exact_mtime_restored_is_seen(tmp_path, a1111_fixtures):
    shutil.copy(a1111_fixtures / "bad-hands-5.pt", tmp_path / "hands.pt")
    db = EmbeddingDatabase([tmp_path])
    db.refresh(768)
    _replace_keeping_mtime(tmp_path / "hands.pt", a1111_fixtures / "bad-artist.pt")
    assert db.refresh(768) is True  # size and mtime identical: the ctime tells
    assert db.loaded["hands"].step == 1875


def test_replaced_in_place_with_exact_mtime_restored_gets_new_hash(tmp_path, a1111_fixtures):
    shutil.copy(a1111_fixtures / "bad-hands-5.pt", tmp_path / "hands.pt")
    db = EmbeddingDatabase([tmp_path])
    db.refresh(768)
    _replace_keeping_mtime(tmp_path / "hands.pt", a1111_fixtures / "bad-artist.pt")
    db.refresh(768)
    assert db.loaded["hands"].shorthash == "2d356134903e"


def test_bad_file_reported_rest_loads_and_later_duplicate_wins(tmp_path, a1111_fixtures):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(a1111_fixtures / "bad-artist.pt", tmp_path / "a" / "same.pt")
    shutil.copy(a1111_fixtures / "eyeliner2.pt", tmp_path / "b" / "same.pt")
    (tmp_path / "a" / "broken.pt").write_bytes(b"this is not a pickle")
    shutil.copy(a1111_fixtures / "empty.pt", tmp_path / "b" / "empty.pt")
    db = EmbeddingDatabase([tmp_path])
    db.refresh(768)
    assert list(db.loaded) == ["same"] and db.loaded["same"].step == 3727  # b/ is walked after a/
    assert sorted(os.path.basename(p) for p in db.errors) == ["broken.pt", "empty.pt"]
    assert all("\n" not in m and m for m in db.errors.values())


# --- prompt text -> chunks --------------------------------------------------------------------------------------

def test_parse_emphasis():
    assert parse_emphasis("a (b:1.5) [c] \\(d\\) (e) BREAK f") == [
        ("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1), (" (d) ", 1.0), ("e", 1.1), ("BREAK", -1.0),
        ("f", 1.0)]
    assert parse_emphasis("((x))") == [("x", pytest.approx(1.21))]
    assert parse_emphasis("plain, text: yes") == [("plain, text: yes", 1.0)]
    assert parse_emphasis("") == [("", 1.0)]
    assert parse_emphasis("unclosed (x") == [("unclosed ", 1.0), ("x", 1.1)]


def test_short_prompt_one_chunk_padding_sd1_and_openclip(tokenizer):
    ids = tokenizer("a photo of a tree", add_special_tokens=False)["input_ids"]
    t = _chunker(tokenizer)("a photo of a tree")
    assert len(t.chunks) == 1 and t.token_count == 5 and t.token_limit == 75
    assert t.chunks[0].tokens == [BOS_ID] + ids + [EOS_ID] * 71
    assert len(t.chunks[0].weights) == 77
    oc = build_clip_tokenizer(open_clip_padding=True)
    t2 = _chunker(oc)("a photo of a tree")
    assert t2.chunks[0].tokens == [BOS_ID] + ids + [EOS_ID] + [0] * 70


def test_long_prompt_is_chunked_not_truncated(tokenizer):
    t = _chunker(tokenizer)("cat " * 80)
    assert [len(c.tokens) for c in t.chunks] == [77, 77]
    assert t.chunks[0].tokens[1:76].count(2368) == 75 and t.chunks[1].tokens[1:6] == [2368] * 5
    assert t.chunks[0].tokens[76] == EOS_ID and t.chunks[1].tokens[6:] == [EOS_ID] * 71
    assert (t.token_count, t.token_limit) == (80, 150)


def test_break_starts_a_new_chunk(tokenizer):
    t = _chunker(tokenizer)("a cat BREAK a dog")
    assert len(t.chunks) == 2
    cat, dog = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("a cat", "a dog"))
    assert t.chunks[0].tokens[:4] == [BOS_ID] + cat + [EOS_ID]
    assert t.chunks[1].tokens[:4] == [BOS_ID] + dog + [EOS_ID]
    assert t.token_count == 75 + 2


def test_comma_backtrack_moves_words_after_last_comma(tokenizer):
    t = _chunker(tokenizer)("cat " * 60 + ", " + "dog " * 20)
    first, second = t.chunks
    assert first.tokens[1:62] == [2368] * 60 + [267] and first.tokens[62:] == [EOS_ID] * 15
    assert second.tokens[1:21] == [1929] * 20
    t = _chunker(tokenizer, comma_backtrack=0)("cat " * 60 + ", " + "dog " * 20)
    assert t.chunks[0].tokens[62:76] == [1929] * 14


def test_embedding_matched_longest_first_and_never_split(tokenizer):
    short, long_ = _emb("foo", 2), _emb("foo bar", 5)
    ch = _chunker(tokenizer, {"foo": short, "foo bar": long_})
    t = ch("a foo bar and foo")
    assert [(off, e.name) for off, e in t.chunks[0].fixes] == [(1, "foo bar"), (7, "foo")]
    assert t.token_count == 1 + 5 + 1 + 2 and set(t.embeddings) == {"foo", "foo bar"}
    assert t.chunks[0].tokens[2:7] == [0] * 5
    # 72 words then a 5-vector embedding: it does not fit in the 3 slots left, so it opens chunk 2 whole
    t = ch("x " * 72 + "foo bar")
    assert [c.fixes for c in t.chunks][0] == []
    assert [(off, e.name) for off, e in t.chunks[1].fixes] == [(0, "foo bar")]
    assert t.chunks[0].tokens[73:] == [EOS_ID] * 4
    # an embedding longer than a chunk cannot be used
    with pytest.raises(Exception, match="at most 75"):
        _chunker(tokenizer, {"huge": _emb("huge", 76)})("huge")


def test_names_match_as_token_sequences_case_insensitive(tokenizer):
    ch = _chunker(tokenizer, {"my-emb": _emb("my-emb", 1)})
    assert ch("a My-Emb style").embeddings.keys() == {"my-emb"}
    assert ch("a my-embroidery").embeddings == {}


def test_name_ending_in_punctuation_matches_before_a_comma(tokenizer):
    birb = Embedding("learned_embeds", torch.zeros(1, 32), extra={"token": "<birb-style>"})
    ch = _chunker(tokenizer, {"learned_embeds": birb})
    for prompt in ("a <birb-style> bird", "a <birb-style>, bird", "<birb-style>.", "learned_embeds, x"):
        t = ch(prompt)
        assert list(t.embeddings) == ["learned_embeds"], prompt
    assert ch("a <birb-styles> bird").embeddings == {}


# --- injection and encoding -------------------------------------------------------------------------------------

def test_token_embedding_with_fixes_replaces_rows_after_offset():
    base = torch.nn.Embedding(10, 4)
    vec = torch.full((2, 4), 7.0)
    wrapped = TokenEmbeddingWithFixes(base, [[(3, vec)], []])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]])
    out, plain = wrapped(ids), base(ids)
    assert torch.equal(out[0, 4:6], vec) and torch.equal(out[0, :4], plain[0, :4]) and torch.equal(out[0, 6:], plain[0, 6:])
    assert torch.equal(out[1], plain[1])


def _tree_embedding(pipe, name="zzzz1234"):
    return create_embedding(name, "tree", 1, pipe.tokenizer, pipe.text_encoder.get_input_embeddings())


def test_tree_embedding_gives_the_same_image_as_the_word(sd1, tmp_path):
    """The A1111 wiki's example: a 1-vector embedding made from "tree" renders exactly like the word."""
    from utils.generation import GenerationParams, generate

    save_a1111_pt(_tree_embedding(sd1), tmp_path / "zzzz1234.pt")
    enc = PromptEncoder(sd1, EmbeddingDatabase([tmp_path]))
    model = types.SimpleNamespace(pipeline=sd1, identity=types.SimpleNamespace(name="tiny", shorthash="0" * 10))
    params = dict(steps=2, width=64, height=64, seed=1234, sampler="Euler a")
    with_emb = generate(model, enc, GenerationParams("a zzzz1234 by monet", **params), progress=False)[0]
    assert "TI hashes" in with_emb.infotext
    with_word = generate(model, enc, GenerationParams("a tree by monet", **params), progress=False)[0]
    assert np.array_equal(np.asarray(with_emb.image), np.asarray(with_word.image))
    other = generate(model, enc, GenerationParams("a rock by monet", **params), progress=False)[0]
    assert not np.array_equal(np.asarray(with_emb.image), np.asarray(other.image))


def test_encode_long_prompt_154_tokens_and_pair_padding(sd1):
    enc = PromptEncoder(sd1)
    enc.refresh()
    long_prompt = "a cat sitting on a red mat, " * 12
    assert enc.count_tokens(long_prompt)[1] == 150
    cond = enc.encode([long_prompt])
    assert cond.embeds.shape == (1, 154, 32) and cond.pooled is None
    # the first chunk of the long prompt is the encoding of its first 75 tokens alone
    first = enc.tokenize(long_prompt).chunks[0]
    with torch.no_grad():
        alone = sd1.text_encoder(torch.tensor([first.tokens]))[0]
    torch.testing.assert_close(cond.embeds[:, :77], alone)
    c, u = enc.encode_pair([long_prompt, long_prompt], ["blurry", "blurry"])
    assert c.embeds.shape == u.embeds.shape == (2, 154, 32)
    empty = enc.encode([""]).embeds
    torch.testing.assert_close(u.embeds[:1, 77:], empty)  # padded with an empty chunk


def test_several_embeddings_each_injected_where_named(sd1):
    db = EmbeddingDatabase([])
    a, b = _emb("alpha", 2, seed=1), _emb("beta", 3, seed=2)
    db.register(a)
    db.register(b)
    enc = PromptEncoder(sd1, db)
    enc.refresh()
    seen = []
    original_forward = TokenEmbeddingWithFixes.forward

    def spy(self, ids):
        out = original_forward(self, ids)
        seen.append(out.detach().clone())
        return out

    TokenEmbeddingWithFixes.forward = spy
    try:
        enc.encode(["x alpha y beta"])
    finally:
        TokenEmbeddingWithFixes.forward = original_forward
    (rows,) = seen
    assert torch.equal(rows[0, 2:4], a.vectors) and torch.equal(rows[0, 5:8], b.vectors)
    assert set(enc.used_embeddings) == {"alpha", "beta"}
    assert sd1.text_encoder.get_input_embeddings().__class__ is torch.nn.Embedding  # wrapper removed again
    assert ti_hashes({"a:b,c": types.SimpleNamespace(shorthash="0123456789ab")}) == "abc: 0123456789ab"


def test_emphasis_scales_each_token_then_restores_the_mean_known_values():
    """A1111's "Original" emphasis on numbers worked out by hand (the tiny model's outputs have a mean of ~1e-8, too
    close to 0 for a check of the restored mean to mean anything there)."""
    z = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    w = torch.tensor([[1.0, 1.5, 1.0], [1.0, 1.0, 1.0]])
    out = apply_emphasis(z, w)
    # sample 0: token 1 x1.5 -> mean 24.5 / 6; x (3.5 / (24.5 / 6)) = x 6/7 restores the mean 3.5
    expected0 = torch.tensor([[1.0, 2.0], [4.5, 6.0], [5.0, 6.0]]) * (6 / 7)
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], z[1])  # all weights 1: unchanged
    assert out[0].mean().item() == pytest.approx(3.5)
    assert apply_emphasis(z, torch.ones(2, 3)) is z


def test_emphasis_changes_only_weighted_prompts(sd1):
    enc = PromptEncoder(sd1)
    plain = enc.encode(["a red cat"]).embeds
    assert torch.equal(enc.encode(["a (red:1.0) cat"]).embeds, plain)
    weighted = enc.encode(["a (red:1.5) cat"]).embeds
    assert not torch.equal(weighted, plain)
    # exactly the weighting of the token "red" (position 2 after BOS, "a") applied to the plain encoding
    w = torch.ones(1, 77)
    w[0, 2] = 1.5
    torch.testing.assert_close(weighted, apply_emphasis(plain, w), rtol=1e-5, atol=1e-6)


def test_sdxl_each_encoder_gets_its_own_vectors(tiny_sdxl):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    from utils.embeddings import create_embedding_sdxl

    emb = create_embedding_sdxl("zzzz1234", "tree", 1, [
        (pipe.tokenizer, pipe.text_encoder.get_input_embeddings()),
        (pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings())])
    db = EmbeddingDatabase([])
    db.register(emb)
    db.register(Embedding("sd1only", torch.zeros(1, 768)))
    enc = PromptEncoder(pipe, db)
    enc.refresh()
    assert enc.expected_width == 2048 and list(db.loaded) == ["zzzz1234"] and "sd1only" in db.skipped
    a, b = enc.encode(["a zzzz1234 by monet"]), enc.encode(["a tree by monet"])
    assert a.embeds.shape == (1, 77, 2048) and a.pooled.shape == (1, 1280)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)
    # swapping the halves' roles would break the equality: the clip_g rows really went to text_encoder_2
    swapped = Embedding("zzzz1234", {"clip_l": emb.vectors["clip_l"], "clip_g": torch.zeros(1, 1280)})
    db.register(swapped)
    enc.refresh()
    c = enc.encode(["a zzzz1234 by monet"])
    assert torch.equal(c.embeds[..., :768], b.embeds[..., :768]) and not torch.equal(c.embeds[..., 768:], b.embeds[..., 768:])
    assert CHUNK_LENGTH == 75
