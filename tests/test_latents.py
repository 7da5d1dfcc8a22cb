"""utils/latents.py + the cached-latent path of utils/data.py, with the tiny SD-1 VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import DataConfig, PromptConfig, TrainLoader, check_latents, prepare_latents, scan_dataset
from utils.errors import UserError
from utils.images import plan_geometry
from utils.latents import LatentConfig, LatentStore, cache_key, encode_pixels, vae_identity


class CountingVAE:
    """Wraps a VAE and counts the images that go through ``encode`` (no patching of the real class)."""

    def __init__(self, vae):
        self.vae, self.images, self.calls = vae, 0, 0

    config = property(lambda self: self.vae.config)
    dtype = property(lambda self: self.vae.dtype)
    device = property(lambda self: self.vae.device)

    def encode(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.vae.encode(x)


@pytest.fixture(scope="module")
def vae(tiny_sd1):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae").eval()


def _folder(tmp_path, n, size=(64, 64)):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return d


def test_cache_encodes_each_image_once_and_reuses_disk(tmp_path, vae):
    d = _folder(tmp_path, 4)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    pc = PromptConfig(placeholder="<t>")
    summary = scan_dataset(cfg, pc)
    lcfg = LatentConfig("deterministic", cache_dir=str(tmp_path / "cache"))
    ident = vae_identity(vae, "tiny-sd1")
    counting = CountingVAE(vae)
    cached = prepare_latents(summary, cfg, counting, lcfg, identity=ident, progress=False)
    check_latents(cached)
    assert counting.images == 4
    loader = TrainLoader(summary, cfg, pc, batch_size=2, latents=cached)
    it = iter(loader)
    batches = [next(it) for _ in range(2 * loader.steps_per_epoch)]  # two epochs
    assert loader.epoch == 1 and counting.images == 4  # no encode while training
    assert all("pixel_values" not in b and b["latents"].shape == (2, 4, 8, 8) for b in batches)
    # deterministic = mean * scaling factor of the VAE config
    b = batches[0]
    i = int(b["index"][0])
    x = torch.from_numpy(np.asarray(Image.open(summary.examples[i].path).convert("RGB"), np.float32))
    mean, _ = encode_pixels(vae, (x.permute(2, 0, 1) / 127.5 - 1)[None])
    assert torch.allclose(b["latents"][0], mean[0] * vae.config.scaling_factor, atol=1e-5)
    # a second run (new store, same dir) reuses every entry: zero VAE calls
    again = CountingVAE(vae)
    cached2 = prepare_latents(scan_dataset(cfg, pc), cfg, again, lcfg, identity=ident, progress=False)
    assert again.calls == 0 and cached2.keys == cached.keys
    # another VAE identity misses
    other = CountingVAE(vae)
    prepare_latents(summary, cfg, other, lcfg, identity=ident + "-other", progress=False)
    assert other.images == 4


def test_flip_variants_cached_and_random_crop_refused(tmp_path, vae):
    d = _folder(tmp_path, 3)
    cfg = DataConfig(train_data_dir=str(d), resolution=64, flip_p=0.5)
    counting = CountingVAE(vae)
    cached = prepare_latents(scan_dataset(cfg), cfg, counting, LatentConfig("once"), identity="v", progress=False)
    assert counting.images == 6 and len(set(cached.keys.values())) == 6
    with pytest.raises(UserError, match="random_crop"):
        rc = DataConfig(train_data_dir=str(d), resolution=64, random_crop=True)
        prepare_latents(scan_dataset(rc), rc, vae, LatentConfig("once"), identity="v", progress=False)


def test_sampling_modes(tmp_path):
    mean, std = torch.randn(4, 2, 3), torch.rand(4, 2, 3) + 0.5
    key = "ab" * 20
    disk = {m: LatentStore(m, 0.5, cache_dir=tmp_path / "c") for m in ("once", "deterministic", "random")}
    mem = {m: LatentStore(m, 0.5) for m in ("once", "deterministic", "random")}
    disk["once"].put(key, mean, std)  # one disk entry serves every mode
    for s in mem.values():
        s.put(key, mean, std)
    for stores in (disk, mem):
        assert torch.equal(stores["deterministic"].get(key), mean * 0.5)
        once = stores["once"].get(key)
        assert torch.equal(once, stores["once"].get(key)) and not torch.equal(once, mean * 0.5)
        r1 = stores["random"].get(key, torch.Generator().manual_seed(1))
        r2 = stores["random"].get(key, torch.Generator().manual_seed(2))
        assert not torch.equal(r1, r2)
        assert torch.equal(r1, stores["random"].get(key, torch.Generator().manual_seed(1)))
    assert torch.equal(disk["once"].get(key), mem["once"].get(key))  # same sample in memory and on disk
    assert torch.equal(disk["random"].get(key, torch.Generator().manual_seed(3)),
                       mem["random"].get(key, torch.Generator().manual_seed(3)))
    shifted = LatentStore("deterministic", 2.0, shift_factor=0.25)
    shifted.put(key, mean, std)
    assert torch.allclose(shifted.get(key), (mean - 0.25) * 2.0)


def test_random_sampling_in_loader_redrawn_per_use(tmp_path, vae):
    d = _folder(tmp_path, 2)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    summary = scan_dataset(cfg)
    cached = prepare_latents(summary, cfg, vae, LatentConfig("random"), identity="v", progress=False)
    loader = TrainLoader(summary, cfg, PromptConfig(), batch_size=2, latents=cached, seed=3)
    it = iter(loader)
    a, b = next(it), next(it)
    order = lambda x: x["latents"][x["index"].argsort()]  # noqa: E731
    assert not torch.equal(order(a), order(b))
    again = iter(TrainLoader(summary, cfg, PromptConfig(), batch_size=2, latents=cached, seed=3))
    assert torch.equal(next(again)["latents"], a["latents"])  # seeded: reproducible


def test_keys_cover_content_size_crop_flip_and_vae():
    g = plan_geometry((80, 64), (64, 64), "center")
    base = cache_key("h", g, "vae")
    assert base == cache_key("h", plan_geometry((80, 64), (64, 64), "center"), "vae")
    assert len({base, cache_key("h2", g, "vae"), cache_key("h", g, "vae2"),
                cache_key("h", plan_geometry((80, 64), (64, 64), "none"), "vae"),
                cache_key("h", plan_geometry((80, 64), (64, 64), "center", flip=True), "vae"),
                cache_key("h", plan_geometry((80, 64), (32, 32), "center"), "vae"),
                cache_key("h", plan_geometry((96, 64), (64, 64), "center"), "vae")}) == 7


def test_encoding_split_across_ranks(tmp_path, vae):
    d = _folder(tmp_path, 5)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    summary = scan_dataset(cfg)
    lcfg = LatentConfig("once", cache_dir=str(tmp_path / "c"))
    counts = []
    for rank in range(2):
        c = CountingVAE(vae)
        cached = prepare_latents(summary, cfg, c, lcfg, identity="v", rank=rank, world_size=2, progress=False)
        counts.append(c.images)
    assert counts == [3, 2]
    check_latents(cached)  # after both ranks, every entry is on disk
    partial = LatentConfig("once", cache_dir=str(tmp_path / "c2"))
    only0 = prepare_latents(summary, cfg, vae, partial, identity="v", rank=0, world_size=2, progress=False)
    with pytest.raises(UserError, match="missing"):
        check_latents(only0)


def test_alpha_weights_with_cached_latents(tmp_path, vae):
    d = tmp_path / "a"
    d.mkdir()
    rgba = np.full((64, 128, 4), 120, np.uint8)
    rgba[:, 64:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(d / "x.png")
    cfg = DataConfig(train_data_dir=str(d), width=128, height=64, use_alpha_as_loss_weight=True)
    summary = scan_dataset(cfg)
    cached = prepare_latents(summary, cfg, vae, LatentConfig("deterministic", cache_dir=str(tmp_path / "c")),
                             identity="v", progress=False)
    b = next(iter(TrainLoader(summary, cfg, PromptConfig(), batch_size=1, latents=cached)))
    assert b["latents"].shape == (1, 4, 8, 16) and b["loss_weights"].shape == (1, 1, 8, 16)
    assert torch.all(b["loss_weights"][0, 0, :, :7] > 1) and torch.all(b["loss_weights"][0, 0, :, 9:] == 0)


def test_stream_source_with_latent_cache(tmp_path, vae):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 20 * i, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": png(i), "path": None} for i in range(3)],
                             "text": [f"c{i}" for i in range(3)]}), d / "a.parquet")
    cfg = DataConfig(dataset_name=str(d), resolution=64)
    summary = scan_dataset(cfg)
    counting = CountingVAE(vae)
    cached = prepare_latents(summary, cfg, counting, LatentConfig("deterministic", cache_dir=str(tmp_path / "c")),
                             identity="v", progress=False)
    assert counting.images == 3
    loader = TrainLoader(summary, cfg, PromptConfig(caption_only=True), batch_size=1, latents=cached)
    it = iter(loader)
    got = [next(it) for _ in range(6)]  # two epochs, no VAE
    assert counting.images == 3
    assert sorted(c for b in got for c in b["captions"]) == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert all(b["latents"].shape == (1, 4, 8, 8) for b in got)


def test_once_samples_differ_between_entries_and_repeat_for_one(tmp_path):
    """'once' draws one sample per entry, seeded by the entry's key: the same key always gives the same sample, two
    entries with the same distribution get different ones (a constant seed would give every image the same noise)."""
    mean, std = torch.zeros(4, 2, 2), torch.ones(4, 2, 2)
    keys = ["1" * 40, "2" * 40, "ab" * 20]
    for cache_dir in (None, tmp_path / "cache"):
        store = LatentStore("once", 1.0, cache_dir=cache_dir)
        for k in keys:
            store.put(k, mean, std)
        samples = [store.get(k) for k in keys]
        assert not torch.equal(samples[0], samples[1]) and not torch.equal(samples[1], samples[2])
        assert all(torch.equal(s, store.get(k)) for s, k in zip(samples, keys))
        assert all(0.2 < float(s.std()) < 3 for s in samples)  # a real N(0, 1) draw, not the mean


def test_plans_differing_only_in_resize_size_get_different_keys():
    """Same source, crop offset, target and flip, but resized to another size first: other pixels, another key."""
    from utils.images import Geometry

    a = Geometry((100, 80), (80, 64), 8, 0, (64, 64))
    b = Geometry((100, 80), (96, 77), 8, 0, (64, 64))
    assert cache_key("h", a, "vae") != cache_key("h", b, "vae")
    assert cache_key("h", a, "vae") == cache_key("h", Geometry((100, 80), (80, 64), 8, 0, (64, 64)), "vae")
