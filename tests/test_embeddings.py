"""Reading every embedding format A1111 reads, safely; writing ours; creating new embeddings
(docs/a1111-rules.md, "Embedding files")."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from utils import png_embedding
from utils.embeddings import (
    Embedding,
    EmbeddingError,
    checksum,
    create_embedding,
    create_embedding_sdxl,
    list_embedding_files,
    load_diffusers_sdxl_pair,
    load_embedding,
    resolve_format,
    sanitize_name,
    save_a1111_pt,
    save_diffusers,
    save_diffusers_sdxl,
    save_embedding,
    save_kohya,
    save_png_card,
)
from utils.errors import UserError

# file -> (name, vectors, width, step, sd_checkpoint, sd_checkpoint_name, sha256, checksum, format)
KNOWN = {
    "bad-artist.pt": ("bad-artist", 2, 768, 1875, "7ab762a7", "blossom-extract",
                      "2d356134903e8f47bf6cf519bdf577cdcee42fc717ef264498162e94f130843a", "2a38", "a1111"),
    "bad-hands-5.pt": ("bad-hands-5", 2, 768, 1419, "5d2f8777af", "7th7-any3",
                       "01b60bdcc335d0cff652ee8aaedbd93bdc7f043ba5f2f255f2d134ec419834c7", "c854", "a1111"),
    "bad-prompt.pt": ("bad-prompt", 16, 768, 8000, "74906b9a", "Novel50WD50",
                      "f9dfe1c982e2a1917054fa827ee1f981c6e6102984f981c691e4f8c817e292cb", "1d99", "a1111"),
    "bad_prompt_version2.pt": ("bad_prompt_version2", 8, 768, 12000, "74906b9a", "Novel50WD50",
                               "6f35e7dd816ae04bb3f774a9a17ebfbc50c0e3a53f69a9a40bed05936d3a3812", "afea", "a1111"),
    "eyeliner2.pt": ("eyeliner2", 3, 768, 3727, "27a4ac756c", "SD15NewVAEpruned",
                     "0307971abab2748d19abce1dedaf20908c139c8ad668aacef3e2be82b27d3a1b", "c31b", "a1111"),
    "learned_embeds.bin": ("learned_embeds", 1, 768, None, None, None,
                           "f2e23a8f2d3628ed77acb8151751ecd4efc4017e8da86bc29af10f855ca308d9", "7e9c", "diffusers"),
    "EasyNegative.safetensors": ("EasyNegative", 8, 768, None, None, None,
                                 "c74b4e810b030f6b75fde959e2db678c268d07115b85356d3c0138ba5eb42340", "119b", "kohya"),
    "test_embedding.png": ("rick", 8, 768, 60, None, None,
                           "ceb3de4098040013be6ce7169b0c0e67c2de86a8cfb43d02b16013f6af2d352e", "b59e", "png-text"),
}


def _sd_emb(n=3, width=16, seed=0, name="myemb", **kw) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    return Embedding(name=name, vectors=torch.randn(n, width, generator=g), **kw)


def _sdxl_emb(n=2, name="xlemb", **kw) -> Embedding:
    g = torch.Generator().manual_seed(1)
    return Embedding(name=name, vectors={"clip_l": torch.randn(n, 768, generator=g),
                                         "clip_g": torch.randn(n, 1280, generator=g)}, **kw)


def _assert_same(a: Embedding, b: Embedding, metadata: bool = True) -> None:
    assert a.is_sdxl == b.is_sdxl
    if a.is_sdxl:
        for k in ("clip_l", "clip_g"):
            assert torch.equal(a.vectors[k], b.vectors[k])
    else:
        assert torch.equal(a.vectors, b.vectors)
    if metadata:
        assert (a.name, a.step, a.sd_checkpoint, a.sd_checkpoint_name) == (
            b.name, b.step, b.sd_checkpoint, b.sd_checkpoint_name)


# ---------------------------------------------------------------------------------------------------------------------
# Reading real files


@pytest.mark.parametrize("filename", sorted(KNOWN))
def test_real_fixtures(a1111_fixtures, filename):
    name, n, width, step, ckpt, ckpt_name, sha, check, fmt = KNOWN[filename]
    emb = load_embedding(a1111_fixtures / filename)
    assert (emb.name, emb.num_vectors, emb.width, emb.step) == (name, n, width, step)
    assert (emb.sd_checkpoint, emb.sd_checkpoint_name) == (ckpt, ckpt_name)
    assert emb.sha256 == sha and emb.shorthash == sha[:12]
    assert checksum(emb) == check
    assert emb.format == fmt
    assert emb.filename == str(a1111_fixtures / filename)
    # Saved from a training GPU with requires_grad: handed out as plain CPU float32.
    assert emb.vectors.device.type == "cpu" and emb.vectors.dtype == torch.float32
    assert not emb.vectors.requires_grad


def test_stem_wins_over_stored_name_for_pt(a1111_fixtures):
    emb = load_embedding(a1111_fixtures / "bad-prompt.pt")
    assert emb.name == "bad-prompt" and emb.extra["stored_name"] == "bad_prompt"


def test_stored_name_wins_for_images(a1111_fixtures, tmp_path):
    shutil.copy(a1111_fixtures / "test_embedding.png", tmp_path / "renamed.png")
    assert load_embedding(tmp_path / "renamed.png").name == "rick"


def test_diffusers_concept_one_dim_vector(a1111_fixtures):
    emb = load_embedding(a1111_fixtures / "learned_embeds.bin")
    raw = torch.load(a1111_fixtures / "learned_embeds.bin", weights_only=True)["<birb-style>"]
    assert emb.vectors.shape == (1, 768) and torch.equal(emb.vectors[0], raw)
    assert emb.extra["token"] == "<birb-style>"


def test_png_pixels_match_text(a1111_fixtures, tmp_path):
    with Image.open(a1111_fixtures / "test_embedding.png") as img:
        img.convert("RGB").save(tmp_path / "no_text.png")  # drops the text chunk
    by_pixels = load_embedding(tmp_path / "no_text.png")
    by_text = load_embedding(a1111_fixtures / "test_embedding.png")
    assert by_pixels.format == "png-pixels"
    _assert_same(by_pixels, by_text)


def test_files_a1111_ignores(a1111_fixtures, tmp_path):
    shutil.copy(a1111_fixtures / "test_embedding.png", tmp_path / "rick.preview.png")
    (tmp_path / "zero.pt").write_bytes(b"")
    shutil.copy(a1111_fixtures / "bad-artist.pt", tmp_path / "bad-artist.ckpt")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "picture.webp", lossless=True)
    assert load_embedding(tmp_path / "rick.preview.png") is None
    assert load_embedding(tmp_path / "zero.pt") is None
    assert load_embedding(tmp_path / "bad-artist.ckpt") is None
    assert load_embedding(tmp_path / "picture.webp") is None
    assert load_embedding(a1111_fixtures / "00006-2623256163.png") is None  # generated image, infotext only


def _one_line_error(path, match):
    with pytest.raises(EmbeddingError) as err:
        load_embedding(path)
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "\n" not in msg and str(path) in msg
    assert match in msg, msg
    return msg


def test_not_embeddings_raise_one_line_errors(a1111_fixtures, tmp_path):
    _one_line_error(a1111_fixtures / "empty.pt", "not a textual inversion embedding")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk that is not a pickle")
    _one_line_error(tmp_path / "junk.pt", "not a readable torch file")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _one_line_error(tmp_path / "junk.safetensors", "not a readable safetensors file")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _one_line_error(tmp_path / "junk.png", "not a readable image")
    torch.save({"a": torch.ones(2, 4), "b": torch.ones(2, 4)}, tmp_path / "two.bin")
    _one_line_error(tmp_path / "two.bin", "has 2 tensors")
    torch.save({"string_to_param": {"*": torch.ones(1, 4), "x": torch.ones(1, 4)}}, tmp_path / "terms.pt")
    _one_line_error(tmp_path / "terms.pt", "2 terms")
    torch.save({"string_to_param": {"*": torch.ones(2, 3, 4)}}, tmp_path / "cube.pt")
    _one_line_error(tmp_path / "cube.pt", "shape [2, 3, 4]")
    torch.save(torch.ones(3), tmp_path / "bare.pt")
    _one_line_error(tmp_path / "bare.pt", "holds a Tensor")
    save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(3, 1280)}, tmp_path / "mismatch.safetensors")
    _one_line_error(tmp_path / "mismatch.safetensors", "clip_l has 2 vectors but clip_g has 3")


class _Evil:
    """Unpickling this would create a marker file: a stand-in for arbitrary code in a downloaded .pt."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    for i, payload in enumerate([
        {"string_to_param": {"*": _Evil(str(marker))}, "name": "x"},
        {"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, 4))}),
         "x": _Evil(str(marker))},
    ]):
        path = tmp_path / f"evil{i}.pt"
        torch.save(payload, path)
        msg = _one_line_error(path, "refused to load")
        assert "open" in msg  # the refused global is named
        assert not marker.exists()


