"""utils/latents.py + the latent path of the batch source (encoded as first met, kept, sampled), tiny SD-1 VAE."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import DataConfig, PromptConfig, TrainLoader, scan_dataset
from utils.errors import UserError
from utils.latents import Entry, LatentConfig, LatentEncoder, LatentStore, cache_key, encode_pixels, vae_identity
from utils.training_setup import LoaderSource


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


def _source(summary, cfg, vae, lcfg, pc=PromptConfig(), *, identity="v", batch_size=2, keep=True, **kw):
    """The trainer's batch source: a TrainLoader over a latent store, completed by LoaderSource."""
    store = LatentStore.for_vae(vae, lcfg, identity=identity, keep=keep)
    loader = TrainLoader(summary, cfg, pc, batch_size=batch_size, latents=store, **kw)
    return LoaderSource(loader, vae, kw.get("seed", 0), sdxl=False, latent_sampling=lcfg.latent_sampling)


def test_first_epoch_encodes_as_it_goes_later_epochs_read_and_disk_is_reused(tmp_path, vae):
    d = _folder(tmp_path, 4)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    pc = PromptConfig(placeholder="<t>")
    summary = scan_dataset(cfg, pc)
    lcfg = LatentConfig("deterministic", cache_dir=str(tmp_path / "cache"))
    ident = vae_identity(vae, "tiny-sd1")
    counting = CountingVAE(vae)
    src = _source(summary, cfg, counting, lcfg, pc, identity=ident)
    it = src.iter_epoch(0, 0)
    first = next(it)
    assert counting.images == 2  # only the first batch's images, not the whole set before step 1
    epoch0 = [first, *it]
    assert counting.images == 4 and counting.calls == 4  # one VAE call per image
    epoch1 = list(src.iter_epoch(1, 0))
    assert counting.images == 4  # no encode after the first epoch
    assert all(b["latents"].shape == (2, 4, 8, 8) for b in epoch0 + epoch1)
    assert all(b["pixel_slots"] == [0, 1] for b in epoch0)  # decoded and encoded
    assert all("pixel_slots" not in b and b["latent_slots"] == [0, 1] for b in epoch1)  # read, nothing decoded
    # deterministic = mean * scaling factor of the VAE config, whether just encoded or read back
    for b in (epoch0[0], epoch1[0]):
        i = int(b["index"][0])
        x = torch.from_numpy(np.asarray(Image.open(summary.examples[i].path).convert("RGB"), np.float32))
        mean, _ = encode_pixels(vae, (x.permute(2, 0, 1) / 127.5 - 1)[None])
        assert torch.allclose(b["latents"][0], mean[0] * vae.config.scaling_factor, atol=1e-5)
    # a second run (new store, same dir) reuses every entry: zero VAE calls
    again = CountingVAE(vae)
    rerun = _source(scan_dataset(cfg, pc), cfg, again, lcfg, pc, identity=ident)
    reread = list(rerun.iter_epoch(0, 0))
    assert again.calls == 0
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(epoch0, reread))
    # another VAE identity misses
    other = CountingVAE(vae)
    list(_source(summary, cfg, other, lcfg, pc, identity=ident + "-other").iter_epoch(0, 0))
    assert other.images == 4


def test_a_latent_does_not_depend_on_its_batch(tmp_path, vae):
    """A resumed run meets an image in another batch than the first run did; its latent must be bit-identical."""
    d = _folder(tmp_path, 4)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    summary = scan_dataset(cfg)
    full = _source(summary, cfg, vae, LatentConfig("once"), batch_size=4)
    a = next(full.iter_epoch(0, 0))  # all four encoded in one batch
    part = _source(summary, cfg, vae, LatentConfig("once"), batch_size=4)
    store = part.encoder.store
    one = _source(summary, cfg, vae, LatentConfig("once"), batch_size=1)
    next(one.iter_epoch(0, 0))  # one image encoded alone ...
    store.memory.update(one.encoder.store.memory)  # ... is a cache hit beside three misses in the next run
    b = next(part.iter_epoch(0, 0))
    assert len(store.memory) == 4
    assert torch.equal(a["latents"], b["latents"])


