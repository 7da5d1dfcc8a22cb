"""utils/crops.py on generated pictures: A1111's split rule, flips, auto-sized choice, focal point, the per-source recipe."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils.crops import (
    AutosizeConfig,
    CropConfig,
    FocalConfig,
    SplitConfig,
    aspect_error,
    autosized_crop,
    autosized_size,
    crop_and_resize,
    entropy_point,
    flipped_copies,
    focal_crop,
    focal_point,
    haar_cascades_available,
    haar_face_points,
    make_outputs,
    should_split,
    split_oversized,
    split_ratio,
    tile_offsets,
)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def no_faces(img, model):
    return []


# ---------------------------------------------------------------------------------------------------- split


def test_tile_offsets_follow_a1111_rule():
    # count = ceil((192 - 64*0.2) / (64*0.8)) = ceil(3.5) = 4; offsets int(i * 128 / 3)
    assert tile_offsets(192, 64, 0.2) == [0, 42, 85, 128]
    # count = ceil((320 - 25.6) / 102.4) = 3; offsets int(i * 192 / 2)
    assert tile_offsets(320, 128, 0.2) == [0, 96, 192]
    # no overlap: ceil(300 / 100) = 3 tiles, last flush with the end
    assert tile_offsets(300, 100, 0.0) == [0, 100, 200]
    assert tile_offsets(64, 64, 0.2) == [0]  # one tile: no division by zero


def test_split_ratio_and_threshold():
    assert split_ratio(200, 600, 64, 64) == pytest.approx(1 / 3)  # portrait
    assert split_ratio(300, 200, 64, 64) == pytest.approx(2 / 3)  # landscape
    assert split_ratio(100, 100, 64, 128) == pytest.approx(0.5)  # square picture, tall target: too wide
    assert should_split(200, 600, 64, 64, 0.5)
    assert not should_split(300, 200, 64, 64, 0.5)
    assert should_split(300, 200, 64, 64, 0.7)
    assert not should_split(64, 64, 64, 64, 1.0)  # ratio 1 is never split
    assert SplitConfig(threshold=3, overlap=0.95).overlap == 0.9  # A1111's slider clamps
    assert SplitConfig(threshold=3).threshold == 1.0


def test_split_portrait_tiles_are_crops_at_a1111_offsets():
    img = noise(200, 600)
    tiles = split_oversized(img, 64, 64, 0.2)
    scaled = img.resize((64, 192), Image.Resampling.LANCZOS)  # width -> 64, height 600*64//200
    assert len(tiles) == 4
    for tile, y in zip(tiles, [0, 42, 85, 128]):
        assert tile.size == (64, 64)
        assert np.array_equal(np.asarray(tile), np.asarray(scaled.crop((0, y, 64, y + 64))))


def test_split_landscape_non_square_target():
    img = noise(1000, 200, seed=1)
    assert should_split(1000, 200, 128, 64, 0.5)  # ratio (200*128)/(1000*64) = 0.4
    tiles = split_oversized(img, 128, 64, 0.2)
    scaled = img.resize((320, 64), Image.Resampling.LANCZOS)  # height -> 64, width 1000*64//200
    assert [t.size for t in tiles] == [(128, 64)] * 3
    for tile, x in zip(tiles, [0, 96, 192]):
        assert np.array_equal(np.asarray(tile), np.asarray(scaled.crop((x, 0, x + 128, 64))))


# ---------------------------------------------------------------------------------------------------- flips / resize


def test_flips_mirror_pixels():
    img = noise(24, 16, seed=2)
    a = np.asarray(img)
    h, v, both = flipped_copies(img, ("horizontal", "vertical", "both"))
    assert np.array_equal(np.asarray(h), a[:, ::-1])
    assert np.array_equal(np.asarray(v), a[::-1, :])
    assert np.array_equal(np.asarray(both), a[::-1, ::-1])
    with pytest.raises(ValueError):
        flipped_copies(img, ("diagonal",))


def test_crop_and_resize_covers_and_keeps_the_centre():
    # Red channel = x; 200x100 -> scale to 128x64 and keep columns 32..96, i.e. source x 50..150.
    x = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    img = Image.fromarray(np.stack([x, np.zeros_like(x), np.zeros_like(x)], -1))
    out = crop_and_resize(img, 64, 64)
    assert out.size == (64, 64)
    red = np.asarray(out)[:, :, 0].astype(int)
    assert abs(red[:, 0].mean() - 51) <= 2 and abs(red[:, -1].mean() - 149) <= 2


# ---------------------------------------------------------------------------------------------------- auto-sized


def test_autosized_choice_for_known_input():
    # 900x600 (3:2). With w*h <= 704*512 the candidates within error 0.1 are 576x384 (err 0), 640x384 (0.1),
    # 640x448, 704x448, 704x512 (err 1/12): max_area takes 704x512, min_error the exact 3:2 576x384.
    cfg = AutosizeConfig(max_area=704 * 512)
    assert autosized_size(900, 600, cfg) == (704, 512)
    assert aspect_error(900, 600, 704, 512) == pytest.approx(1 / 12)
    cfg.objective = "min_error"
    assert autosized_size(900, 600, cfg) == (576, 384)
    # Defaults: 768x512 is exact and largest.
    assert autosized_size(900, 600, AutosizeConfig()) == (768, 512)
    out = autosized_crop(noise(900, 600), cfg)
    assert out.size == (576, 384)


def test_autosized_none_fits():
    assert autosized_size(1000, 100, AutosizeConfig()) is None
    assert autosized_crop(noise(1000, 100), AutosizeConfig()) is None


# ---------------------------------------------------------------------------------------------------- focal point


def planted(w: int, h: int, x0: int, y0: int, size: int) -> Image.Image:
    """Black picture with one square of noise: the only detail (entropy) and the only corners."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[y0 : y0 + size, x0 : x0 + size] = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(a)


