"""utils/data/: sources, captions, prompts, sharding, buckets, bad input, resume, start-up cost (small images)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import (
    TEMPLATES_DIR,
    DataConfig,
    PromptConfig,
    TrainLoader,
    alpha_to_weight,
    build_prompt,
    caption_from_filename,
    epoch_plan,
    item_rng,
    iter_batches,
    load_template,
    process_tags,
    resolve_template,
    scan_dataset,
    steps_per_epoch,
)
from utils.errors import UserError
from utils.images import apply_geometry, make_buckets, plan_geometry, select_bucket


def _img(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _folder(tmp_path, n, size=(32, 32), name="img{:03d}.png", sizes=None):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for i in range(n):
        w, h = sizes[i] if sizes else size
        _img(w, h, seed=i).save(d / name.format(i))
    return d


def _batches(summary, cfg, pc, n, **kw):
    it = iter_batches(summary, cfg, pc, **kw)
    return [b for _, b in zip(range(n), it)]


# ---------------------------------------------------------------------------------------------------------------------
# captions and prompts


def test_caption_from_filename_rules():
    assert caption_from_filename("000001-1-a man in suit") == "a man in suit"
    assert caption_from_filename("000001-1-a man in suit", r"\w+", ", ") == "a, man, in, suit"
    assert caption_from_filename("12345") == ""
    assert caption_from_filename("a-1 b") == "a-1 b"  # only a *leading* run of digits/dashes


def test_folder_captions_txt_filename_and_regex(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _img(16, 16).save(d / "000001-1-a man in suit.png")
    _img(16, 16).save(d / "00002-cat.png")
    (d / "00002-cat.txt").write_bytes("\ufeff  a red cat, sitting \n".encode("utf-8"))
    s = scan_dataset(DataConfig(train_data_dir=str(d), resolution=16))
    assert {Path(e.path).name: e.caption for e in s.examples} == {
        "000001-1-a man in suit.png": "a man in suit", "00002-cat.png": "a red cat, sitting"}
    assert s.has_captions
    s = scan_dataset(DataConfig(train_data_dir=str(d), resolution=16, filename_word_regex=r"\w+",
                                filename_join_string=", "))
    assert s.examples[0].caption == "a, man, in, suit"


def test_recursive_flag(tmp_path):
    d = _folder(tmp_path, 2, size=(16, 16))
    (d / "sub").mkdir()
    _img(16, 16).save(d / "sub" / "x.png")
    assert scan_dataset(DataConfig(train_data_dir=str(d), resolution=16)).num_examples == 2
    assert scan_dataset(DataConfig(train_data_dir=str(d), resolution=16, recursive=True)).num_examples == 3


def test_template_files_shape():
    counts = {"style": 19, "style_filewords": 17, "subject": 27, "subject_filewords": 27, "hypernetwork": 27, "none": 1}
    for name, n in counts.items():
        lines = load_template(TEMPLATES_DIR / f"{name}.txt")
        assert len(lines) == n == len(set(lines)), name
        assert all(("[name]" in ln) == (name not in ("hypernetwork", "none")) for ln in lines), name
        fw = name.endswith("filewords") or name == "hypernetwork"
        assert all(("[filewords]" in ln) == fw for ln in lines), name
    assert load_template(TEMPLATES_DIR / "none.txt") == ["picture"]


def test_resolve_template(tmp_path):
    assert resolve_template(PromptConfig(), has_captions=False).name == "subject.txt"
    assert resolve_template(PromptConfig(), has_captions=True).name == "subject_filewords.txt"
    assert resolve_template(PromptConfig(learnable_property="style"), False).name == "style.txt"
    assert resolve_template(PromptConfig(learnable_property="style"), True).name == "style_filewords.txt"
    assert resolve_template(PromptConfig(template_file="hypernetwork"), True).name == "hypernetwork.txt"
    assert resolve_template(PromptConfig(template_file="none.txt"), True).name == "none.txt"
    own = tmp_path / "mine.txt"
    own.write_text("x [name]\n\n")
    assert resolve_template(PromptConfig(template_file=str(own)), True) == own
    assert load_template(own) == ["x [name]"]
    assert resolve_template(PromptConfig(caption_only=True), True) is None
    with pytest.raises(UserError, match="not found"):
        resolve_template(PromptConfig(template_file="nope"), True)
    with pytest.raises(UserError):
        PromptConfig(learnable_property="thing")


def test_build_prompt_order_and_determinism():
    pc = PromptConfig(placeholder="<tok>")
    # [filewords] first, then [name]: a [name] inside the caption is replaced too (A1111's current order).
    assert build_prompt("[name] on a beach", ["a photo of [filewords]"], pc, item_rng(0, 0, 0)) == \
        "a photo of <tok> on a beach"
    lines = load_template(TEMPLATES_DIR / "subject_filewords.txt")
    a = [build_prompt("dog", lines, pc, item_rng(7, 0, i)) for i in range(30)]
    assert a == [build_prompt("dog", lines, pc, item_rng(7, 0, i)) for i in range(30)]
    assert len(set(a)) > 5  # a line is drawn per use
    assert all(p.endswith("<tok>, dog") or "<tok>" in p for p in a)
    assert build_prompt("a, b", None, PromptConfig(caption_only=True, placeholder="z"), item_rng(0, 0, 0)) == "a, b"


def test_tag_shuffle_and_dropout():
    cap = "a, b, c, d, e, f"
    assert process_tags(cap, False, 0.0, item_rng(0, 0, 0)) == cap
    shuffled = [process_tags(cap, True, 0.0, item_rng(0, 0, i)) for i in range(20)]
    assert all(sorted(s.split(", ")) == list("abcdef") for s in shuffled)
    assert len(set(shuffled)) > 10  # re-drawn each use
    assert process_tags(cap, False, 1.0, item_rng(0, 0, 0)) == ""
    kept = [len(process_tags(cap, False, 0.5, item_rng(1, 0, i)).split(", ")) for i in range(400)]
    assert 2.6 < np.mean(kept) < 3.4
    # Dropout keeps the original order of the surviving tags
    out = process_tags(cap, False, 0.5, item_rng(3, 0, 3)).split(", ")
    assert out == sorted(out)


def test_prompts_redrawn_per_epoch_in_loader(tmp_path):
    d = _folder(tmp_path, 4, size=(16, 16))
    for i in range(4):
        (d / f"img{i:03d}.txt").write_text("red, green, blue, cyan, pink")
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    pc = PromptConfig(placeholder="<t>", shuffle_tags=True, tag_dropout=0.2)
    s = scan_dataset(cfg, pc)
    e0 = [p for b in iter_batches(s, cfg, pc, batch_size=2, epoch=0) for p in b["prompts"]]
    e1 = [p for b in iter_batches(s, cfg, pc, batch_size=2, epoch=1) for p in b["prompts"]]
    assert e0 != e1
    assert e0 == [p for b in iter_batches(s, cfg, pc, batch_size=2, epoch=0) for p in b["prompts"]]


# ---------------------------------------------------------------------------------------------------------------------
# images: sizing, crops, flips, alpha


def test_exact_resize_center_random_crop_and_flip():
    img = _img(40, 24, seed=3)
    g = plan_geometry(img.size, (16, 16), "none")
    assert np.array_equal(np.asarray(apply_geometry(img, g)), np.asarray(img.resize((16, 16), Image.BICUBIC)))
    g = plan_geometry(img.size, (16, 16), "center")
    assert g.resize == (27, 16) and (g.left, g.top) == (5, 0)
    ref = img.resize((27, 16), Image.BICUBIC).crop((5, 0, 21, 16))
    assert np.array_equal(np.asarray(apply_geometry(img, g)), np.asarray(ref))
    lefts = {plan_geometry(img.size, (16, 16), "random", np.random.default_rng(i)).left for i in range(40)}
    assert lefts == set(range(0, 12))
    gf = plan_geometry(img.size, (16, 16), "center", flip=True)
    assert np.array_equal(np.asarray(apply_geometry(img, gf)), np.asarray(ref)[:, ::-1])


def test_flip_p_in_loader(tmp_path):
    d = _folder(tmp_path, 2, size=(16, 16))
    s = scan_dataset(DataConfig(train_data_dir=str(d), resolution=16))
    pc = PromptConfig()
    a = _batches(s, DataConfig(train_data_dir=str(d), resolution=16), pc, 1, batch_size=2)[0]
    b = _batches(s, DataConfig(train_data_dir=str(d), resolution=16, flip_p=1.0), pc, 1, batch_size=2)[0]
    assert torch.equal(a["index"], b["index"])
    assert torch.equal(a["pixel_values"].flip(-1), b["pixel_values"])


def test_alpha_loss_weight_nonsquare_not_transposed(tmp_path):
    # 64 wide x 32 high; the left half opaque, right half transparent -> latent 8 x 4 (w x h)
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[:, :32, 3] = 255
    d = tmp_path / "a"
    d.mkdir()
    Image.fromarray(rgba, "RGBA").save(d / "x.png")
    _img(64, 32).save(d / "y.png")  # no alpha -> ones
    cfg = DataConfig(train_data_dir=str(d), width=64, height=32, use_alpha_as_loss_weight=True)
    s = scan_dataset(cfg)
    b = _batches(s, cfg, PromptConfig(), 1, batch_size=2)[0]
    w = b["loss_weights"]
    assert w.shape == (2, 1, 4, 8)
    wx = w[b["index"].tolist().index(0), 0]
    assert torch.all(wx[:, :3] > 1.5) and torch.all(wx[:, 5:] == 0)
    assert wx.min() == 0 and abs(float(wx.mean()) - 1) < 1e-5
    assert torch.equal(w[b["index"].tolist().index(1)], torch.ones(1, 4, 8))
    # a uniform mask is all ones (A1111 would divide by zero)
    assert torch.equal(alpha_to_weight(Image.new("L", (16, 8), 200), (16, 8)), torch.ones(1, 1, 2))


def test_all_modes_load_to_rgb(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    base = _img(16, 16)
    base.convert("RGBA").save(d / "rgba.png")
    base.convert("LA").save(d / "la.png")
    p = base.convert("P")
    p.info["transparency"] = 0
    p.save(d / "p.png", transparency=0)
    base.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)).save(d / "i16.png")
    base.convert("L").save(d / "l.png")
    base.convert("1").save(d / "one.png")
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    s = scan_dataset(cfg)
    assert s.num_examples == 7 and not s.skipped
    b = _batches(s, cfg, PromptConfig(), 1, batch_size=7)[0]
    assert b["pixel_values"].shape == (7, 3, 16, 16)
    assert b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1


def test_sdxl_size_conditioning(tmp_path):
    d = _folder(tmp_path, 1, size=(48, 32))
    cfg = DataConfig(train_data_dir=str(d), resolution=32, center_crop=True)
    b = _batches(scan_dataset(cfg), cfg, PromptConfig(), 1, batch_size=1)[0]
    assert b["original_size"].tolist() == [[32, 48]]
    assert b["crop_top_left"].tolist() == [[0, 8]]
    assert b["target_size"].tolist() == [[32, 32]]


# ---------------------------------------------------------------------------------------------------------------------
# buckets


def test_make_and_select_buckets():
    bs = make_buckets(64 * 64, 32, 128, 16)
    assert (64, 64) in bs and all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in bs)
    assert all(32 <= w <= 128 and 32 <= h <= 128 for w, h in bs)
    assert select_bucket((200, 100), bs) == (80, 48)  # aspect 1.67 is the closest to 2 (next: 96x32, aspect 3)
    w, h = select_bucket((100, 300), bs)
    assert h > w
    assert select_bucket((50, 50), bs) == (64, 64)
    assert select_bucket((50, 40), bs, no_upscale=True, max_area=64 * 64, step=16) == (48, 32)
    assert select_bucket((400, 400), bs, no_upscale=True, max_area=64 * 64, step=16) == (64, 64)


def test_bucket_batches_single_bucket_and_table(tmp_path):
    sizes = [(64, 32)] * 5 + [(32, 64)] * 3 + [(40, 40)] * 4
    d = _folder(tmp_path, len(sizes), sizes=sizes)
    cfg = DataConfig(train_data_dir=str(d), resolution=48, enable_buckets=True, min_bucket_reso=16,
                     max_bucket_reso=96, bucket_reso_steps=16)
    s = scan_dataset(cfg)
    bucket_of = {e.index: e.bucket for e in s.examples}
    assert len(s.bucket_counts) == 3 and sorted(s.bucket_counts.values()) == [3, 4, 5]
    assert "buckets (w x h):" in s.describe() and "48x48: 4 images" in s.bucket_table()
    for epoch in range(3):
        batches = list(iter_batches(s, cfg, PromptConfig(), batch_size=2, epoch=epoch, seed=5))
        assert len(batches) == steps_per_epoch(s, cfg, 2) == 6
        for b in batches:
            (bw, bh), = {bucket_of[i] for i in b["index"].tolist()}
            assert b["pixel_values"].shape[-2:] == (bh, bw)
            assert set(map(tuple, b["target_size"].tolist())) == {(bh, bw)}


def test_epoch_plan_properties():
    buckets = [(1, 1)] * 7 + [(2, 1)] * 5 + [(1, 2)] * 2
    for G in (1, 2, 3, 4):
        plan = epoch_plan(buckets, G, seed=3, epoch=1)
        assert len(plan) == len(buckets) // G
        assert all(len(b) == G and len({buckets[i] for i in b}) == 1 for b in plan)
        assert plan == epoch_plan(buckets, G, seed=3, epoch=1)
        assert plan != epoch_plan(buckets, G, seed=3, epoch=2) or G == len(buckets)
    single = epoch_plan([(1, 1)] * 10, 3, 0, 0)
    assert len({i for b in single for i in b}) == 9  # a partition minus the dropped remainder
    rep = epoch_plan([(1, 1)] * 4, 2, 0, 0, repeats=3)
    assert Counter(i for b in rep for i in b) == {0: 3, 1: 3, 2: 3, 3: 3}


# ---------------------------------------------------------------------------------------------------------------------
# sharding across ranks


@pytest.mark.parametrize("n,batch,world", [(12, 2, 2), (3, 1, 2), (9, 1, 3)])
def test_folder_ranks_disjoint_complete_and_equal_to_one_process(tmp_path, n, batch, world):
    d = _folder(tmp_path, n, size=(24, 16))
    cfg = DataConfig(train_data_dir=str(d), resolution=16, random_crop=True, flip_p=0.5)
    pc = PromptConfig(placeholder="<t>", template_file="subject")
    s = scan_dataset(cfg, pc)
    steps = steps_per_epoch(s, cfg, batch, world)
    per_rank = [list(iter_batches(s, cfg, pc, rank=r, world_size=world, batch_size=batch, epoch=1, seed=9))
                for r in range(world)]
    assert all(len(p) == steps for p in per_rank)
    seen = [i for p in per_rank for b in p for i in b["index"].tolist()]
    assert len(seen) == len(set(seen)) == steps * batch * world  # disjoint
    if n % (batch * world) == 0:
        assert sorted(seen) == list(range(n))  # complete
    # N ranks x batch b == 1 rank x batch N*b, pixels (random crop + flip) and prompts included
    single = list(iter_batches(s, cfg, pc, rank=0, world_size=1, batch_size=batch * world, epoch=1, seed=9))
    for k, big in enumerate(single):
        parts = [per_rank[r][k] for r in range(world)]
        assert torch.equal(big["index"], torch.cat([p["index"] for p in parts]))
        assert big["prompts"] == [q for p in parts for q in p["prompts"]]
        assert torch.equal(big["pixel_values"], torch.cat([p["pixel_values"] for p in parts]))


def _png_bytes(seed):
    buf = io.BytesIO()
    _img(16, 16, seed).save(buf, "PNG")
    return buf.getvalue()


def _collect_stream(cfg, world, pc=PromptConfig(caption_only=True)):
    s = scan_dataset(cfg, pc)
    parts = [[c for b in iter_batches(s, cfg, pc, rank=r, world_size=world, batch_size=1, seed=4)
              for c in b["captions"]] for r in range(world)]
    return s, parts


def test_tar_source_two_ranks(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    k = 0
    for shard in range(4):
        with tarfile.open(tars / f"shard-{shard}.tar", "w") as t:
            for i in range(3):
                for ext, data in (("png", _png_bytes(k)), ("txt", f"item {k}".encode())):
                    info = tarfile.TarInfo(f"{k:05d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
                k += 1
    s, parts = _collect_stream(DataConfig(dataset_name=str(tars), resolution=16), 2)
    assert s.num_examples == 12 and s.image_column == "png" and s.caption_column == "txt"
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(f"item {i}" for i in range(12))


@pytest.mark.parametrize("files", [1, 4])
def test_parquet_source_many_and_few_shards(tmp_path, files):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    per = 8 // files
    for f in range(files):
        rows = range(f * per, (f + 1) * per)
        pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in rows],
                                 "text": [f"p{i}" for i in rows]}), d / f"part-{f}.parquet")
    s, parts = _collect_stream(DataConfig(dataset_name=str(d), resolution=16), 2)
    assert s.num_examples == 8
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(f"p{i}" for i in range(8))


def test_imagefolder_metadata_source_and_prompts(tmp_path):
    d = tmp_path / "imf"
    d.mkdir()
    for i in range(4):
        _img(16, 16, i).save(d / f"{i}.png")
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n"
                                              for i in range(4)))
    cfg = DataConfig(dataset_name=str(d), resolution=16)
    pc = PromptConfig(placeholder="<s>", learnable_property="style")
    s = scan_dataset(cfg, pc)
    b = next(iter(TrainLoader(s, cfg, pc, batch_size=2)))
    assert b["pixel_values"].shape == (2, 3, 16, 16)
    assert all(p.endswith("art by <s>") and any(f"t{i}" in p for i in range(4)) for p in b["prompts"])


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_skipped_and_reported(tmp_path):
    d = _folder(tmp_path, 3, size=(16, 16))
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not a png at all")
    (d / "notes.doc").write_bytes(b"\x00\x01")
    good = _png_bytes(1)
    (d / "trunc.png").write_bytes(good[: len(good) // 2])
    _img(16, 16).save(d / "latin1.png")
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    report = tmp_path / "out" / "skipped.txt"
    cfg = DataConfig(train_data_dir=str(d), resolution=16, verify_images=True)
    s = scan_dataset(cfg, report_file=report)
    assert s.num_examples == 3
    reasons = {Path(k.path).name: k.reason for k in s.skipped}
    assert reasons == {"zero.png": "empty file", "text.png": "not an image", "notes.doc": "not an image file",
                       "trunc.png": reasons["trunc.png"], "latin1.png": "caption file is not UTF-8"}
    assert "truncated" in reasons["trunc.png"] or "corrupt" in reasons["trunc.png"]
    lines = report.read_text().splitlines()[1:]
    assert sorted(Path(ln.split("\t")[0]).name for ln in lines) == sorted(reasons)


def test_truncated_image_found_mid_run_is_replaced_and_reported(tmp_path):
    d = _folder(tmp_path, 4, size=(16, 16))
    good = _png_bytes(1)
    (d / "trunc.png").write_bytes(good[: len(good) - 30])  # header intact: passes the cheap scan
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    report = tmp_path / "skipped.txt"
    s = scan_dataset(cfg, report_file=report)
    assert s.num_examples == 5
    loader = TrainLoader(s, cfg, PromptConfig(), batch_size=5, report_file=report)
    b = next(iter(loader))
    assert b["pixel_values"].shape[0] == 5  # batch keeps its size
    assert [Path(p).name for p, _ in b["skipped"]] == ["trunc.png"]
    assert "trunc.png" in report.read_text()
    trunc_idx = next(e.index for e in s.examples if e.path.endswith("trunc.png"))
    assert trunc_idx not in b["index"].tolist()


def test_no_usable_image_is_one_user_error(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    (d / "b.txt").write_text("caption")
    with pytest.raises(UserError, match="no usable training image"):
        scan_dataset(DataConfig(train_data_dir=str(d), resolution=16), report_file=tmp_path / "r.txt")
    with pytest.raises(UserError, match="not a folder"):
        scan_dataset(DataConfig(train_data_dir=str(tmp_path / "missing"), resolution=16))
    with pytest.raises(UserError, match="multiple of 8"):
        DataConfig(train_data_dir=str(d), resolution=30)
    with pytest.raises(UserError, match="cannot open dataset"):
        scan_dataset(DataConfig(dataset_name=str(tmp_path / "nothing-here"), resolution=16))


def test_too_few_images_for_one_step(tmp_path):
    d = _folder(tmp_path, 3, size=(16, 16))
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    s = scan_dataset(cfg)
    with pytest.raises(UserError, match="do not fill one step"):
        TrainLoader(s, cfg, PromptConfig(), batch_size=2, world_size=2)


def test_caption_only_warning(tmp_path):
    d = _folder(tmp_path, 2, size=(16, 16))
    (d / "img000.txt").write_text("a photo of [name]")
    (d / "img001.txt").write_text("a photo of a dog")
    pc = PromptConfig(caption_only=True, placeholder="<x>")
    s = scan_dataset(DataConfig(train_data_dir=str(d), resolution=16), pc)
    assert any("1 caption(s)" in w for w in s.warnings)


# ---------------------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_yields_what_uninterrupted_would(tmp_path, workers):
    d = _folder(tmp_path, 10, size=(24, 16))
    cfg = DataConfig(train_data_dir=str(d), resolution=16, random_crop=True, flip_p=0.5)
    pc = PromptConfig(placeholder="<t>", shuffle_tags=True)
    s = scan_dataset(cfg, pc)
    kw = dict(batch_size=2, seed=11, num_workers=workers)
    full = TrainLoader(s, cfg, pc, **kw)
    expected = [b for _, b in zip(range(8), full)]  # epoch 0 has 5 steps: crosses into epoch 1
    first = TrainLoader(s, cfg, pc, **kw)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)
    resumed = TrainLoader(s, cfg, pc, **kw)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(5), resumed)]
    for a, b in zip(expected[3:], got):
        assert torch.equal(a["index"], b["index"]) and a["prompts"] == b["prompts"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["position"] == 3


def test_stream_resume_replays_exactly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    for f in range(2):
        rows = range(f * 5, (f + 1) * 5)
        pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in rows],
                                 "text": [f"a{i}, b{i}, c{i}" for i in rows]}), d / f"part-{f}.parquet")
    cfg = DataConfig(dataset_name=str(d), resolution=16, flip_p=0.5)
    pc = PromptConfig(placeholder="<t>", shuffle_tags=True)
    s = scan_dataset(cfg, pc)
    full = [b for _, b in zip(range(7), TrainLoader(s, cfg, pc, batch_size=2, seed=2))]  # 5 per epoch
    first = TrainLoader(s, cfg, pc, batch_size=2, seed=2)
    it = iter(first)
    for _ in range(4):
        next(it)
    resumed = TrainLoader(s, cfg, pc, batch_size=2, seed=2)
    resumed.load_state_dict(first.state_dict())
    got = [b for _, b in zip(range(3), resumed)]
    for a, b in zip(full[4:], got):
        assert a["prompts"] == b["prompts"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_stream_with_workers_gives_the_same_examples(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in range(2):
        with tarfile.open(tars / f"s{shard}.tar", "w") as t:
            for i in range(4):
                k = shard * 4 + i
                for ext, data in (("png", _png_bytes(k)), ("txt", f"item {k}".encode())):
                    info = tarfile.TarInfo(f"{k:05d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    cfg = DataConfig(dataset_name=str(tars), resolution=16)
    pc = PromptConfig(caption_only=True)
    s = scan_dataset(cfg, pc)
    caps = {w: sorted(c for b in iter_batches(s, cfg, pc, batch_size=2, num_workers=w) for c in b["captions"])
            for w in (0, 2)}
    assert caps[0] == caps[2] == sorted(f"item {k}" for k in range(8))


def test_custom_template_without_name_warns(tmp_path):
    d = _folder(tmp_path, 1, size=(16, 16))
    t = tmp_path / "t.txt"
    t.write_text("a picture of [filewords]\n")
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    warnings = scan_dataset(cfg, PromptConfig(template_file=str(t), placeholder="x")).warnings
    assert any("has no [name]" in w for w in warnings)
    assert not scan_dataset(cfg, PromptConfig(template_file="hypernetwork", placeholder="x")).warnings


# ---------------------------------------------------------------------------------------------------------------------
# start-up that does not grow with the data; one pipeline across epochs


def test_big_folder_is_listed_not_read_and_bad_files_are_met_in_training(tmp_path, monkeypatch):
    import utils.data.folder as folder

    d = _folder(tmp_path, 6, size=(16, 16))
    (d / "img001.png").write_bytes(b"not a png")
    (d / "img002.txt").write_bytes(b"caf\xe9")  # not UTF-8
    (d / "img003.txt").write_text("a caption")
    monkeypatch.setattr(folder, "PRECHECK_MAX", 2)  # a "big" folder: more images than are checked up front
    opened = []
    for name in ("image_size", "open_image", "read_caption_file"):
        real = getattr(folder, name)
        monkeypatch.setattr(folder, name, lambda *a, _real=real, _n=name: opened.append(_n) or _real(*a))
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    report = tmp_path / "skipped.txt"
    s = scan_dataset(cfg, PromptConfig(), report_file=report)
    assert opened == [] and s.num_examples == 6 and s.has_captions
    assert "checked when training first reads them" in s.describe()
    loader = TrainLoader(s, cfg, PromptConfig(), batch_size=2, report_file=report)
    batches = [b for _, b in zip(range(3), loader)]
    assert all(b["pixel_values"].shape[0] == 2 for b in batches)  # batches keep their size
    used = {int(i) for b in batches for i in b["index"]}
    assert not used & {1, 2} and {0, 3, 4, 5} <= used
    reasons = {Path(p).name: r for b in batches for p, r in b["skipped"]}
    assert reasons == {"img001.png": "not an image", "img002.png": "caption file is not UTF-8"}
    assert {ln.split("\t")[0].rsplit("/", 1)[-1] for ln in report.read_text().splitlines()[1:]} == set(reasons)
    assert any(c == "a caption" for b in batches for c in b["captions"])


def _tars(tmp_path, shards=3, per=4):
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in range(shards):
        with tarfile.open(tars / f"s{shard}.tar", "w") as t:
            for i in range(per):
                k = shard * per + i
                for ext, data in (("png", _png_bytes(k)), ("txt", f"item {k}".encode())):
                    info = tarfile.TarInfo(f"{k:05d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return tars


def test_stream_scan_counts_rows_from_metadata_without_reading_them(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import utils.data.stream as stream

    def no_reading(*a, **k):
        raise AssertionError("the scan read the stream's rows")

    monkeypatch.setattr(stream, "_rows", no_reading)
    tars = _tars(tmp_path)
    s = scan_dataset(DataConfig(dataset_name=str(tars), resolution=16))
    assert (s.num_examples, s.exact, s.image_column, s.caption_column) == (12, True, "png", "txt")
    d = tmp_path / "pq"
    d.mkdir()
    for f in range(2):
        pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in range(3 + f)],
                                 "text": ["x"] * (3 + f)}), d / f"p{f}.parquet")
    s = scan_dataset(DataConfig(dataset_name=str(d), resolution=16))
    assert (s.num_examples, s.exact) == (7, True)
    # Past the tar-header budget the rest is estimated from the file sizes (equal shards: the exact number).
    monkeypatch.setattr(stream, "_TAR_MEMBER_BUDGET", 1)
    s = scan_dataset(DataConfig(dataset_name=str(tars), resolution=16))
    assert s.exact is False and s.num_examples == 12 and "about 12 rows" in s.describe()


def test_no_datasets_fingerprinting_and_one_pipeline_across_epochs(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.fingerprint import Hasher

    d = _folder(tmp_path, 4, size=(16, 16))
    p = tmp_path / "pq"
    p.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in range(4)],
                             "text": [f"t{i}" for i in range(4)]}), p / "a.parquet")
    for cfg in (DataConfig(train_data_dir=str(d), resolution=16), DataConfig(dataset_name=str(p), resolution=16)):
        s = scan_dataset(cfg)
        loader = TrainLoader(s, cfg, PromptConfig(), batch_size=2, num_workers=0)
        it = iter(loader)
        next(it)  # the stream is open
        hashed, starts = [], []
        monkeypatch.setattr(Hasher, "hash", classmethod(lambda cls, v: hashed.append(type(v)) or "x"))
        real_start = TrainLoader._start
        monkeypatch.setattr(TrainLoader, "_start", lambda self, *a: starts.append(a) or real_start(self, *a))
        for _ in range(3 * loader.steps_per_epoch):  # across three epoch boundaries
            next(it)
        assert loader.epoch == 3 and hashed == [] and starts == []
        monkeypatch.undo()


@pytest.mark.parametrize("kind", ["folder", "stream"])
def test_order_and_resume_independent_of_worker_count(tmp_path, kind):
    if kind == "folder":
        cfg = DataConfig(train_data_dir=str(_folder(tmp_path, 10, size=(24, 16))), resolution=16, flip_p=0.5,
                         random_crop=True)
    else:
        cfg = DataConfig(dataset_name=str(_tars(tmp_path)), resolution=16, flip_p=0.5)
    pc = PromptConfig(placeholder="<t>", shuffle_tags=True)
    s = scan_dataset(cfg, pc)

    def take(workers, n, state=None):
        loader = TrainLoader(s, cfg, pc, batch_size=2, seed=5, num_workers=workers)
        if state:
            loader.load_state_dict(state)
        out = [b for _, b in zip(range(n), loader)]
        loader.close()
        return out, loader.state_dict()

    spe = TrainLoader(s, cfg, pc, batch_size=2).steps_per_epoch
    full, _ = take(0, 2 * spe + 1)
    two, _ = take(2, 2 * spe + 1)
    _, state = take(1, spe - 1)
    resumed, _ = take(2, spe + 2, state)
    for a, b in zip(full, two):
        assert a["prompts"] == b["prompts"] and torch.equal(a["pixel_values"], b["pixel_values"])
    for a, b in zip(full[spe - 1:], resumed):
        assert a["prompts"] == b["prompts"] and torch.equal(a["pixel_values"], b["pixel_values"])


def _parquet_of_pictures(tmp_path, images: list[bytes]):
    """A parquet data set folder with one row per image's bytes (no file path), captions t0, t1, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in images],
                             "text": [f"t{i}" for i in range(len(images))]}), d / "a.parquet")
    return d