def test_flip_variants_cached_as_met_and_random_crop_refused(tmp_path, vae):
    d = _folder(tmp_path, 3)
    cfg = DataConfig(train_data_dir=str(d), resolution=64, flip_p=0.5)
    counting = CountingVAE(vae)
    src = _source(scan_dataset(cfg), cfg, counting, LatentConfig("once"), batch_size=1)
    seen = set()
    for epoch in range(6):
        for b in src.iter_epoch(epoch, 0):
            seen.update(b["latent_keys"])
    assert len(seen) == 6  # every (image, flip) met over six epochs
    assert counting.images == len(src.encoder.store.memory) == 6  # each encoded once
    with pytest.raises(UserError, match="random_crop"):
        rc = DataConfig(train_data_dir=str(d), resolution=64, random_crop=True)
        _source(scan_dataset(rc), rc, vae, LatentConfig("once"))
    # --random_crop with a store that keeps nothing (what the trainer builds) encodes every use
    rc_counting = CountingVAE(vae)
    rc_src = _source(scan_dataset(rc), rc, rc_counting, LatentConfig("once"), batch_size=1, keep=False)
    for epoch in range(2):
        list(rc_src.iter_epoch(epoch, 0))
    assert rc_counting.images == 6


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



def test_memory_store_is_bounded(tmp_path, capsys):
    mean, std = torch.randn(4, 8, 8), torch.rand(4, 8, 8)
    store = LatentStore("once", 1.0, memory_budget_mb=2.5 * 1024 / 2**20)  # room for two 1 KB samples
    for k in range(4):
        fresh = store.put(f"{k:02d}" * 20, mean, std)
        assert torch.equal(store.draw(fresh, f"{k:02d}" * 20), LatentStore("once", 1.0).draw(fresh, f"{k:02d}" * 20))
    assert len(store.memory) == 2 and store.memory_bytes == 2 * 4 * 8 * 8 * 4
    assert "reached" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["once", "deterministic", "random"])
def test_sampling_the_same_cached_or_not(tmp_path, vae, mode):
    """A1111's meanings hold on both paths: an uncached run draws exactly the samples a cached one does."""
    d = _folder(tmp_path, 2)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    summary = scan_dataset(cfg)
    runs = {}
    for keep in (True, False):
        src = _source(summary, cfg, vae, LatentConfig(mode), keep=keep, seed=3)
        runs[keep] = [b["latents"][b["index"].argsort()] for e in range(3) for b in src.iter_epoch(e, 0)]
    for cached, uncached in zip(runs[True], runs[False]):
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)
    same_every_epoch = all(torch.allclose(runs[True][0], x, atol=1e-5) for x in runs[True][1:])
    assert same_every_epoch == (mode != "random")


def test_keys_cover_image_size_crop_flip_and_vae():
    base = cache_key("h", (64, 64), "center", False, "vae")
    assert base == cache_key("h", (64, 64), "center", False, "vae")
    assert len({base, cache_key("h2", (64, 64), "center", False, "vae"),
                cache_key("h", (64, 64), "center", False, "vae2"),
                cache_key("h", (64, 64), "none", False, "vae"),
                cache_key("h", (64, 64), "center", True, "vae"),
                cache_key("h", (32, 32), "center", False, "vae")}) == 6


def test_folder_key_changes_with_the_file(tmp_path):
    import os

    from utils.latents import file_identity

    d = _folder(tmp_path, 1)
    f = d / "00.png"
    before = file_identity(f)
    assert before == file_identity(f) and str(f.resolve()) in before.place
    os.utime(f, ns=(1, 1))
    assert file_identity(f) != before
    assert cache_key(file_identity(f), (64, 64), "center", False, "v") != cache_key(before, (64, 64), "center", False,
                                                                                    "v")


def test_once_samples_follow_the_pictures_not_where_they_lie_or_their_file_times(tmp_path, vae):
    """A copy of the data folder elsewhere, with other file times, trains on the same 'once' samples (the cache keys
    differ: the cache still notices the files changed). With the samples seeded from path and time, every test run's
    fresh files trained a little differently."""
    import os
    import shutil

    d = _folder(tmp_path, 3)
    copy = tmp_path / "elsewhere" / "imgs"
    shutil.copytree(d, copy)
    for f in copy.iterdir():
        os.utime(f, ns=(10**18, 10**18))
    runs = []
    for folder in (d, copy):
        cfg = DataConfig(train_data_dir=str(folder), resolution=64)
        runs.append(list(_source(scan_dataset(cfg), cfg, vae, LatentConfig("once"), batch_size=3).iter_epoch(0, 0)))
    (a,), (b,) = runs
    assert torch.equal(a["latents"], b["latents"])
    assert not set(a["latent_keys"]) & set(b["latent_keys"])


