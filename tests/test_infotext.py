"""Infotext (A1111 PNG "parameters"): formatting rules, parsing a real A1111 image, round trips, PNG chunks."""

from __future__ import annotations

from PIL import Image

from utils.infotext import format_infotext, parse_infotext, parse_size, read_infotext, save_png

FIXTURE_TEXT = ("A photo of a cute cat wearing sunglasses relaxing on a beach\nSteps: 20, Sampler: DPM++ 2M Karras, "
                "CFG scale: 10, Seed: 2623256163, Size: 768x768, Model hash: 2c02b20a, Clip skip: 2, ENSD: 31337")


def test_parse_real_a1111_png(a1111_fixtures):
    text = read_infotext(a1111_fixtures / "00006-2623256163.png")
    assert text == FIXTURE_TEXT
    prompt, negative, params = parse_infotext(text)
    assert prompt == "A photo of a cute cat wearing sunglasses relaxing on a beach"
    assert negative == ""
    assert params == {"Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "10", "Seed": "2623256163",
                      "Size": "768x768", "Model hash": "2c02b20a", "Clip skip": "2", "ENSD": "31337"}
    assert parse_size(params["Size"]) == (768, 768)
    # and writing it back gives the very same text A1111 wrote
    assert format_infotext(prompt, negative, params) == text


def test_format_rules_quote_bare_none_and_order():
    params = {"Model": "tiny:v1", "TI hashes": "bad-hands-5: 01b60bdcc335, rick: ceb3de409804", "Seed": 7,
              "Steps": 4, "Size": "64x64", "Sampler": "Euler a", "CFG scale": 7.5, "Hires": None, "Tiling": "Tiling",
              "Version": "embedforge", "Model hash": "0123456789"}
    text = format_infotext("a cat", "ugly, blurry", params)
    assert text == ('a cat\nNegative prompt: ugly, blurry\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 7, '
                    'Size: 64x64, Model hash: 0123456789, Model: "tiny:v1", Tiling, '
                    'TI hashes: "bad-hands-5: 01b60bdcc335, rick: ceb3de409804", Version: embedforge')
    prompt, negative, back = parse_infotext(text)
    assert (prompt, negative) == ("a cat", "ugly, blurry")
    assert back["TI hashes"] == "bad-hands-5: 01b60bdcc335, rick: ceb3de409804"
    assert back["Model"] == "tiny:v1" and back["Tiling"] == "Tiling" and "Hires" not in back


def test_round_trip_multiline_unicode_and_quotes():
    prompt = "line one, with comma\nline two: ünïcödé 猫"
    negative = 'bad "quoted" thing\nsecond line'
    params = {"Steps": "3", "Sampler": "DDIM", "Seed": "1", "Note": 'has "quotes", commas\nand newline', "ENSD": "1"}
    text = format_infotext(prompt, negative, params)
    assert parse_infotext(text) == (prompt, negative, params)
    assert format_infotext(*parse_infotext(text)) == text


def test_unknown_keys_keep_their_place():
    params = {"Steps": "20", "Custom": "x", "Seed": "1", "Size": "8x8"}
    assert format_infotext("p", "", params).splitlines()[-1] == "Steps: 20, Custom: x, Seed: 1, Size: 8x8"


def test_prompt_only_text_has_no_params():
    assert parse_infotext("just a prompt, with commas") == ("just a prompt, with commas", "", {})


def test_save_png_text_chunks(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    latin = format_infotext("a cat", "", {"Steps": 2, "Sampler": "Euler", "Seed": 3})
    save_png(img, tmp_path / "a.png", latin)
    uni = format_infotext("猫 cat", "", {"Steps": 2, "Sampler": "Euler", "Seed": 3})
    save_png(img, tmp_path / "b.png", uni)
    raw_a, raw_b = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert b"tEXtparameters\x00" in raw_a and b"iTXt" not in raw_a
    assert b"iTXtparameters\x00" in raw_b
    assert read_infotext(tmp_path / "a.png") == latin
    assert read_infotext(tmp_path / "b.png") == uni
    with Image.open(tmp_path / "a.png") as back:
        assert back.getpixel((3, 3)) == (10, 20, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left behind