def test_original_repo_parameterdict_variant(tmp_path):
    vec = torch.randn(2, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, tmp_path / "orig.pt")
    emb = load_embedding(tmp_path / "orig.pt")
    assert emb.format == "a1111-parameterdict" and emb.name == "orig"
    assert torch.equal(emb.vectors, vec) and not emb.vectors.requires_grad and emb.step is None


def test_fp16_files_are_upcast(tmp_path):
    vec = torch.randn(4, 1024).half()
    torch.save({"string_to_param": {"*": vec}, "step": 7}, tmp_path / "half.pt")
    save_file({"emb_params": vec}, tmp_path / "half.safetensors")
    for f in ("half.pt", "half.safetensors"):
        emb = load_embedding(tmp_path / f)
        assert emb.vectors.dtype == torch.float32 and torch.equal(emb.vectors, vec.float())
        assert emb.width == 1024


def test_sdxl_kohya_file(tmp_path):
    src = _sdxl_emb(n=3)
    save_file({k: v.half() for k, v in src.vectors.items()}, tmp_path / "xl.safetensors")
    emb = load_embedding(tmp_path / "xl.safetensors")
    assert emb.is_sdxl and emb.num_vectors == 3 and emb.width == 2048 and emb.format == "kohya-sdxl"
    assert emb.vectors["clip_g"].dtype == torch.float32
    assert len(checksum(emb)) == 4