def test_disk_cache_shared_by_ranks_each_encodes_what_it_sees(tmp_path, vae):
    d = _folder(tmp_path, 4)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    summary = scan_dataset(cfg)
    lcfg = LatentConfig("once", cache_dir=str(tmp_path / "c"))
    counts, seen = [], []
    for rank in range(2):
        c = CountingVAE(vae)
        src = _source(summary, cfg, c, lcfg, batch_size=1, rank=rank, world_size=2)
        seen.append({int(i) for b in src.iter_epoch(0, 0) for i in b["index"]})
        counts.append(c.images)
        assert len(src.encoder.store.memory) == 0  # on disk only
    assert counts == [2, 2] and not seen[0] & seen[1]  # each rank encoded only its own images
    later = CountingVAE(vae)  # epoch 1: ranks meet each other's images, already on disk
    for rank in range(2):
        list(_source(summary, cfg, later, lcfg, batch_size=1, rank=rank, world_size=2).iter_epoch(1, 0))
    assert later.images == 0


def test_memory_cache_holds_only_what_the_rank_saw(tmp_path, vae):
    d = _folder(tmp_path, 6)
    cfg = DataConfig(train_data_dir=str(d), resolution=64)
    summary = scan_dataset(cfg)
    src = _source(summary, cfg, vae, LatentConfig("once"), batch_size=1, rank=1, world_size=3)
    keys = {k for b in src.iter_epoch(0, 0) for k in b["latent_keys"]}
    assert set(src.encoder.store.memory) == keys and len(keys) == 2


def test_alpha_weights_with_cached_latents(tmp_path, vae):
    d = tmp_path / "a"
    d.mkdir()
    rgba = np.full((64, 128, 4), 120, np.uint8)
    rgba[:, 64:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(d / "x.png")
    cfg = DataConfig(train_data_dir=str(d), width=128, height=64, use_alpha_as_loss_weight=True)
    summary = scan_dataset(cfg)
    lcfg = LatentConfig("deterministic", cache_dir=str(tmp_path / "c"))
    first = next(_source(summary, cfg, vae, lcfg, batch_size=1).iter_epoch(0, 0))
    counting = CountingVAE(vae)
    b = next(_source(summary, cfg, counting, lcfg, batch_size=1).iter_epoch(0, 0))  # read back from disk
    assert counting.images == 0
    assert b["latents"].shape == (1, 4, 8, 16) and b["loss_weights"].shape == (1, 1, 8, 16)
    assert torch.equal(b["loss_weights"], first["loss_weights"]) and torch.equal(b["latents"], first["latents"])
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
    src = _source(summary, cfg, counting, LatentConfig("deterministic", cache_dir=str(tmp_path / "c")),
                  PromptConfig(caption_only=True), batch_size=1)
    got = [b for e in range(2) for b in src.iter_epoch(e, 0)]  # two epochs, the VAE only in the first
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


def test_every_part_of_a_plan_is_in_its_key():
    """Image (content and source size), training size, crop mode, flip and VAE each change the key; nothing else does.
    (The resize size follows from source size, training size and crop mode, so two plans cannot differ in it alone.)"""
    base = ("img@100x80", (64, 64), "center", False, "vae")
    key = cache_key(*base)
    assert key == cache_key(*base)
    for i, other in enumerate(("img@100x81", (64, 72), "none", True, "vae2")):
        changed = list(base)
        changed[i] = other
        assert cache_key(*changed) != key, f"part {i} of the plan is not in the key"

# ---- the VAE's identity: what decides whether a disk cache may be reused ----------------------------------------

def _small_vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, **config)


