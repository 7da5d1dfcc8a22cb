"""Checkpoint / file hashes as A1111 computes them (docs/a1111-rules.md, "Hashes and checksums", "Model hashes") and the
model identity built on them."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from utils.hashes import (
    ModelIdentity,
    checkpoint_name,
    folder_weight_files,
    folder_weights_hash,
    legacy_model_hash,
    model_identity,
    sha256_file,
)

# From ../shared/fixtures/a1111/SOURCES.md (computed by the people who collected the files, not by this code).
FIXTURE_SHA256 = {
    "test_embedding.png": "ceb3de4098040013be6ce7169b0c0e67c2de86a8cfb43d02b16013f6af2d352e",
    "bad-hands-5.pt": "01b60bdcc335d0cff652ee8aaedbd93bdc7f043ba5f2f255f2d134ec419834c7",
    "bad-artist.pt": "2d356134903e8f47bf6cf519bdf577cdcee42fc717ef264498162e94f130843a",
    "bad-prompt.pt": "f9dfe1c982e2a1917054fa827ee1f981c6e6102984f981c691e4f8c817e292cb",
    "bad_prompt_version2.pt": "6f35e7dd816ae04bb3f774a9a17ebfbc50c0e3a53f69a9a40bed05936d3a3812",
    "eyeliner2.pt": "0307971abab2748d19abce1dedaf20908c139c8ad668aacef3e2be82b27d3a1b",
    "EasyNegative.safetensors": "c74b4e810b030f6b75fde959e2db678c268d07115b85356d3c0138ba5eb42340",
    "learned_embeds.bin": "f2e23a8f2d3628ed77acb8151751ecd4efc4017e8da86bc29af10f855ca308d9",
}
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDFORGE_CACHE", str(tmp_path / "cache"))


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 997) % 256 for i in range(n))


@pytest.mark.parametrize("name", sorted(FIXTURE_SHA256))
def test_sha256_of_real_fixtures(a1111_fixtures, name):
    assert sha256_file(a1111_fixtures / name) == FIXTURE_SHA256[name]
    assert sha256_file(a1111_fixtures / name, use_cache=False) == FIXTURE_SHA256[name]


def test_identity_of_a_real_file(a1111_fixtures):
    ident = model_identity(a1111_fixtures / "bad-hands-5.pt")
    assert ident == ModelIdentity("bad-hands-5", FIXTURE_SHA256["bad-hands-5.pt"], "01b60bdcc3",
                                  hashlib.sha256(b"").hexdigest()[:8])  # 7 KB: nothing at the 1 MiB offset
    assert ident.title == "bad-hands-5 [01b60bdcc3]"


def test_legacy_hash_reads_64k_at_one_mib(tmp_path):
    data = _pattern(MIB + 300_000)
    f = tmp_path / "model.ckpt"
    f.write_bytes(data)
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_model_hash(f) == expected
    # changing a byte outside the window leaves it alone, inside changes it
    f.write_bytes(b"\xff" + data[1:])
    assert legacy_model_hash(f) == expected
    f.write_bytes(data[:0x100000 + 5] + b"\x00\x01" + data[0x100000 + 7:])
    assert legacy_model_hash(f) != expected


def test_legacy_hash_of_short_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"x" * 1000)
    assert legacy_model_hash(short) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"
    partial = tmp_path / "partial.safetensors"
    data = _pattern(MIB + 100)  # only 100 bytes past the offset
    partial.write_bytes(data)
    assert legacy_model_hash(partial) == hashlib.sha256(data[MIB:]).hexdigest()[:8]
    assert legacy_model_hash(tmp_path / "missing.ckpt") == "NOFILE"


def test_identity_of_single_file(tmp_path):
    data = _pattern(MIB + 70_000)
    f = tmp_path / "my model v1.safetensors"
    f.write_bytes(data)
    ident = model_identity(f)
    full = hashlib.sha256(data).hexdigest()
    assert ident.name == "my model v1"
    assert (ident.sha256, ident.shorthash) == (full, full[:10])
    assert ident.legacy_hash == hashlib.sha256(data[MIB:MIB + 0x10000]).hexdigest()[:8]
    assert checkpoint_name("models/sub\\dir\\x.ckpt") == "sub_dir_x"  # Windows separators inside a name
    assert checkpoint_name("a\\b.ckpt") == "a_b"
    with pytest.raises(FileNotFoundError):
        model_identity(tmp_path / "nope.safetensors")


def test_large_file_hash_is_cached_on_disk_and_follows_changes(tmp_path):
    f = tmp_path / "big.safetensors"
    data = _pattern(17 * MIB // 64) * 64
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    cache = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert list(cache.values()) == [hashlib.sha256(data).hexdigest()]
    # same size, new content and mtime: the cache key changes, so the new hash is computed
    data2 = b"\x00" + data[1:]
    f.write_bytes(data2)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10_000_000))
    assert sha256_file(f) == hashlib.sha256(data2).hexdigest()


def _fake_pipeline_folder(root):
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "config.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet32")
    (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"unet16")
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"unet-pickle")
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae32")
    return root


def test_folder_hash_counts_only_the_loaded_weights(tmp_path):
    folder = _fake_pipeline_folder(tmp_path / "my-model")
    rel = lambda files: [f.relative_to(folder).as_posix() for f in files]  # noqa: E731
    assert rel(folder_weight_files(folder)) == ["unet/diffusion_pytorch_model.safetensors",
                                                "vae/diffusion_pytorch_model.safetensors"]
    # the vae has no fp16 file: diffusers falls back to the plain one, and so do we
    assert rel(folder_weight_files(folder, "fp16")) == ["unet/diffusion_pytorch_model.fp16.safetensors",
                                                        "vae/diffusion_pytorch_model.safetensors"]
    expected = hashlib.sha256()
    for name, content in (("unet/diffusion_pytorch_model.safetensors", b"unet32"),
                          ("vae/diffusion_pytorch_model.safetensors", b"vae32")):
        expected.update(name.encode())
        expected.update(hashlib.sha256(content).digest())
    assert folder_weights_hash(folder) == expected.hexdigest()

    ident = model_identity(folder)
    assert ident == ModelIdentity("my-model", expected.hexdigest(), expected.hexdigest()[:10], None)
    assert model_identity(folder, "fp16").sha256 != ident.sha256
    (folder / "unet" / "config.json").write_text('{"changed": 1}')  # configs are not weights
    assert model_identity(folder) == ident
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae32-retrained")
    assert model_identity(folder).sha256 != ident.sha256