def test_hostile_images_raise_named_errors(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    def card_with_text(name: str, text: str) -> Path:
        info = PngImagePlugin.PngInfo()
        info.add_text(png_embedding.TEXT_KEY, text)
        Image.new("RGB", (8, 8), (50, 50, 50)).save(tmp_path / name, pnginfo=info)
        return tmp_path / name

    _one_line_error(card_with_text("garbage.png", "W" * 101), "broken embedding in image")
    deep = card_with_text("deep.png", base64.b64encode(b"[" * 50_000 + b"]" * 50_000).decode())
    _one_line_error(deep, "nests 50000 levels")
    monkeypatch.setattr(png_embedding, "DEFAULT_LIMITS", png_embedding.DecodeLimits(max_text_chars=1000))
    _one_line_error(deep, "more than the limit of 1000")


def test_checksum_rule_on_small_values():
    # flatten, *100 in float32, truncate toward zero, r = (r*281 ^ v*997) & 0xffffffff, low 16 bits
    vec = torch.tensor([[0.0155, -0.029, 1.0]])
    r = 0
    for v in (1, -2, 100):
        r = ((r * 281) ^ (v * 997)) & 0xFFFFFFFF
    assert checksum(vec) == f"{r & 0xFFFF:04x}"
    with pytest.raises(EmbeddingError, match="non-finite"):
        checksum(torch.tensor([[float("nan")]]))


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def test_a1111_pt_layout(tmp_path):
    src = _sd_emb(n=2, width=768, name="mine", step=12, sd_checkpoint="abcdef0123", sd_checkpoint_name="model")
    src.vectors.requires_grad_(True)
    save_a1111_pt(src, tmp_path / "mine.pt")
    raw = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert list(raw) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"]
    assert raw["string_to_token"] == {"*": 265}
    assert list(raw["string_to_param"]) == ["*"]
    t = raw["string_to_param"]["*"]
    assert t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
    assert torch.equal(t, src.vectors.detach())
    assert (raw["name"], raw["step"], raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == (
        "mine", 12, "abcdef0123", "model")


@pytest.mark.parametrize("filename,fmt,expect_format", [
    ("e.pt", None, "a1111"),
    ("e.safetensors", None, "diffusers"),
    ("e.bin", None, "diffusers"),
    ("e.safetensors", "kohya", "kohya"),
    ("e.png", None, "png-text"),
])
def test_round_trip_sd(tmp_path, filename, fmt, expect_format):
    src = _sd_emb(n=4, width=768, name="e", step=99, sd_checkpoint="0123456789", sd_checkpoint_name="sd15")
    written = save_embedding(src, tmp_path / filename, fmt)
    back = load_embedding(written)
    assert back.format == expect_format
    if filename.endswith(".bin"):  # a {token: tensor} pickle has no room for metadata (one key only)
        _assert_same(src, back, metadata=False)
        assert back.name == "e" and back.step is None
    else:
        _assert_same(src, back)
    assert back.sha256 and checksum(back) == checksum(src)


def test_round_trip_without_metadata(tmp_path):
    src = _sd_emb(n=1, width=1024, name="plain")
    for f in ("plain.pt", "plain.safetensors", "plain.png"):
        _assert_same(src, load_embedding(save_embedding(src, tmp_path / f)))


def test_diffusers_file_layout(tmp_path):
    src = _sd_emb(n=2, name="cat")
    save_diffusers(src, tmp_path / "learned_embeds.safetensors")
    raw = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(raw) == ["<cat>"] and torch.equal(raw["<cat>"], src.vectors)
    save_diffusers(src, tmp_path / "other.safetensors", token="cat-token")
    assert list(load_file(tmp_path / "other.safetensors")) == ["cat-token"]
    # the token survives a diffusers -> diffusers conversion
    again = load_embedding(tmp_path / "other.safetensors")
    save_embedding(again, tmp_path / "again.safetensors")
    assert list(load_file(tmp_path / "again.safetensors")) == ["cat-token"]


def test_kohya_layouts(tmp_path):
    save_kohya(_sd_emb(), tmp_path / "k.safetensors")
    assert list(load_file(tmp_path / "k.safetensors")) == ["emb_params"]
    xl = _sdxl_emb(step=5)
    save_embedding(xl, tmp_path / "xlemb.safetensors")  # SDXL .safetensors defaults to kohya clip_l/clip_g
    raw = load_file(tmp_path / "xlemb.safetensors")
    assert sorted(raw) == ["clip_g", "clip_l"] and raw["clip_l"].shape == (2, 768) and raw["clip_g"].shape == (2, 1280)
    back = load_embedding(tmp_path / "xlemb.safetensors")
    assert back.format == "kohya-sdxl"
    _assert_same(xl, back)


def test_diffusers_sdxl_two_files_round_trip(tmp_path):
    xl = _sdxl_emb(name="web")
    first, second = save_diffusers_sdxl(xl, tmp_path / "learned_embeds.safetensors")
    assert second.name == "learned_embeds_2.safetensors"
    assert list(load_file(first)) == ["<web>"] and load_file(first)["<web>"].shape == (2, 768)
    assert load_file(second)["<web>"].shape == (2, 1280)
    joined = load_diffusers_sdxl_pair(second, first)  # either order
    assert joined.name == "web" and joined.format == "diffusers-sdxl"
    _assert_same(xl, joined)


def test_png_card_contains_both_payloads(tmp_path):
    src = _sd_emb(n=3, width=768, name="card", step=5, sd_checkpoint="1234567890", sd_checkpoint_name="m")
    picture = Image.new("RGB", (96, 64), (20, 120, 220))
    for padding in ("cyclic", "zero"):
        path = save_png_card(src, tmp_path / f"{padding}.png", picture, padding=padding)
        with Image.open(path) as img:
            img.load()
            assert img.mode == "RGB" and img.height == 64
            text = png_embedding.decode_text_payload(img.text[png_embedding.TEXT_KEY])
            pixels = png_embedding.extract_pixel_payload(img)
        assert list(text) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                              "sd_checkpoint_name"]
        assert torch.equal(text["string_to_param"]["*"].float(), src.vectors)
        assert torch.equal(pixels["string_to_param"]["*"], text["string_to_param"]["*"])
        assert pixels["name"] == text["name"] == "card"
        _assert_same(src, load_embedding(path))


def test_save_refusals(tmp_path):
    src, xl = _sd_emb(), _sdxl_emb()
    (tmp_path / "exists.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="already exists"):
        save_embedding(src, tmp_path / "exists.pt", overwrite=False)
    assert (tmp_path / "exists.pt").read_bytes() == b"x"
    with pytest.raises(EmbeddingError, match="SDXL"):
        save_embedding(xl, tmp_path / "xl.pt")
    with pytest.raises(EmbeddingError, match="SD-1/SD-2 embeddings only"):
        save_embedding(xl, tmp_path / "xl.png")
    with pytest.raises(EmbeddingError, match="cannot be written"):
        save_embedding(src, tmp_path / "e.pt", fmt="kohya")
    with pytest.raises(EmbeddingError, match="extension"):
        save_embedding(src, tmp_path / "e.txt")
    with pytest.raises(EmbeddingError, match="needs an SDXL"):
        save_embedding(src, tmp_path / "e.safetensors", fmt="diffusers-sdxl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pt"]  # nothing half-written left behind
    assert resolve_format(xl, "a.safetensors") == "kohya" and resolve_format(src, "a.safetensors") == "diffusers"


def test_diffusers_pipeline_loads_our_file(tmp_path, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    src = _sd_emb(n=3, width=width, name="toy")
    save_embedding(src, tmp_path / "learned_embeds.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1", "<toy>_2"])
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert all(i >= 49408 for i in ids)
    assert torch.equal(table[ids], src.vectors)
    # The prompt word expands to the three tokens.
    assert pipe.maybe_convert_prompt("a <toy> cat", pipe.tokenizer) == "a <toy> <toy>_1 <toy>_2 cat"


# ---------------------------------------------------------------------------------------------------------------------
# Creating


@pytest.fixture(scope="module")
def clip_tokenizers():
    from utils.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(False), build_clip_tokenizer(True)


@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    return torch.nn.Embedding(49408, 8)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text,n,rows", [
    ("a photo", 5, [0, 0, 0, 1, 1]),
    ("a photo of a cat", 8, [0, 0, 1, 1, 2, 3, 3, 4]),
    ("cat", 3, [0, 0, 0]),
])
def test_init_tokens_are_stretched(clip_tokenizers, table, text, n, rows):
    tok = clip_tokenizers[0]
    ids = _ids(tok, text)
    emb = create_embedding("new", text, n, tok, table)
    assert emb.step == 0 and emb.sd_checkpoint is None and emb.num_vectors == n
    assert torch.equal(emb.vectors, table.weight.detach()[[ids[r] for r in rows]])