@pytest.mark.parametrize("weights", [(0, 1, 0), (0, 0, 1), (0.9, 0.15, 0.5)])
def test_focal_crop_moves_toward_planted_detail(weights):
    face, entropy, edges = weights
    cfg = FocalConfig(face_weight=face, entropy_weight=entropy, edges_weight=edges)
    right = focal_crop(planted(400, 200, 280, 50, 100), 64, 64, cfg, faces=no_faces)
    # scaled to 128x64; the centre crop would start at x=32, the noise sits at x 90..122
    assert right.image.size == (64, 64)
    assert right.box[0] >= 56
    assert np.asarray(right.image).std() > 40  # the crop holds the noise
    left = focal_crop(planted(400, 200, 20, 50, 100), 64, 64, cfg, faces=no_faces)
    assert left.box[0] <= 8
    tall = focal_crop(planted(200, 400, 50, 290, 100), 64, 64, cfg, faces=no_faces)  # portrait: slides down
    assert tall.box[1] >= 56 and tall.box[0] == 0


def test_entropy_point_picks_window_with_the_noise():
    img = planted(128, 64, 90, 0, 30)
    x, y = entropy_point(img, 64, 64)
    assert y == 32 and 64 <= x <= 96  # window start in 32..64 (step 4) contains the whole noise block
    assert entropy_point(Image.new("RGB", (64, 64)), 64, 64) == (32, 32)


def test_focal_point_weights_centroids():
    img = planted(128, 64, 90, 0, 30)
    faces = lambda im, model: [(0.0, 0.0), (20.0, 10.0)]  # noqa: E731  centroid (10, 5)
    ex, ey = entropy_point(img, 64, 64)
    cfg = FocalConfig(face_weight=0.9, entropy_weight=0.15, edges_weight=0)
    (fx, fy), centroids = focal_point(img, 64, 64, cfg, faces=faces)
    assert centroids["faces"] == (10.0, 5.0)
    assert (fx, fy) == (round((0.9 * 10 + 0.15 * ex) / 1.05), round((0.9 * 5 + 0.15 * ey) / 1.05))
    # A kind that finds nothing drops out of the weighting.
    (fx, fy), centroids = focal_point(img, 64, 64, cfg, faces=no_faces)
    assert set(centroids) == {"entropy"} and (fx, fy) == (round(ex), round(ey))
    # Nothing enabled: the centre.
    assert focal_point(img, 64, 64, FocalConfig(0, 0, 0), faces=no_faces)[0] == (64, 32)