def _skipped_in_one_epoch(summary, cfg, pc, report):
    """What a training loader reports skipped (and writes to ``report``) over one epoch of batch 1."""
    loader = TrainLoader(summary, cfg, pc, batch_size=1, seed=1, report_file=report)
    it = iter(loader)
    for _ in range(loader.steps_per_epoch):
        next(it)
    return loader.skipped_during_run


def test_stream_row_that_fails_to_decode_is_replaced_and_reported(tmp_path):
    good = _png_bytes(9)
    images = [_png_bytes(i) for i in range(6)]
    images[2] = good[: len(good) - 30]  # header intact: only decoding finds it
    d = _parquet_of_pictures(tmp_path, images)
    cfg = DataConfig(dataset_name=str(d), resolution=16)
    pc = PromptConfig(caption_only=True)
    s = scan_dataset(cfg, pc)
    batches = list(iter_batches(s, cfg, pc, batch_size=1, seed=1))
    assert len(batches) == 6 and all(b["pixel_values"].shape == (1, 3, 16, 16) for b in batches)
    assert [r for b in batches for _, r in b["skipped"]] and "t2" not in [c for b in batches for c in b["captions"]]
    # the training's report names it with its reason
    report = tmp_path / "skipped_images.txt"
    (skipped,) = _skipped_in_one_epoch(s, cfg, pc, report)
    assert skipped.reason and skipped.reason in report.read_text() and skipped.path in report.read_text()
    # --verify_images finds it before training
    v = scan_dataset(DataConfig(dataset_name=str(d), resolution=16, verify_images=True), pc)
    assert v.num_examples == 5 and len(v.skipped) == 1