def test_sd1_keeps_at_most_n_tokens_sd2_subsamples(clip_tokenizers, table):
    sd1, sd2 = clip_tokenizers
    text = "a photo of a cat"
    ids = _ids(sd1, text)
    assert len(ids) == 5
    assert torch.equal(create_embedding("x", text, 2, sd1, table).vectors, table.weight.detach()[ids[:2]])
    # OpenCLIP: all 5 tokens, rows floor(i*5/2) = 0, 2
    assert torch.equal(create_embedding("x", text, 2, sd2, table).vectors, table.weight.detach()[[ids[0], ids[2]]])


def test_empty_init_gives_zeros_and_bad_inputs_fail(clip_tokenizers, table):
    tok = clip_tokenizers[0]
    assert torch.equal(create_embedding("z", "", 4, tok, table).vectors, torch.zeros(4, 8))
    with pytest.raises(UserError, match="no tokens"):
        create_embedding("z", "   ", 1, tok, table)
    for bad in (0, 76, 2.5):
        with pytest.raises(UserError, match=r"1\.\.75"):
            create_embedding("z", "cat", bad, tok, table)
    assert create_embedding("z", "cat", 75, tok, table).num_vectors == 75


def test_name_sanitising():
    assert sanitize_name("my/emb*?na:me v2.1_x-y") == "myembname v2.1_x-y"
    assert sanitize_name("café") == "café"
    for bad in ("///", "", " .. "):
        with pytest.raises(UserError):
            sanitize_name(bad)


