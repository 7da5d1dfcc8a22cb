"""``python -m utils.embeddings create|inspect|convert``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils.embeddings import Embedding, checksum, load_embedding, main, save_diffusers_sdxl

ROOT = Path(__file__).resolve().parent.parent


def _run_main(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _token_table(model: Path, suffix: str = "") -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if suffix else CLIPTextModel
    return cls.from_pretrained(model / f"text_encoder{suffix}").get_input_embeddings().weight.detach()


def _ids(model: Path, text: str, suffix: str = "") -> list[int]:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(model / f"tokenizer{suffix}")(text, add_special_tokens=False)["input_ids"]


def test_inspect_fixture(a1111_fixtures, capsys):
    code, out, err = _run_main(["inspect", a1111_fixtures / "bad-prompt.pt"], capsys)
    assert code == 0 and err == ""
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert {k: v.strip() for k, v in lines.items()} == {
        "file": str(a1111_fixtures / "bad-prompt.pt"), "format": "a1111", "name": "bad-prompt", "vectors": "16",
        "width": "768", "step": "8000", "sd_checkpoint": "74906b9a", "sd_checkpoint_name": "Novel50WD50",
        "sha256": "f9dfe1c982e2", "checksum": "1d99", "stored_name": "bad_prompt"}


def test_inspect_json_and_bad_files(a1111_fixtures, capsys):
    files = [a1111_fixtures / "test_embedding.png", a1111_fixtures / "empty.pt", a1111_fixtures / "learned_embeds.bin"]
    code, out, err = _run_main(["inspect", "--json", *files], capsys)
    infos = [json.loads(line) for line in out.strip().splitlines()]
    assert [(i["name"], i["vectors"], i["checksum"], i["format"]) for i in infos] == [
        ("rick", 8, "b59e", "png-text"), ("learned_embeds", 1, "7e9c", "diffusers")]
    assert infos[1]["token"] == "<birb-style>"
    assert code == 2  # one file was bad: reported on one line, the others still shown
    assert err.count("\n") == 2 and "empty.pt" in err.splitlines()[0] and "1 of 3 files" in err


def test_create_sd1_like_a1111(tiny_sd1, tmp_path, capsys):
    code, out, err = _run_main(["create", "--pretrained_model_name_or_path", tiny_sd1, "--name", "my/cat*",
                                "--init_text", "a photo", "--num_vectors", 3, "--embeddings_dir", tmp_path], capsys)
    assert code == 0, err
    emb = load_embedding(tmp_path / "mycat.pt")
    raw = torch.load(tmp_path / "mycat.pt", weights_only=True)
    assert raw["name"] == "mycat" and raw["step"] == 0 and raw["sd_checkpoint"] is None
    ids = _ids(tiny_sd1, "a photo")
    assert torch.equal(emb.vectors, _token_table(tiny_sd1)[[ids[0], ids[0], ids[1]]])
    # exists: refused unless --overwrite
    argv = ["create", "--pretrained_model_name_or_path", tiny_sd1, "--name", "mycat", "--init_text", "",
            "--embeddings_dir", tmp_path]
    code, _, err = _run_main(argv, capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert torch.equal(load_embedding(tmp_path / "mycat.pt").vectors, emb.vectors)
    code, _, _ = _run_main(argv + ["--overwrite"], capsys)
    assert code == 0
    assert torch.equal(load_embedding(tmp_path / "mycat.pt").vectors, torch.zeros(1, emb.width))


def test_create_bad_inputs(tiny_sd1, tmp_path, capsys):
    base = ["create", "--pretrained_model_name_or_path", tiny_sd1, "--embeddings_dir", tmp_path]
    for extra, message in [
        (["--name", "x", "--num_vectors", "76"], "1..75"),
        (["--name", "???"], "no usable characters"),
        (["--name", "x", "--output", tmp_path / "x.txt"], "extension"),
    ]:
        code, _, err = _run_main(base + extra, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = _run_main(["create", "--pretrained_model_name_or_path", tmp_path, "--name", "x"], capsys)
    assert code == 2 and "not a diffusers pipeline" in err
    assert list(tmp_path.iterdir()) == []


def test_create_sdxl(tiny_sdxl, tmp_path, capsys):
    code, _, err = _run_main(["create", "--pretrained_model_name_or_path", tiny_sdxl, "--name", "xl",
                              "--init_text", "cat", "--num_vectors", 2, "--embeddings_dir", tmp_path], capsys)
    assert code == 0, err
    raw = load_file(tmp_path / "xl.safetensors")
    cat = _ids(tiny_sdxl, "cat")[0]
    assert torch.equal(raw["clip_l"], _token_table(tiny_sdxl)[[cat, cat]])
    assert torch.equal(raw["clip_g"], _token_table(tiny_sdxl, "_2")[[cat, cat]])


def test_convert_chain_keeps_vectors(a1111_fixtures, tmp_path, capsys):
    src = load_embedding(a1111_fixtures / "bad-hands-5.pt")
    chain = [a1111_fixtures / "bad-hands-5.pt", tmp_path / "card.png", tmp_path / "k.safetensors",
             tmp_path / "d.safetensors", tmp_path / "d.bin", tmp_path / "bad-hands-5.pt"]
    formats = [None, "kohya", "diffusers", None, None]
    for (a, b), fmt in zip(zip(chain, chain[1:]), formats):
        code, out, err = _run_main(["convert", a, b] + (["--format", fmt] if fmt else []), capsys)
        assert code == 0, err
        back = load_embedding(b)
        assert torch.equal(back.vectors, src.vectors) and checksum(back) == "c854"
    assert list(load_file(tmp_path / "k.safetensors")) == ["emb_params"]
    assert list(load_file(tmp_path / "d.safetensors")) == ["<d>"]  # stored name = the output's stem
    card = load_embedding(tmp_path / "card.png")
    assert (card.name, card.step, card.sd_checkpoint) == ("bad-hands-5", 1419, "5d2f8777af")
    final = torch.load(tmp_path / "bad-hands-5.pt", weights_only=True)
    assert final["string_to_token"] == {"*": 265} and final["name"] == "bad-hands-5"


def test_convert_png_name_and_refusals(a1111_fixtures, tmp_path, capsys):
    code, _, err = _run_main(["convert", a1111_fixtures / "learned_embeds.bin", tmp_path / "birb.png",
                              "--name", "birb"], capsys)
    assert code == 0, err
    assert load_embedding(tmp_path / "birb.png").name == "birb"
    code, _, err = _run_main(["convert", a1111_fixtures / "learned_embeds.bin", tmp_path / "birb.png"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = _run_main(["convert", a1111_fixtures / "empty.pt", tmp_path / "e.safetensors"], capsys)
    assert code == 2 and "empty.pt" in err and err.count("\n") == 1
    code, _, err = _run_main(["convert", tmp_path / "missing.pt", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "no such file" in err


def test_convert_diffusers_sdxl_pair_to_kohya_and_back(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    xl = Embedding("web", {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)})
    first, second = save_diffusers_sdxl(xl, tmp_path / "learned_embeds.safetensors")
    code, _, err = _run_main(["convert", first, tmp_path / "web.safetensors", "--input_2", second], capsys)
    assert code == 0, err
    raw = load_file(tmp_path / "web.safetensors")
    assert torch.equal(raw["clip_l"], xl.vectors["clip_l"]) and torch.equal(raw["clip_g"], xl.vectors["clip_g"])
    code, _, err = _run_main(["convert", tmp_path / "web.safetensors", tmp_path / "out" / "te.safetensors",
                              "--format", "diffusers-sdxl"], capsys)
    assert code == 0, err
    assert torch.equal(load_file(tmp_path / "out" / "te_2.safetensors")["<te>"], xl.vectors["clip_g"])
    code, _, err = _run_main(["convert", tmp_path / "web.safetensors", tmp_path / "web.png"], capsys)
    assert code == 2 and "SD-1/SD-2" in err
    save_file({"<a>": torch.ones(2, 768)}, tmp_path / "a.safetensors")
    save_file({"<a>": torch.ones(3, 1280)}, tmp_path / "b.safetensors")
    code, _, err = _run_main(["convert", tmp_path / "a.safetensors", tmp_path / "ab.safetensors",
                              "--input_2", tmp_path / "b.safetensors"], capsys)
    assert code == 2 and "3 vectors" in err


def test_help(capsys):
    code, out, _ = _run_main(["convert", "--help"], capsys)
    assert code == 0
    for flag in ("--input_2", "--format", "--name", "--token", "--padding", "--overwrite"):
        assert flag in out
    code, out, _ = _run_main(["create", "--help"], capsys)
    assert code == 0 and "--pretrained_model_name_or_path" in out and "--num_vectors" in out


def test_subprocess_one_line_error(a1111_fixtures):
    failed = subprocess.run([sys.executable, "-m", "utils.embeddings", "inspect", str(a1111_fixtures / "empty.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("python -m utils.embeddings: error:")