def test_steps_per_epoch_defined_once():
    from utils.data import micro_batches_per_epoch, optimizer_steps_per_epoch, sample_positions

    assert micro_batches_per_epoch(10, 2, 2) == 2 and optimizer_steps_per_epoch(5, 2) == 2
    with pytest.raises(UserError, match="gradient_accumulation_steps 4"):
        optimizer_steps_per_epoch(3, 4)
    assert sample_positions(3, 1, 2, 2) == [14, 15]


def test_loader_hands_out_whole_accumulation_groups(tmp_path):
    d = _folder(tmp_path, 10, size=(16, 16))
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    s = scan_dataset(cfg)
    loader = TrainLoader(s, cfg, PromptConfig(), batch_size=2, accumulation=2)
    assert loader.steps_per_epoch == 4 == steps_per_epoch(s, cfg, 2, accumulation=2) * 2
    assert len(list(loader.iter_epoch())) == 4


# ---------------------------------------------------------------------------------------------------------------------
# Found by the mutation sample of utils/data (docs/testing.md): each pins a rule no other test reached


def test_seeds_and_plans_depend_on_the_seed_epoch_and_position():
    from utils.data.plan import latent_seed

    buckets = [(1, 1)] * 12
    plans = {tuple(map(tuple, epoch_plan(buckets, 2, seed=s, epoch=0))) for s in range(6)}
    assert len(plans) == 6  # every run seed shuffles its own way
    seeds = {latent_seed(s, e, p) for s in (0, 1) for e in (0, 1) for p in range(8)}
    assert len(seeds) == 32  # one random-mode latent seed per (seed, epoch, position)