def test_one_vae_loaded_twice_shares_its_identity_other_vaes_never(tmp_path):
    """The same VAE saved and loaded from two folders keeps one identity (the loader's bookkeeping keys, such as the
    folder it came from, are not part of it); another config, dtype, class or model name each give another."""
    from diffusers import AutoencoderKL

    vae = _small_vae()
    for name in ("a", "b"):
        vae.save_pretrained(tmp_path / name)
    a, b = (AutoencoderKL.from_pretrained(tmp_path / n) for n in ("a", "b"))
    assert a.config["_name_or_path"] != b.config["_name_or_path"]
    assert vae_identity(a, "m") == vae_identity(b, "m") == vae_identity(vae, "m")

    class OtherVAE(AutoencoderKL):
        pass

    others = [vae_identity(_small_vae(scaling_factor=0.13025), "m"),
              vae_identity(_small_vae().to(torch.float16), "m"),
              vae_identity(OtherVAE(**{k: v for k, v in vae.config.items() if not k.startswith("_")}), "m"),
              vae_identity(vae, "other-model-hash")]
    assert len({vae_identity(vae, "m"), *others}) == 5


def test_vae_identity_reads_any_config_dict_or_none():
    """Config key order does not matter; a value JSON cannot write (a dtype) still counts; no config at all works."""
    from types import SimpleNamespace as NS

    def ident(config, dtype=torch.float32):
        return vae_identity(NS(config=config, dtype=dtype), "m")

    assert ident({"a": 1, "b": 2}) == ident({"b": 2, "a": 1})
    assert ident({"a": 1}) != ident({"a": 2})  # the config's values count, not only its underscore keys
    assert ident({"a": 1, "_x": 1}) == ident({"a": 1, "_x": 2})
    assert ident({"upcast": torch.float16}) != ident({"upcast": torch.bfloat16})
    assert ident({}, torch.float16) != ident({}, torch.bfloat16)
    assert vae_identity(torch.nn.Identity(), "m") == vae_identity(torch.nn.Identity(), "m")


def test_for_vae_takes_scaling_and_shift_from_the_vae_config():
    """diffusers' config (a dict that also has attributes), a plain dict, an attribute object; SD-1's 0.18215 and no
    shift when the config does not say."""
    from types import SimpleNamespace as NS

    lcfg = LatentConfig("deterministic")
    given = {"scaling_factor": 0.5, "shift_factor": 0.25}
    for vae in (_small_vae(**given), NS(config=given), NS(config=NS(**given))):
        store = LatentStore.for_vae(vae, lcfg)
        assert (store.scaling_factor, store.shift_factor) == (0.5, 0.25)
    for vae in (NS(config={}), NS(config=NS())):
        store = LatentStore.for_vae(vae, lcfg)
        assert (store.scaling_factor, store.shift_factor) == (0.18215, 0.0)
    assert LatentStore.for_vae(NS(config={}), lcfg).keep  # kept unless told not to


def test_the_store_key_covers_the_crop_mode():
    store = LatentStore("once", 1.0, identity="v")
    assert store.key("img", (64, 64), "center", False) != store.key("img", (64, 64), "none", False)
    assert store.key("img", (64, 64), "center", False) == cache_key("img", (64, 64), "center", False, "v")


def test_bad_sampling_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="latent_sampling must be one of .*'sometimes'"):
        LatentConfig("sometimes")
    with pytest.raises(ValueError, match="latent_sampling must be one of .*'sometimes'"):
        LatentStore("sometimes", 1.0)


def test_training_sizes_differing_in_either_side_have_their_own_keys():
    sizes = [(64, 64), (64, 96), (96, 64), (96, 96)]
    assert len({cache_key("img", size, "center", False, "v") for size in sizes}) == 4


# ---- the disk cache's files -----------------------------------------------------------------------------------

def test_a_cache_file_without_sizes_reads_and_one_without_std_is_encoded_again(tmp_path):
    from safetensors.torch import save_file

    store = LatentStore("deterministic", 1.0, cache_dir=tmp_path)
    mean, std = torch.randn(4, 2, 2), torch.rand(4, 2, 2)
    bare, broken = "aa" * 20, "bb" * 20
    for key, tensors in ((bare, {"mean": mean, "std": std}), (broken, {"mean": mean})):
        store._path(key).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(store._path(key)))  # no metadata at all
    entry = store.lookup(bare)
    assert entry is not None and entry.sizes == {} and torch.equal(entry.mean, mean)
    assert store.lookup(broken) is None


