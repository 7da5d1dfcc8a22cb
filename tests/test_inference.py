"""inference.py end to end on tiny models: real A1111 embeddings by name, infotext in every PNG, seeds, grid, listing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from utils.generation import GenerationParams, generate, grid_rows
from utils.infotext import parse_infotext, read_infotext
from utils.prompts import EmbeddingDatabase, PromptEncoder

FAST = ["--steps", "2", "--width", "64", "--height", "64"]


def _run(*argv):
    return inference.main([str(a) for a in argv])


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_real_embeddings_render_and_every_png_carries_infotext(tiny_sd1_768, a1111_fixtures, tmp_path):
    from utils.hashes import model_identity

    out = tmp_path / "out"
    prompt = "a bad-hands-5 photo of <birb-style>, by eyeliner2"
    _run("--pretrained_model_name_or_path", tiny_sd1_768, "--embeddings_dir", a1111_fixtures, "--prompt", prompt,
         "--negative_prompt", "EasyNegative", "--seed", 10, "--batch_size", 2, "--grid", "--outdir", out, *FAST)
    assert sorted(p.name for p in out.iterdir()) == ["00000-10.png", "00001-11.png", "grid-0000.png"]
    for name, seed in (("00000-10.png", "10"), ("00001-11.png", "11")):
        p, n, params = parse_infotext(read_infotext(out / name))
        assert (p, n) == (prompt, "EasyNegative")
        assert params["Seed"] == seed and params["Size"] == "64x64" and params["Steps"] == "2"
        assert params["Sampler"] == "Euler a" and params["CFG scale"] == "7"
        assert params["Model hash"] == model_identity(tiny_sd1_768).shorthash
        assert params["Model"] == model_identity(tiny_sd1_768).name
        assert params["TI hashes"] == ("bad-hands-5: 01b60bdcc335, learned_embeds: f2e23a8f2d36, "
                                       "eyeliner2: 0307971abab2, EasyNegative: c74b4e810b03")
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (128, 64)
        assert np.array_equal(np.asarray(grid.convert("RGB"))[:, 64:], _pixels(out / "00001-11.png"))
    assert parse_infotext(read_infotext(out / "grid-0000.png"))[2]["Seed"] == "10"

    # the same seed without the embeddings gives a different picture; with them again, the same one
    plain = tmp_path / "plain"
    _run("--pretrained_model_name_or_path", tiny_sd1_768, "--embeddings_dir", a1111_fixtures, "--prompt",
         "a photo of, by", "--seed", 10, "--outdir", plain, *FAST)
    assert not np.array_equal(_pixels(plain / "00000-10.png"), _pixels(out / "00000-10.png"))
    assert "TI hashes" not in parse_infotext(read_infotext(plain / "00000-10.png"))[2]
    _run("--pretrained_model_name_or_path", tiny_sd1_768, "--embeddings_dir", a1111_fixtures, "--prompt", prompt,
         "--negative_prompt", "EasyNegative", "--seed", 11, "--outdir", plain, *FAST)
    # seed i alone == in batch: the same noise, so the same picture up to float rounding (a batch of 2 runs other
    # matrix kernels than a batch of 1: 1 level in 1 pixel was seen). Another seed changes most pixels by far more.
    alone, in_batch = _pixels(plain / "00001-11.png").astype(int), _pixels(out / "00001-11.png").astype(int)
    assert np.abs(alone - in_batch).max() <= 1 and (alone != in_batch).mean() < 0.01
    assert np.abs(_pixels(out / "00000-10.png").astype(int) - alone).max() > 16  # seed 10 vs 11


def test_list_embeddings(tiny_sd1_768, tiny_sd1, a1111_fixtures, capsys):
    _run("--pretrained_model_name_or_path", tiny_sd1_768, "--embeddings_dir", a1111_fixtures, "--list_embeddings")
    text = capsys.readouterr().out
    assert "Loaded embeddings (8), model text width 768:" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ") and "name" not in line}
    assert rows["bad-hands-5"] == ["2", "768", "1419", "01b60bdcc335"]
    assert rows["rick"] == ["8", "768", "60", "ceb3de409804"]
    assert rows["EasyNegative"] == ["8", "768", "-", "c74b4e810b03"]
    assert rows["learned_embeds"] == ["1", "768", "-", "f2e23a8f2d36"]
    assert "Skipped embeddings (0):" in text and "empty.pt: not a textual inversion embedding" in text

    _run("--pretrained_model_name_or_path", tiny_sd1, "--embeddings_dir", a1111_fixtures, "--list_embeddings")
    text = capsys.readouterr().out
    assert "Loaded embeddings (0), model text width 32:" in text and "Skipped embeddings (8):" in text
    assert "eyeliner2" in text and "768-wide embedding does not fit this model's text width 32" in text


def test_prompt_file_numbering_and_fixed_seed_per_line(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "00007-1.png")  # numbering continues after existing images, as A1111
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n a blue dog \n", encoding="utf-8")
    _run("--pretrained_model_name_or_path", tiny_sd1, "--prompt_file", prompts, "--seed", 5, "--n_iter", 2,
         "--outdir", out, "--sampler", "DPM++ 2M Karras", *FAST)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00007-1.png", "00008-5.png", "00009-6.png", "00010-5.png", "00011-6.png"]
    p, _, params = parse_infotext(read_infotext(out / "00010-5.png"))
    assert p == "a blue dog" and params["Sampler"] == "DPM++ 2M Karras"


def test_user_errors_are_one_line(tiny_sd1, tmp_path, capsys):
    for extra, message in ((["--sampler", "Eulerish"], "unknown sampler 'Eulerish'; valid names: Euler a, Euler"),
                           (["--embeddings_dir", tmp_path / "nope"], "no such folder"),
                           (["--width", "60"], "width must be a positive multiple of 8")):
        with pytest.raises(SystemExit) as e:
            _run("--pretrained_model_name_or_path", tiny_sd1, "--prompt", "x", "--outdir", tmp_path / "o", *FAST,
                 *extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("inference.py: error: ") and message in err
    with pytest.raises(SystemExit):
        _run("--pretrained_model_name_or_path", tiny_sd1, "--outdir", tmp_path / "o")
    assert "give --prompt or --prompt_file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd1_model():
    from utils.models import ModelSource, load_pipeline
    from utils.tiny_models import tiny_model_path

    model = load_pipeline(ModelSource(str(tiny_model_path("sd1"))))
    model.pipeline.set_progress_bar_config(disable=True)
    return model


def test_random_seed_is_recorded_and_reproduces_without_touching_global_rng(sd1_model):
    enc = PromptEncoder(sd1_model.pipeline, EmbeddingDatabase([]))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = generate(sd1_model, enc, GenerationParams("a cat", steps=2, width=64, height=64, seed=-1), progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    seed = int(parse_infotext(first[0].infotext)[2]["Seed"])
    assert seed == first[0].seed and 0 <= seed < 2**32
    again = generate(sd1_model, enc, GenerationParams("a cat", steps=2, width=64, height=64, seed=seed), progress=False)
    assert np.array_equal(np.asarray(first[0].image), np.asarray(again[0].image))


def test_hypernet_tag_applied_kept_in_infotext_and_removed_after(sd1_model, tmp_path):
    from utils.generation import HypernetworkLibrary
    from utils.hypernetwork import Hypernetwork, attention_context_widths, save_hypernetwork

    unet = sd1_model.pipeline.unet
    torch.manual_seed(3)
    hn = Hypernetwork.create("tiny_hn", sorted(attention_context_widths(unet)))
    save_hypernetwork(hn, tmp_path / "tiny_hn.pt")
    enc = PromptEncoder(sd1_model.pipeline)
    processors = dict(unet.attn_processors)
    params = dict(steps=2, width=64, height=64, seed=4)
    lib = HypernetworkLibrary([tmp_path])
    tagged = generate(sd1_model, enc, GenerationParams("a cat <hypernet:tiny_hn:1>", **params), hypernetworks=lib,
                      progress=False)[0]
    assert dict(unet.attn_processors) == processors  # exactly the same processor objects are back
    plain = generate(sd1_model, enc, GenerationParams("a cat", **params), progress=False)[0]
    off = generate(sd1_model, enc, GenerationParams("a cat <hypernet:tiny_hn:0>", **params), hypernetworks=lib,
                   progress=False)[0]
    assert parse_infotext(tagged.infotext)[0] == "a cat <hypernet:tiny_hn:1>"
    assert not np.array_equal(np.asarray(tagged.image), np.asarray(plain.image))
    assert np.array_equal(np.asarray(off.image), np.asarray(plain.image))  # tag text never reached CLIP
    with pytest.raises(Exception, match="not found"):
        generate(sd1_model, enc, GenerationParams("a cat <hypernet:missing>", **params), hypernetworks=lib)


def test_hypernetwork_flags_become_prompt_tags():
    assert inference.hypernetwork_tags(["style", "face:0.5"]) == " <hypernet:style:1> <hypernet:face:0.5>"
    with pytest.raises(Exception, match="multiplier must be a number"):
        inference.hypernetwork_tags(["style:strong"])


def test_grid_rows_like_a1111():
    assert [grid_rows(n) for n in (1, 2, 3, 4, 6, 8, 9, 12)] == [1, 1, 1, 2, 2, 2, 3, 3]


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit):
        inference.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--embeddings_dir", "--prompt_file", "--negative_prompt", "--sampler", "--cfg_scale", "--n_iter",
                 "--grid", "--list_embeddings", "--hypernetwork", "--mixed_precision", "--device"):
        assert flag in text