def test_focal_debug_picture():
    fc = focal_crop(planted(400, 200, 280, 50, 100), 64, 64, FocalConfig(debug=True), faces=no_faces)
    assert fc.debug is not None and fc.debug.size == (128, 64)
    assert tuple(np.asarray(fc.debug)[fc.box[1], fc.box[0] + 10]) == (255, 0, 0)  # crop rectangle drawn in red


def drawn_face(size: int) -> Image.Image:
    """A blurred cartoon face (oval, brows, eyes, nose, mouth) that OpenCV's frontal-face cascades detect."""
    from PIL import ImageDraw, ImageFilter

    im = Image.new("L", (size, size), 200)
    d = ImageDraw.Draw(im)
    box = lambda *f: tuple(v * size for v in f)  # noqa: E731
    d.ellipse(box(0.15, 0.05, 0.85, 0.98), fill=170)
    d.rectangle(box(0.25, 0.30, 0.45, 0.36), fill=60)
    d.rectangle(box(0.55, 0.30, 0.75, 0.36), fill=60)
    d.ellipse(box(0.28, 0.40, 0.42, 0.48), fill=30)
    d.ellipse(box(0.58, 0.40, 0.72, 0.48), fill=30)
    d.polygon([box(0.5, 0.45), box(0.44, 0.66), box(0.56, 0.66)], fill=140)
    d.ellipse(box(0.36, 0.74, 0.64, 0.82), fill=80)
    return im.filter(ImageFilter.GaussianBlur(size / 60)).convert("RGB")


@pytest.mark.skipif(not haar_cascades_available(), reason="this OpenCV ships no Haar cascades (OpenCV 5)")
def test_haar_faces_pull_the_focal_crop():
    assert haar_face_points(Image.new("RGB", (96, 64), (40, 40, 40))) == []
    # A face on the left, busy noise on the right: faces (0.9) outweigh entropy (0.15).
    img = planted(800, 400, 560, 100, 200)
    img.paste(drawn_face(240), (40, 80))
    cfg = FocalConfig(face_weight=0.9, entropy_weight=0.15, edges_weight=0)
    fc = focal_crop(img, 128, 128, cfg)
    fx, fy = fc.centroids["faces"]  # in the 256x128 scaled picture, where the face spans x 13..90, y 26..102
    assert 13 <= fx <= 90 and 26 <= fy <= 102
    assert fc.box[0] <= 16


# ---------------------------------------------------------------------------------------------------- recipe


def test_make_outputs_default_is_crop_and_resize():
    img = noise(300, 200)
    out = make_outputs(img, CropConfig(width=64, height=32))
    assert [im.size for im in out.images] == [(64, 32)]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(crop_and_resize(img, 64, 32)))


def test_make_outputs_combines_operations_in_a1111_order():
    img = noise(200, 600)
    cfg = CropConfig(width=64, height=64, split=SplitConfig(), keep_original_size=True, flips=("horizontal",),
                     focal=FocalConfig(face_weight=0))
    out = make_outputs(img, cfg)
    # 4 tiles + 1 focal crop + the original, each followed by its mirror
    assert [im.size for im in out.images] == [(64, 64)] * 10 + [(200, 600)] * 2
    assert np.array_equal(np.asarray(out.images[1]), np.asarray(out.images[0])[:, ::-1])
    assert out.images[10] is img


def test_make_outputs_square_skips_focal_and_autosize_failure_is_noted():
    square = make_outputs(noise(100, 100), CropConfig(width=64, height=64, focal=FocalConfig()))
    assert [im.size for im in square.images] == [(64, 64)]  # focal crop needs a non-square picture
    failed = make_outputs(noise(1000, 100), CropConfig(autosize=AutosizeConfig()))
    assert failed.images == [] and "auto-sized" in failed.notes[0]