def test_tar_long_names_pax_and_gnu_keep_each_sample_apart(tmp_path, monkeypatch):
    """Members whose names need a pax or GNU long-name header: the scan reads the real name from it (two samples
    whose names differ only in their first letter stay two)."""
    import utils.data.stream as stream

    monkeypatch.setattr(stream, "_rows", lambda *a, **k: pytest.fail("the scan read the stream's rows"))
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tars = tmp_path / f"tars{fmt}"
        tars.mkdir()
        _tar_shard(tars / "s0.tar", [(f"{first}{'x' * 120}", _png_bytes(k), f"item {k}".encode())
                                     for k, first in enumerate("ab")], fmt=fmt)
        s = scan_dataset(DataConfig(dataset_name=str(tars), resolution=16))
        assert (s.num_examples, s.exact) == (2, True), fmt
    # a name that is not UTF-8 (a latin-1 tar): datasets cannot open such a tar; one line names the dataset
    tars = tmp_path / "latin1"
    tars.mkdir()
    _tar_shard(tars / "s0.tar", [(f"caf\u00e9{'x' * 120}", _png_bytes(0), b"item")], encoding="latin-1")
    with pytest.raises(UserError, match=f"cannot open dataset '{tars}'") as e:
        scan_dataset(DataConfig(dataset_name=str(tars), resolution=16))
    assert "\n" not in str(e.value)