def test_create_sdxl(clip_tokenizers, table):
    g_table = torch.nn.Embedding(49408, 12)
    tok_l, tok_g = clip_tokenizers
    emb = create_embedding_sdxl("x/l", "a photo of a cat", 2, [(tok_l, table), (tok_g, g_table)])
    ids = _ids(tok_l, "a photo of a cat")[:2]
    assert emb.name == "xl" and emb.is_sdxl and emb.width == 20
    assert torch.equal(emb.vectors["clip_l"], table.weight.detach()[ids])
    assert torch.equal(emb.vectors["clip_g"], g_table.weight.detach()[ids])


# ---------------------------------------------------------------------------------------------------------------------
# Listing


def test_list_embedding_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.pt", "b.PNG", "notes.txt", "sub/c.safetensors", "sub/deeper/d.bin", "sub/e.webp", ".x.123.tmp.pt"):
        (tmp_path / rel).write_bytes(b"")
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "deeper" / "loop")  # a cycle must not hang the walk
    found = [p.relative_to(tmp_path).as_posix() for p in list_embedding_files(tmp_path)]
    assert found == ["a.pt", "b.PNG", "sub/c.safetensors", "sub/e.webp", "sub/deeper/d.bin"]
    assert [p.name for p in list_embedding_files(tmp_path, recursive=False)] == ["a.pt", "b.PNG"]
    linked = tmp_path.parent / f"{tmp_path.name}_link"
    os.symlink(tmp_path / "sub", linked)
    try:
        assert sorted(p.name for p in list_embedding_files(linked)) == ["c.safetensors", "d.bin", "e.webp"]
    finally:
        linked.unlink()


def test_embedding_database_style_scan(a1111_fixtures):
    loaded = {}
    errors = []
    for path in list_embedding_files(a1111_fixtures):
        try:
            emb = load_embedding(path)
        except EmbeddingError as e:
            errors.append(Path(path).name)
            continue
        if emb is not None:
            loaded[emb.name] = emb
    assert sorted(loaded) == sorted(v[0] for v in KNOWN.values())
    assert errors == ["empty.pt"]