def test_get_random_mode_values_and_a_missing_key(tmp_path):
    """``get`` in random mode: ((mean + std·ε) - shift)·scale with ε from the caller's generator."""
    mean, std = torch.randn(4, 2, 3), torch.rand(4, 2, 3) + 0.5
    key = "cd" * 20
    for cache_dir in (None, tmp_path / "c"):
        store = LatentStore("random", 2.0, shift_factor=0.25, cache_dir=cache_dir)
        store.put(key, mean, std)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(store.get(key, torch.Generator().manual_seed(7)), (mean + std * eps - 0.25) * 2.0)
        with pytest.raises(KeyError, match="ef" * 20):
            store.get("ef" * 20)


# ---- LatentEncoder.complete on its own ---------------------------------------------------------------------------

def _pixels(n):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_complete_without_slots_or_keys_encodes_all_and_keeps_nothing(tmp_path, vae):
    """A batch with only pixels (slots and keys default): every row encoded and drawn with its seed, nothing stored."""
    store = LatentStore("random", 0.5, cache_dir=tmp_path / "c")
    pixels = _pixels(2)
    got = LatentEncoder(vae, store).complete({"pixel_values": pixels}, [5, 6])
    for i, seed in enumerate((5, 6)):
        mean, std = encode_pixels(vae, pixels[i:i + 1])
        eps = torch.randn(mean[0].shape, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got[i], (mean[0] + std[0] * eps) * 0.5, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "c").exists() and not store.memory


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("mode", ["once", "random"])
def test_complete_uses_an_entry_stored_meanwhile(tmp_path, vae, mode, disk):
    """A DataLoader worker's view of the memory cache is older than the trainer's: an image it sends as pixels may have
    been encoded meanwhile. It is then drawn from the store (with its key and its use's seed), not encoded again."""
    store = LatentStore(mode, 0.5, cache_dir=tmp_path / "c" if disk else None)
    key = "12" * 20
    mean, std = torch.randn(4, 8, 8), torch.rand(4, 8, 8) + 0.5
    store.put(key, mean, std)
    counting = CountingVAE(vae)
    got = LatentEncoder(counting, store).complete(
        {"pixel_values": _pixels(1), "pixel_slots": [0], "latent_keys": [key]}, [9])
    assert counting.images == 0
    if mode == "once":  # the image's one sample
        assert torch.equal(got[0], LatentStore("once", 0.5).draw(Entry(mean, std, None, {}), key))
    else:  # a fresh sample from this use's seed
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(got[0], (mean + std * eps) * 0.5)


def test_complete_encodes_again_when_the_stored_entry_lacks_the_loss_weight(tmp_path, vae):
    store = LatentStore("deterministic", 1.0, cache_dir=tmp_path)
    key = "34" * 20
    store.put(key, torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))  # cached before --use_alpha_as_loss_weight
    counting = CountingVAE(vae)
    weight = torch.ones(1, 8, 8)
    LatentEncoder(counting, store).complete(
        {"pixel_values": _pixels(1), "pixel_slots": [0], "latent_keys": [key], "loss_weights": weight[None]}, [0])
    assert counting.images == 1
    assert torch.equal(store.lookup(key, need_weight=True).weight, weight)


@pytest.mark.parametrize("cache_dir", [None, "disk"])
@pytest.mark.parametrize("mode", ["once", "deterministic", "random"])
def test_a_kept_entry_keeps_its_loss_weight_and_sizes(tmp_path, mode, cache_dir):
    """With --use_alpha_as_loss_weight a cached image must come back with its weight (else it is encoded at every use)
    and with the size conditioning of its geometry (SDXL's time ids)."""
    store = LatentStore(mode, 1.0, cache_dir=tmp_path / "c" if cache_dir else None)
    key, weight = "56" * 20, torch.rand(1, 2, 2)
    sizes = {"original_size": (100, 80), "crop_top_left": (3, 0), "target_size": (64, 64)}
    fresh = store.put(key, torch.randn(4, 2, 2), torch.rand(4, 2, 2), weight, sizes)
    entry = store.lookup(key, need_weight=True)
    assert entry is not None and torch.equal(entry.weight, weight) and entry.sizes == sizes
    assert torch.equal(fresh.weight, weight) and fresh.sizes == sizes