def test_a_stream_without_a_cheap_count_is_counted_once_by_reading(tmp_path, monkeypatch):
    import utils.data.stream as stream

    monkeypatch.setattr(stream, "count_rows", lambda builder, split: None)
    s = scan_dataset(DataConfig(dataset_name=str(_tars(tmp_path)), resolution=16))
    assert (s.num_examples, s.exact) == (12, True)
    assert any("rows counted by reading the stream once" in n for n in s.notes)
    assert s.describe().startswith("12 rows")  # exact: no "about"


def test_a_folder_given_as_a_dataset_counts_its_image_files_without_reading(tmp_path, monkeypatch):
    import utils.data.stream as stream

    d = _folder(tmp_path, 5, size=(16, 16))
    monkeypatch.setattr(stream, "_rows", lambda *a, **k: pytest.fail("the scan read the stream's rows"))
    s = scan_dataset(DataConfig(dataset_name=str(d), resolution=16))
    assert (s.num_examples, s.exact) == (5, True)
    assert any("one row per image file" in n for n in s.notes)


def test_a_filename_regex_makes_a_folder_without_txt_files_captioned(tmp_path):
    d = _folder(tmp_path, 2, size=(16, 16), name="red cat {:03d}.png")
    assert not scan_dataset(DataConfig(train_data_dir=str(d), resolution=16)).has_captions
    assert scan_dataset(DataConfig(train_data_dir=str(d), resolution=16, filename_word_regex=r"[a-z]+")).has_captions


