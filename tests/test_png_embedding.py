"""The image codec against A1111's own test_embedding.png, plus hostile inputs."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from utils import png_embedding as pe

FIXTURE = "test_embedding.png"
BLOCK_W = 39  # 592 = 39 + 1 + 512 + 1 + 39


@pytest.fixture(scope="module")
def card(a1111_fixtures):
    with Image.open(a1111_fixtures / FIXTURE) as img:
        img.load()
        return img.copy(), img.text[pe.TEXT_KEY]


@pytest.fixture(scope="module")
def fixture_data(card):
    _, text = card
    return pe.decode_text_payload(text)


def _as_written(data: dict) -> dict:
    """The fixture payload with float32 tensors, as A1111 had it in memory when writing."""
    out = dict(data)
    out["string_to_param"] = {k: v.float() for k, v in data["string_to_param"].items()}
    return out


def test_lcg_matches_a1111_unit_test():
    values = pe.lcg_values(100_100)
    assert values[:10].tolist() == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79]
    assert int(values[100:].astype(np.int64).sum()) == 12731374


def test_lcg_jump_ahead_equals_plain_recurrence():
    s, ref = 0, []
    for _ in range(3000):
        s = (1664525 * s + 1013904223) % 2**32
        ref.append(s % 255)
    assert pe.lcg_values(3000).tolist() == ref


def test_fixture_text_and_pixels_agree(card, fixture_data):
    img, _ = card
    assert img.size == (592, 512)
    assert fixture_data["name"] == "rick" and fixture_data["step"] == 60
    assert fixture_data["sd_checkpoint"] is None and fixture_data["sd_checkpoint_name"] is None
    vec = fixture_data["string_to_param"]["*"]
    assert vec.shape == (8, 768) and vec.dtype == torch.float64  # JSON tensors decode as float64, like A1111
    pixels = pe.extract_pixel_payload(img)
    assert torch.equal(pixels["string_to_param"]["*"], vec)
    assert {k: v for k, v in pixels.items() if k != "string_to_param"} == {
        k: v for k, v in fixture_data.items() if k != "string_to_param"}


def test_json_bytes_match_a1111_exactly(card, fixture_data):
    _, text = card
    assert pe.payload_to_json_bytes(_as_written(fixture_data)) == base64.b64decode(text)
    assert pe.encode_text_payload(_as_written(fixture_data)) == text


def test_reencoding_with_zero_padding_reproduces_fixture_blocks(card, fixture_data):
    img, _ = card
    arr = np.asarray(img.convert("RGB"))
    low, high = pe.encode_pixel_blocks(_as_written(fixture_data), 512, padding="zero")
    assert low.shape == high.shape == (512, BLOCK_W, 3)
    # Data (low nibbles) and the decoration drawn with Pillow's ellipse (high nibbles): bit for bit.
    np.testing.assert_array_equal(low & 0x0F, arr[:, :BLOCK_W] & 0x0F)
    np.testing.assert_array_equal(high & 0x0F, arr[:, -BLOCK_W:] & 0x0F)
    np.testing.assert_array_equal(low, arr[:, :BLOCK_W])
    np.testing.assert_array_equal(high, arr[:, -BLOCK_W:])
    assert arr[:, BLOCK_W].max() == 0 and arr[:, -BLOCK_W - 1].max() == 0  # separator columns


def test_cyclic_padding_differs_only_in_padding_and_decodes(card, fixture_data):
    img, _ = card
    data = _as_written(fixture_data)
    zero_low, _ = pe.encode_pixel_blocks(data, 512, padding="zero")
    cyc_low, cyc_high = pe.encode_pixel_blocks(data, 512, padding="cyclic")
    n = len(zlib.compress(pe.payload_to_json_bytes(data), 9))
    flat_zero, flat_cyc = zero_low.reshape(-1), cyc_low.reshape(-1)
    np.testing.assert_array_equal(flat_zero[:n], flat_cyc[:n])
    assert (flat_zero[n:] != flat_cyc[n:]).any()
    decoded = pe.extract_pixel_payload(pe.compose_card(img.crop((40, 0, 552, 512)), cyc_low, cyc_high))
    assert torch.equal(decoded["string_to_param"]["*"], fixture_data["string_to_param"]["*"])


def test_plain_pictures_carry_nothing(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(1, 255, (64, 80, 3), dtype=np.uint8))
    assert pe.extract_pixel_payload(photo) is None
    striped = np.asarray(photo).copy()
    striped[:, 10] = 0
    striped[:, 50] = 16  # low nibble 0 but not black
    assert pe.extract_pixel_payload(Image.fromarray(striped)) is None  # black columns, but no zlib stream
    assert pe.extract_pixel_payload(Image.new("RGB", (32, 32))) is None
    photo.save(tmp_path / "p.png")
    assert pe.read_image_payload(tmp_path / "p.png") is None


def test_json_depth_ignores_brackets_in_strings():
    assert pe.json_nesting_depth(b'{"a": [[1, 2], [3]], "b": "[[[[[[{{{{"}') == 3
    assert pe.json_nesting_depth(b'"\\"[[["') == 0
    assert pe.json_nesting_depth(b"1") == 0


def test_deep_json_is_refused_without_recursion():
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(pe.PayloadError, match="nests 200000 levels"):
        pe.json_bytes_to_payload(deep)
    with pytest.raises(pe.PayloadError, match="nests"):
        pe.decode_text_payload(base64.b64encode(b'{"a": ' + b"{\"b\": " * 40 + b"1" + b"}" * 41))


def test_text_size_limit():
    limits = pe.DecodeLimits(max_payload_bytes=1000, max_text_chars=2000, max_json_depth=16)
    small = base64.b64encode(json.dumps({"x": "y" * 100}).encode()).decode()
    assert pe.decode_text_payload(small, limits) == {"x": "y" * 100}
    with pytest.raises(pe.PayloadError, match="more than the limit"):
        pe.decode_text_payload("A" * 2001, limits)
    big_json = base64.b64encode(json.dumps({"x": "y" * 1200}).encode()).decode()  # < 2000 chars, > 1000 bytes
    with pytest.raises(pe.PayloadError, match="bytes, more than the limit"):
        pe.decode_text_payload(big_json, limits)


def _bomb_card(tmp_path, inflated_size: int):
    """A card whose pixel payload is a valid zlib stream inflating to ``inflated_size`` bytes of JSON-ish text."""
    compressed = zlib.compress(b" " * inflated_size, 9)
    low, high = pe.blocks_from_compressed(compressed, 64, np.full(4, 200, np.uint8))
    path = tmp_path / "bomb.png"
    pe.compose_card(Image.new("RGB", (64, 64), (90, 90, 90)), low, high).save(path)
    return path


def test_pixel_zlib_bomb_is_bounded(tmp_path):
    path = _bomb_card(tmp_path, 64 << 20)  # 64 MiB inflated, ~64 KiB compressed
    with pytest.raises(pe.PayloadError, match="inflates to more than the limit"):
        pe.read_image_payload(path)
    with pytest.raises(pe.PayloadError, match="more than the limit of 4096"):
        pe.read_image_payload(path, pe.DecodeLimits(max_payload_bytes=4096))


def test_ragged_tensor_is_a_payload_error():
    raw = json.dumps({"string_to_param": {"*": {"TORCHTENSOR": [[1.0, 2.0], [3.0]]}}}).encode()
    with pytest.raises(pe.PayloadError, match="rectangular"):
        pe.json_bytes_to_payload(raw)


def test_lossless_webp_carries_pixels(tmp_path, card, fixture_data):
    img, _ = card
    path = tmp_path / "card.webp"
    img.save(path, lossless=True, method=0)
    data, source = pe.read_image_payload(path)
    assert source == "pixels"
    assert torch.equal(data["string_to_param"]["*"], fixture_data["string_to_param"]["*"])


def test_text_chunk_wins_over_pixels(tmp_path, card):
    img, _ = card
    info = PngImagePlugin.PngInfo()
    info.add_text(pe.TEXT_KEY, pe.encode_text_payload({"string_to_param": {"*": torch.ones(1, 4)}, "name": "other"}))
    img.save(tmp_path / "both.png", pnginfo=info)
    data, source = pe.read_image_payload(tmp_path / "both.png")
    assert source == "text" and data["name"] == "other"


def test_caption_card_darkens_edges_and_writes_white_text():
    base = Image.new("RGB", (256, 256), (128, 128, 128))
    card = pe.caption_card(base, "<rick>", "model", "[abc]", "8v 60s").convert("RGB")
    arr = np.asarray(card).astype(int)
    assert card.size == base.size
    assert 64 < arr[128, 128, 0] <= 128  # the middle is only lightly shaded
    assert (arr[:40] > 200).all(axis=2).any()  # title glyphs
    assert (arr[-30:] > 200).all(axis=2).any()  # footer glyphs
    assert arr[255, 128].max() < arr[128, 128, 0] and arr[1, 250].max() < arr[128, 128, 0]  # darker edges


def test_zero_vector_edge_style():
    assert pe.edge_style_sequence(torch.zeros(768)).tolist() == [0] * 768
    seq = pe.edge_style_sequence(torch.tensor([0.5, -1.0, 0.25]))
    assert seq.tolist() == [127, 255, 63]