def test_memory_keeps_one_tensor_per_image_except_for_random_and_fills_the_budget_exactly():
    """In memory ``once`` keeps its one sample and ``deterministic`` the mean (one [C,h,w] tensor, as A1111), ``random``
    mean and std; the budget is the most the entries take, so entries that fill it exactly are all kept."""
    mean, std = torch.randn(4, 8, 8), torch.rand(4, 8, 8)
    one = mean.numel() * mean.element_size()
    for mode, tensors in (("once", 1), ("deterministic", 1), ("random", 2)):
        store = LatentStore(mode, 1.0, memory_budget_mb=2 * tensors * one / 2**20)
        for k in range(3):
            store.put(f"{k:02d}" * 20, mean, std)
        assert store.memory_bytes == 2 * tensors * one and len(store.memory) == 2, mode


def test_a_full_memory_cache_warns_once_with_its_size_and_the_way_out(capsys):
    mean, std = torch.zeros(4, 256, 256), torch.zeros(4, 256, 256)  # 1 MB per sample
    store = LatentStore("once", 1.0, memory_budget_mb=2)
    for k in range(4):
        store.put(f"{k:02d}" * 20, mean, std)
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert re.search(r"^warning: the in-memory latent cache reached 2 MB \(2 images\); .* "
                     r"--cache_latents_to_disk DIR keeps them all\.$", err, re.M), err


def test_once_without_a_key_is_refused():
    """A ``once`` sample is seeded by the image's key; drawing one without it is a caller's mistake, said plainly."""
    store = LatentStore("once", 1.0)
    with pytest.raises(ValueError, match="^latent sampling 'once' needs the image's cache key$"):
        store.draw(Entry(torch.zeros(4, 2, 2), torch.ones(4, 2, 2), None, {}), None)


def test_a_vae_given_with_vae_never_shares_the_models_cache_key(tiny_sd1, tmp_path):
    """--vae replaces the model's VAE with one of the same class and config: its latents must get their own cache
    key (found by reading the code during mutation testing: only the model's hash reached the key)."""
    from diffusers import AutoencoderKL

    from utils.latents import model_vae_identity
    from utils.models import ModelSource, load_pipeline

    own = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae")
    own.save_pretrained(tmp_path / "same")
    with torch.no_grad():
        own.encoder.conv_in.weight.mul_(1.5)
    own.save_pretrained(tmp_path / "other")

    def key(vae_dir=None) -> str:
        loaded = load_pipeline(ModelSource(str(tiny_sd1), vae=None if vae_dir is None else str(vae_dir)),
                               torch.float32)
        assert loaded.vae_source == (None if vae_dir is None else str(vae_dir))
        return model_vae_identity(loaded.pipeline.vae, loaded.identity.sha256 or loaded.identity.name,
                                  loaded.vae_source)

    plain, other = key(), key(tmp_path / "other")
    assert plain != other  # same class, config and dtype: only the --vae source tells them apart
    assert key(tmp_path / "other") == other  # and the same --vae twice keeps one key
    assert key(tmp_path / "same") != plain  # a copy elsewhere counts as another VAE: a re-encode, never a wrong hit
    assert key(tmp_path / "same") != other  # two --vae folders with other weights never share


def test_a_vae_sources_identity_follows_its_files(tiny_sd1, tmp_path):
    """model_vae_identity for each form of --vae: a single file and a folder go in by their files (another file, or
    a file inside the folder touched, is another identity), a Hub id by its name; the VAE's config always counts."""
    import os

    from diffusers import AutoencoderKL

    from utils.latents import model_vae_identity

    vae = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    folder = tmp_path / "vae"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.safetensors").write_bytes(b"w")

    def ident(source=None, model="m", v=vae):
        return model_vae_identity(v, model, None if source is None else str(source))

    first = {name: ident(src) for name, src in (("none", None), ("a", a), ("b", b), ("folder", folder),
                                                 ("hub-x", "org/vae-x"), ("hub-y", "org/vae-y"))}
    assert len(set(first.values())) == 6
    assert ident(a) == first["a"] and ident(folder) == first["folder"] and ident("org/vae-x") == first["hub-x"]
    os.utime(a, ns=(1, 1))
    os.utime(folder / "sub" / "w.safetensors", ns=(1, 1))  # a file inside, not the folder itself
    assert ident(a) != first["a"] and ident(folder) != first["folder"]
    other_config = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae", scaling_factor=0.5)
    assert ident(folder, v=other_config) != ident(folder)