def test_a_checkpoint_of_another_global_batch_restarts_its_epoch(tmp_path):
    d = _folder(tmp_path, 8, size=(16, 16))
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    s = scan_dataset(cfg)
    loader = TrainLoader(s, cfg, PromptConfig(), batch_size=2, num_workers=0)
    loader.load_state_dict({"epoch": 1, "position": 3, "world_size": 1, "batch_size": 2})
    assert (loader.epoch, loader.position) == (1, 3)
    # what a loader of batch 4 saves does not resume mid-epoch in one of batch 2
    bigger = TrainLoader(s, cfg, PromptConfig(), batch_size=4, num_workers=0)
    bigger.epoch, bigger.position = 1, 1
    loader.load_state_dict(bigger.state_dict())
    assert (loader.epoch, loader.position) == (1, 0)
    loader.load_state_dict({"epoch": 1, "position": 3, "world_size": 2, "batch_size": 1})  # same global batch
    assert (loader.epoch, loader.position) == (1, 3)
    for other in ({"world_size": 2, "batch_size": 2}, {"world_size": 1, "batch_size": 4}):
        loader.load_state_dict({"epoch": 1, "position": 3, **other})
        assert (loader.epoch, loader.position) == (1, 0)


def test_a_stream_with_buckets_trains_each_row_at_its_own_aspect(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    sizes = [(64, 32), (32, 64), (64, 32), (32, 64)]
    items = []
    for k, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        _img(w, h, k).save(buf, "PNG")
        items.append((f"{k:05d}", buf.getvalue(), f"item {k}".encode()))
    _tar_shard(tars / "s0.tar", items)
    cfg = DataConfig(dataset_name=str(tars), resolution=48, enable_buckets=True, min_bucket_reso=16,
                     max_bucket_reso=96, bucket_reso_steps=16)
    s = scan_dataset(cfg, PromptConfig(caption_only=True))
    shapes = set()
    for b in iter_batches(s, cfg, PromptConfig(caption_only=True), batch_size=1, seed=0):
        h, w = b["pixel_values"].shape[-2:]
        wide = int(b["captions"][0].split()[1]) % 2 == 0  # items 0 and 2 are the wide pictures
        assert (w > h) == wide, (b["captions"], w, h)
        shapes.add((w, h))
    assert len(shapes) == 2



def _tar_members(path, members, fmt=tarfile.GNU_FORMAT, **open_kw):
    """A tar file of (member name, bytes) members, in order."""
    with tarfile.open(path, "w", format=fmt, **open_kw) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _tar_shard(path, items, fmt=tarfile.GNU_FORMAT, **open_kw):
    """A tar shard of (member stem, image bytes, caption bytes) items."""
    _tar_members(path, [(f"{stem}.{ext}", data) for stem, image, caption in items
                        for ext, data in (("png", image), ("txt", caption))], fmt, **open_kw)


def test_tar_ustar_prefixed_names_are_counted(tmp_path, monkeypatch):
    import utils.data.stream as stream

    monkeypatch.setattr(stream, "_rows", lambda *a, **k: pytest.fail("the scan read the stream's rows"))
    # ustar keeps a long path as prefix + name: two samples that differ only in the prefix stay two
    d = tmp_path / "ustar"
    d.mkdir()
    _tar_shard(d / "s0.tar", [(f"{first}{'d' * 70}/{'n' * 60}", _png_bytes(k), b"x") for k, first in enumerate("ab")],
               fmt=tarfile.USTAR_FORMAT)
    assert scan_dataset(DataConfig(dataset_name=str(d), resolution=16)).num_examples == 2


def test_a_named_caption_column_is_used_and_a_missing_one_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in range(2)],
                             "text": ["a", "b"], "alt": ["x", "y"]}), d / "a.parquet")
    s = scan_dataset(DataConfig(dataset_name=str(d), resolution=16, caption_column="alt"))
    assert s.caption_column == "alt"
    with pytest.raises(UserError, match="has no column 'nope'"):
        scan_dataset(DataConfig(dataset_name=str(d), resolution=16, caption_column="nope"))


def test_verify_images_also_checks_captions_and_counts_exactly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    captions = pa.array([b"fine", b"\xff\xfe not utf-8", b"also fine"], type=pa.binary())
    pq.write_table(pa.table({"image": [{"bytes": _png_bytes(i), "path": None} for i in range(3)], "text": captions}),
                   d / "a.parquet")
    v = scan_dataset(DataConfig(dataset_name=str(d), resolution=16, verify_images=True))
    assert (v.num_examples, v.exact) == (2, True) and "about" not in v.describe()
    assert [sk.reason for sk in v.skipped] == ["caption is not UTF-8"]


def test_image_cells_of_every_kind_and_their_report_names(tmp_path):
    from utils.data.stream import _row_image_bytes
    from utils.images import ImageLoadError

    assert _row_image_bytes(b"abc", "row 3") == (b"abc", "row 3")
    assert _row_image_bytes({"bytes": b"abc", "path": "cat.png"}, "row 3") == (b"abc", "cat.png")
    assert _row_image_bytes({"bytes": b"abc", "path": None}, "row 3") == (b"abc", "row 3")
    for empty in (b"", {"bytes": b"", "path": None}):
        with pytest.raises(ImageLoadError, match="empty image cell"):
            _row_image_bytes(empty, "row 3")


def test_a_stream_with_no_usable_image_is_one_line_not_a_hang(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b"", "path": None}] * 3, "text": ["a", "b", "c"]}), d / "a.parquet")
    cfg = DataConfig(dataset_name=str(d), resolution=16)
    s = scan_dataset(cfg, PromptConfig(caption_only=True))
    with pytest.raises(UserError, match="received no usable image"):
        next(iter_batches(s, cfg, PromptConfig(caption_only=True), batch_size=1))


def test_a_template_of_ones_own_without_name_is_warned_about_and_one_with_it_is_not(tmp_path):
    d = _folder(tmp_path, 2, size=(16, 16))
    with_name, without = tmp_path / "mine.txt", tmp_path / "plain.txt"
    with_name.write_text("a photo of [name]\n")
    without.write_text("a photo\n")
    cfg = DataConfig(train_data_dir=str(d), resolution=16)
    ok = scan_dataset(cfg, PromptConfig(placeholder="<t>", template_file=str(with_name)))
    assert not [w for w in ok.warnings if "has no [name]" in w]
    bad = scan_dataset(cfg, PromptConfig(placeholder="<t>", template_file=str(without)))
    assert [w for w in bad.warnings if "template plain.txt has no [name]" in w]


def test_no_usable_picture_names_the_report_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.png").write_bytes(b"not a picture")
    report = tmp_path / "skipped_images.txt"
    import re

    with pytest.raises(UserError, match=re.escape(f"1 file(s) skipped, see {report})")):
        scan_dataset(DataConfig(train_data_dir=str(d), resolution=16), report_file=report)


def test_each_crop_mode_has_its_own_cached_latents(tmp_path):
    from utils.latents import LatentStore

    d = _folder(tmp_path, 2, size=(24, 16))
    store = LatentStore("once", 1.0, cache_dir=tmp_path / "cache")
    keys = {}
    for label, cfg in (("none", DataConfig(train_data_dir=str(d), resolution=16)),
                       ("center", DataConfig(train_data_dir=str(d), resolution=16, center_crop=True))):
        s = scan_dataset(cfg)
        loader = TrainLoader(s, cfg, PromptConfig(), batch_size=2, num_workers=0, latents=store)
        keys[label] = set(next(iter(loader))["latent_keys"])
    assert len(keys["none"]) == len(keys["center"]) == 2 and not keys["none"] & keys["center"]


def test_rules_the_third_mutation_sample_found_unpinned(tmp_path):
    """--repeats counts in a folder's steps per epoch; a folder's caption read on demand comes from the file name
    when there is no .txt; a stream row without a caption has an empty one; the crop flags' error says why."""
    from utils.data.stream import _row_caption

    d = _folder(tmp_path, 4, size=(16, 16), name="red ball {:03d}.png")
    cfg = DataConfig(train_data_dir=str(d), resolution=16, repeats=3)
    s = scan_dataset(cfg)
    assert steps_per_epoch(s, cfg, 2) == 6  # 4 pictures x 3 repeats / batch 2
    index = s.folder
    index.captions = None  # as a big folder's index holds them: read when asked
    assert index.caption(0) == "red ball 000"
    assert _row_caption(None) == ""
    with pytest.raises(UserError, match="--center_crop and --random_crop exclude each other"):
        DataConfig(train_data_dir=str(d), resolution=16, center_crop=True, random_crop=True)


def test_gnu_long_names_with_spaces_stay_apart(tmp_path, monkeypatch):
    import utils.data.stream as stream

    monkeypatch.setattr(stream, "_rows", lambda *a, **k: pytest.fail("the scan read the stream's rows"))
    d = tmp_path / "tars"
    d.mkdir()
    _tar_shard(d / "s0.tar", [(f"a photo {first} {'x' * 110}", _png_bytes(k), b"x") for k, first in enumerate("pq")])
    assert scan_dataset(DataConfig(dataset_name=str(d), resolution=16)).num_examples == 2


def test_hidden_tar_members_are_not_counted_as_rows(tmp_path, monkeypatch):
    """macOS `._x.png` forks, dot files and `__x` files in a shard: `datasets` skips them when it streams the tar,
    so the count read from the tar headers must skip them too (else an epoch is planned for rows that never come)."""
    import utils.data.stream as stream

    d = tmp_path / "tars"
    d.mkdir()
    members = [("a.png", _png_bytes(0)), ("a.txt", b"A"), ("._a.png", b"\0\5fork"), (".hid.png", _png_bytes(1)),
               ("__x.png", _png_bytes(2)), ("b.png", _png_bytes(3)), ("b.txt", b"B"), ("sub/._c.png", b"fork"),
               ("sub/c.png", _png_bytes(4)), ("sub/c.txt", b"C")]
    _tar_members(d / "s0.tar", members)
    cheap = scan_dataset(DataConfig(dataset_name=str(d), resolution=16))
    monkeypatch.setattr(stream, "count_rows", lambda builder, split: None)
    read = scan_dataset(DataConfig(dataset_name=str(d), resolution=16))
    assert (cheap.num_examples, cheap.exact) == (read.num_examples, read.exact) == (3, True)


def test_a_stream_row_whose_header_cannot_be_read_is_reported_under_buckets(tmp_path):
    """With buckets a stream row's size is read before the row is placed; a row whose image is no picture at all
    is left out there and still reported (name and reason), like a row that fails to decode later."""
    d = _parquet_of_pictures(tmp_path, [_png_bytes(0), b"not a picture", _png_bytes(2), _png_bytes(3), _png_bytes(4)])
    cfg = DataConfig(dataset_name=str(d), resolution=16, enable_buckets=True, min_bucket_reso=8, max_bucket_reso=32,
                     bucket_reso_steps=8)
    pc = PromptConfig(caption_only=True)
    s = scan_dataset(cfg, pc)
    batches = list(iter_batches(s, cfg, pc, batch_size=1, seed=1))
    skipped = [entry for b in batches for entry in b["skipped"]]
    assert len(skipped) == 1
    name, reason = skipped[0]
    assert name.endswith("caption 't1']") and "not a picture" not in name and reason  # the caption finds the row
    assert "t1" not in [c for b in batches for c in b["captions"]]
    report = tmp_path / "skipped_images.txt"
    (entry,) = _skipped_in_one_epoch(s, cfg, pc, report)
    assert entry.path == name and entry.reason == reason and name in report.read_text()


def test_an_epoch_short_of_rows_continues_into_the_next_pass(tmp_path):
    """A stream row with an empty image cell is left out, so the rank's rows of a pass run one short of the epoch's
    micro-batches: the epoch takes the missing one from the start of the next pass, which is where the next epoch
    starts too (not from any other pass's order)."""
    images = [_png_bytes(i) for i in range(8)]
    images[3] = b""
    d = _parquet_of_pictures(tmp_path, images)
    cfg = DataConfig(dataset_name=str(d), resolution=16)
    pc = PromptConfig(caption_only=True)
    for seed in range(3):
        loader = TrainLoader(scan_dataset(cfg, pc), cfg, pc, batch_size=1, seed=seed)
        per = loader.steps_per_epoch
        assert per == 8
        it = iter(loader)
        epochs = [[next(it)["captions"][0] for _ in range(per)] for _ in range(3)]
        for e in range(2):
            assert sorted(epochs[e][:7]) == [f"t{i}" for i in range(8) if i != 3]  # every usable row once
            assert epochs[e][7] == epochs[e + 1][0]  # then the next pass's first row


def test_a_leftover_batch_comes_from_a_bucket_as_often_as_its_leftovers_say():
    """Bucket A leaves 3 pictures over after its full batches of 4, bucket B leaves 1: the one extra batch comes from A
    with probability 3/4 (from its leftovers, topped up from A), not 1/2. Counted over 400 epochs (fixed seeds)."""
    buckets = [(64, 64)] * 7 + [(64, 32)] * 5
    from_a = 0
    for epoch in range(400):
        plan = epoch_plan(buckets, 4, seed=0, epoch=epoch)
        assert len(plan) == 3 and all(len({buckets[i] for i in batch}) == 1 for batch in plan)
        from_a += sum(buckets[batch[0]] == (64, 64) for batch in plan) == 2
    assert 0.65 < from_a / 400 < 0.85  # 0.79 measured; uniform choice gives 0.52


def test_the_messages_a_user_reads_about_templates_cells_and_buckets(tmp_path):
    """Texts users act on: an unknown template names every template shipped; an image cell of an unknown kind names
    its type; the bucket table counts "1 image" and "2 images"."""
    from utils.data.prompts import TEMPLATES_DIR, resolve_template
    from utils.data.sources import DatasetSummary
    from utils.data.stream import _row_image_bytes
    from utils.images import ImageLoadError

    shipped = sorted(f.stem for f in TEMPLATES_DIR.glob("*.txt"))
    assert len(shipped) > 2
    with pytest.raises(UserError) as e:
        resolve_template(PromptConfig(template_file="no-such-template"), False)
    assert str(e.value) == (f"template file 'no-such-template' not found (not a file, nor one of templates/: "
                            f"{', '.join(shipped)})")
    with pytest.raises(ImageLoadError) as e:
        _row_image_bytes(42)
    assert str(e.value) == "unsupported image cell int"
    table = DatasetSummary("folder", 3, [], {(64, 32): 1, (32, 64): 2}, False).bucket_table()
    assert table == "buckets (w x h):\n  32x64: 2 images\n  64x32: 1 image"


def test_bucket_settings_no_bucket_fits_are_one_line_before_anything_loads(tmp_path):
    """--enable_buckets with --resolution 64 and the default --min_bucket_reso 256: no bucket can exist. That was a
    ValueError traceback from deep in the data path, after the model had loaded; now it is the config's one line."""
    with pytest.raises(UserError) as e:
        DataConfig(train_data_dir=str(tmp_path), resolution=64, enable_buckets=True)
    assert str(e.value) == ("--enable_buckets: no bucket with sides from --min_bucket_reso 256 to --max_bucket_reso "
                            "1024 (steps of 64) fits the area of --resolution 64x64; lower --min_bucket_reso")
    with pytest.raises(UserError, match="--max_bucket_reso 128 "):
        DataConfig(train_data_dir=str(tmp_path), resolution=512, enable_buckets=True, max_bucket_reso=128)
    DataConfig(train_data_dir=str(tmp_path), resolution=64, enable_buckets=True, min_bucket_reso=32)  # fits
