"""Every file the trainers write loads in the real tools, checked by the tools' own reader code.

A1111, ComfyUI and kohya run from ../shared/clients (see tests/client_readers.py for what is stubbed: only UI, device
and global-state modules), diffusers is the installed library. The files come from real trainer runs on the tiny
models (and from our writers directly, for every hypernetwork option). Values must be exactly what we saved;
hypernetworks must give our outputs on the same input, except for the documented ComfyUI bugs, which are asserted as
documented. The other way round, files written by A1111's and kohya's own savers must load in ours.

The README's compatibility table is generated from ``CASES`` (one test per cell, "no" cells included):
``test_readme_compatibility_table`` fails, printing the expected text, when the two disagree.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from client_readers import A1111, ComfyUI, Kohya
from utils.embeddings import Embedding, load_embedding
from utils.hypernetwork import (
    Hypernetwork,
    HypernetworkModule,
    HypernetworkOptions,
    load_hypernetwork,
    load_optimizer_sidecar,
    save_hypernetwork,
)

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiger"  # a word CLIP's vocabulary already has: the awkward case for diffusers
HN_NAME = "tiger-hn"
COMFY_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")


# =====================================================================================================================
# Trainer runs (tiny models, 2 steps, every output option on)


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy()).save(folder / f"{i:02d}.png")
    return folder


def _run(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


COMMON = ["--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2", "--save_every", "2",
          "--checkpointing_steps", "0", "--save_optimizer_state"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ti_run(tiny_sd1, data_dir, tmp_path_factory):
    """SD-1 embedding 'tiger': final .pt/.safetensors/learned_embeds(.bin)/.pt.optim, the step-2 copies and PNG card."""
    import train_textual_inversion

    out = tmp_path_factory.mktemp("ti")
    printed = _run(train_textual_inversion.main, [
        "--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(data_dir), "--output_dir", str(out),
        "--placeholder_token", NAME, "--initializer_token", "object", "--num_vectors", "2", "--learning_rate", "0.05",
        "--save_image_embeddings", "--no_safe_serialization", "--preview_every", "2", "--preview_steps", "1",
        *COMMON])
    [vectors] = load_file(out / "learned_embeds.safetensors").values()  # what the run saved, read by safetensors
    [step2] = load_file(out / "embeddings" / f"{NAME}-2.safetensors").values()
    return SimpleNamespace(out=out, printed=printed, vectors=vectors, step2=step2)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, data_dir, tmp_path_factory):
    import train_textual_inversion

    out = tmp_path_factory.mktemp("sdxl")
    _run(train_textual_inversion.main, [
        "--pretrained_model_name_or_path", str(tiny_sdxl), "--train_data_dir", str(data_dir), "--output_dir", str(out),
        "--placeholder_token", NAME, "--initializer_token", "object", "--num_vectors", "2", "--learning_rate", "0.05",
        "--no_previews", *COMMON])
    return SimpleNamespace(out=out, vectors=load_file(out / f"{NAME}.safetensors"))


@pytest.fixture(scope="module")
def hn_run(tiny_sd1, data_dir, tmp_path_factory):
    import train_hypernetwork

    out = tmp_path_factory.mktemp("hn")
    _run(train_hypernetwork.main, [
        "--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(data_dir), "--output_dir", str(out),
        "--hypernetwork_name", HN_NAME, "--activation_func", "relu", "--learning_rate", "0.01", "--no_previews",
        *COMMON])
    return SimpleNamespace(out=out, pt=out / f"{HN_NAME}.pt")


# =====================================================================================================================
# The clients


@pytest.fixture(scope="module")
def a1111(shared_clients, tmp_path_factory) -> A1111:
    return A1111(shared_clients, tmp_path_factory.mktemp("a1111-embeddings"))


@pytest.fixture(scope="module")
def comfy(shared_clients, tiny_sd1, tmp_path_factory) -> ComfyUI:
    return ComfyUI(shared_clients, tiny_sd1 / "tokenizer", tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="module")
def kohya(shared_clients) -> Kohya:
    return Kohya(shared_clients)


def _text_side(model: Path, suffix: str = ""):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cls = CLIPTextModelWithProjection if suffix else CLIPTextModel
    return (CLIPTokenizer.from_pretrained(model / f"tokenizer{suffix}"),
            cls.from_pretrained(model / f"text_encoder{suffix}").get_input_embeddings())


@pytest.fixture(scope="module")
def sd1_text(tiny_sd1):
    return _text_side(tiny_sd1)


@pytest.fixture(scope="module")
def sdxl_text(tiny_sdxl):
    return _text_side(tiny_sdxl), _text_side(tiny_sdxl, "_2")


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


def _folder(tmp_path: Path, *files: Path, rename: dict | None = None) -> Path:
    """A fresh embeddings folder holding copies of ``files`` (a client scans everything in it)."""
    folder = tmp_path / "embeddings"
    folder.mkdir(exist_ok=True)
    for f in files:
        shutil.copy(f, folder / (rename or {}).get(f.name, f.name))
    return folder


# =====================================================================================================================
# The table: one case per (file kind, client); the README's table is generated from it


KINDS = {
    "emb-pt": "embedding `<name>.pt`, `embeddings/<name>-<step>.pt` (A1111 layout)",
    "emb-safetensors": "embedding `<name>.safetensors`, `learned_embeds.safetensors` (diffusers layout)",
    "emb-bin": "embedding `learned_embeds.bin` (`--no_safe_serialization`)",
    "emb-png": "PNG card `image_embeddings/<name>-<step>.png`",
    "emb-optim": "`<name>.pt.optim` of an embedding (`--save_optimizer_state`)",
    "emb-kohya": "kohya layout `emb_params` (`python -m tools.embeddings convert --format kohya`)",
    "sdxl-safetensors": "SDXL embedding `<name>.safetensors` (`clip_l` + `clip_g`)",
    "sdxl-diffusers": "SDXL `learned_embeds.safetensors` + `learned_embeds_2.safetensors`",
    "hn-pt": "hypernetwork `<name>.pt`, `hypernetworks/<name>-<step>.pt`",
    "hn-optim": "`<name>.pt.optim` of a hypernetwork (`--save_optimizer_state`)",
    "hn-safetensors": "hypernetwork `<name>.safetensors`",
}
CLIENTS = ("A1111", "ComfyUI", "kohya", "diffusers")
NOTES = {
    1: "`load_textual_inversion` takes the stored name as its token; a name that is already a vocabulary word "
       "(`tiger`) needs `token=\"<tiger>\"`.",
    2: "the token `<name>` is stored in the file: `pipe.load_textual_inversion(\"learned_embeds.safetensors\")`, then "
       "write `<name>` in prompts.",
    3: "A1111 resumes training from it (value checksum / file hash match; the state fits its optimizer).",
    4: "one call per text encoder with the same token (recipe in docs/sdxl.md).",
    5: "pass `token=`: the key of this layout is `emb_params`.",
    6: "ComfyUI knows only the activations linear, relu, leakyrelu, elu, swish, tanh, sigmoid, softsign and mish "
       "(other files are refused); with layer norm it builds a different network (the ComfyUI LayerNorm bug, below); "
       "and it keeps dropout active while generating.",
    7: "kohya reads only the NovelAI layout: layer structure 1, 2, 1, linear activation, no layer norm, no dropout, "
       "widths among 320, 640, 768, 1280 (`finetune/hypernetwork_nai.py`); any other file is refused with an error.",
    8: "each file holds one encoder's vectors; use `<name>.safetensors` (`clip_l` + `clip_g`).",
    9: "listed in ComfyUI's hypernetworks folder, but it applies nothing (its loader only reads the A1111 `.pt` "
       "keys); use the `.pt`.",
}
CASES: dict[tuple[str, str], tuple[str, object]] = {}


def case(kind: str, client: str, cell: str):
    assert kind in KINDS and client in CLIENTS

    def register(check):
        CASES[(kind, client)] = (cell, check)
        return check
    return register


def compatibility_table() -> str:
    """The README block: the table, then its notes."""
    lines = ["| file | " + " | ".join(CLIENTS) + " |", "|---|" + "---|" * len(CLIENTS)]
    for kind, label in KINDS.items():
        cells = [CASES[(kind, c)][0] if (kind, c) in CASES else "—" for c in CLIENTS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{n}. {text}" for n, text in NOTES.items()]
    return "\n".join(lines)


def test_readme_compatibility_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = compatibility_table()
    assert table in readme, f"README.md must contain the compatibility table generated from the tests:\n\n{table}\n"


# =====================================================================================================================
# A1111


def _a1111_sd1(ctx) -> A1111:
    a = ctx.get("a1111")
    tokenizer, table = ctx.get("sd1_text")
    a.use_model(tokenizer, [table])
    a.reports.clear()
    return a


def _a1111_loads(a: A1111, folder: Path, expected: dict[str, torch.Tensor | dict]) -> dict:
    db = a.load_embeddings(folder)
    assert not a.reports, a.reports
    assert sorted(db.word_embeddings) == sorted(expected) and not db.skipped_embeddings
    for name, values in expected.items():
        vec = db.word_embeddings[name].vec
        if isinstance(values, dict):
            assert vec.keys() == values.keys() and all(torch.equal(vec[k], values[k]) for k in values)
        else:
            assert torch.equal(vec, values)
    return db.word_embeddings


@case("emb-pt", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("ti_run"), _a1111_sd1(ctx)
    found = _a1111_loads(a, _folder(ctx.tmp_path, run.out / f"{NAME}.pt", run.out / "embeddings" / f"{NAME}-2.pt"),
                         {NAME: run.vectors, f"{NAME}-2": run.step2})
    assert found[NAME].step == 2 and found[NAME].sd_checkpoint  # the metadata A1111 shows


@case("emb-safetensors", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("ti_run"), _a1111_sd1(ctx)
    _a1111_loads(a, _folder(ctx.tmp_path, run.out / f"{NAME}.safetensors", run.out / "learned_embeds.safetensors"),
                 {NAME: run.vectors, "learned_embeds": run.vectors})


@case("emb-bin", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("ti_run"), _a1111_sd1(ctx)
    _a1111_loads(a, _folder(ctx.tmp_path, run.out / "learned_embeds.bin"), {"learned_embeds": run.vectors})


@case("emb-png", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("ti_run"), _a1111_sd1(ctx)
    card = run.out / "image_embeddings" / f"{NAME}-2.png"
    # The text chunk (what A1111 reads first), then the pixel copy alone (the chunk stripped, as image hosts do).
    _a1111_loads(a, _folder(ctx.tmp_path, card, rename={card.name: "any-file-name.png"}), {f"{NAME}-2": run.step2})
    pixels_only = ctx.tmp_path / "pixels" / "card.png"
    pixels_only.parent.mkdir()
    Image.open(card).save(pixels_only)
    assert "sd-ti-embedding" not in Image.open(pixels_only).info
    _a1111_loads(a, pixels_only.parent, {f"{NAME}-2": run.step2})


@case("emb-optim", "A1111", "yes³")
def _(ctx):
    run, a = ctx.get("ti_run"), _a1111_sd1(ctx)
    emb = _a1111_loads(a, _folder(ctx.tmp_path, run.out / f"{NAME}.pt"), {NAME: run.vectors})[NAME]
    saved = a.torch_load(run.out / f"{NAME}.pt.optim")  # through the safe check, as A1111's train_embedding does
    assert saved is not None, a.reports
    # A1111's train_embedding: the optimizer state is used when the value checksum matches, loaded into
    # AdamW([embedding.vec]).
    assert emb.checksum() == saved["hash"]
    emb.vec.requires_grad = True
    optimizer = torch.optim.AdamW([emb.vec], lr=0.005, weight_decay=0.0)
    optimizer.load_state_dict(saved["optimizer_state_dict"])
    assert optimizer.state[emb.vec]["exp_avg"].shape == emb.vec.shape


@case("emb-kohya", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("ti_run"), _a1111_sd1(ctx)
    _a1111_loads(a, _folder(ctx.tmp_path, _kohya_layout_file(ctx)), {NAME: run.vectors})


@case("sdxl-safetensors", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("sdxl_run"), ctx.get("a1111")
    (tok, table_l), (_, table_g) = ctx.get("sdxl_text")
    a.use_model(tok, [table_l, table_g])
    a.reports.clear()
    emb = _a1111_loads(a, _folder(ctx.tmp_path, run.out / f"{NAME}.safetensors"), {NAME: run.vectors})[NAME]
    # A1111's EmbeddingsWithFixes splices clip_l into the CLIP-L encoder's tokens and clip_g into OpenCLIP-G's.
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 49407, 49407]])
    for key, table in (("clip_l", table_l), ("clip_g", table_g)):
        hijack = SimpleNamespace(fixes=[[(3, emb)]])
        out = a.sd_hijack.EmbeddingsWithFixes(table, hijack, textual_inversion_key=key)(ids)
        assert torch.equal(out[0, 4:6], run.vectors[key]) and torch.equal(out[0, :4], table(ids)[0, :4])


@case("sdxl-diffusers", "A1111", "no⁸")
def _(ctx):
    run, a = ctx.get("sdxl_run"), ctx.get("a1111")
    (tok, table_l), (_, table_g) = ctx.get("sdxl_text")
    a.use_model(tok, [table_l, table_g])
    db = a.load_embeddings(_folder(ctx.tmp_path, run.out / "learned_embeds.safetensors",
                                   run.out / "learned_embeds_2.safetensors"))
    assert not db.word_embeddings and sorted(db.skipped_embeddings) == ["learned_embeds", "learned_embeds_2"]


def _our_modules(hn: Hypernetwork) -> dict[int, tuple[HypernetworkModule, HypernetworkModule]]:
    hn.eval()
    return hn.layers


def _same_outputs(theirs, ours: Hypernetwork, seed: int = 0) -> None:
    """``theirs(dim, which, x)`` equals our module's output on the same input, for every width and k/v."""
    g = torch.Generator().manual_seed(seed)
    for dim, pair in _our_modules(ours).items():
        x = torch.randn(2, 5, dim, generator=g)
        for which in (0, 1):
            with torch.no_grad():
                assert torch.equal(theirs(dim, which, x), pair[which](x)), f"width {dim}, {'kv'[which]}"


def _a1111_outputs(hn):
    return lambda dim, which, x: hn.layers[dim][which](x)


@case("hn-pt", "A1111", "yes")
def _(ctx):
    run, a = ctx.get("hn_run"), ctx.get("a1111")
    for path in (run.pt, run.out / "hypernetworks" / f"{HN_NAME}-2.pt"):
        a.reports.clear()
        theirs = a.load_hypernetwork(path)
        assert not a.reports, a.reports
        ours = load_hypernetwork(path)
        assert sorted(theirs.layers) == sorted(ours.layers) and theirs.step == 2
        _same_outputs(_a1111_outputs(theirs), ours)


@case("hn-optim", "A1111", "yes³")
def _(ctx):
    run, a = ctx.get("hn_run"), ctx.get("a1111")
    a.reports.clear()
    theirs = a.load_hypernetwork(run.pt)
    assert not a.reports, a.reports
    # Hypernetwork.load keeps the sidecar's state only when its hash is the file's; train_hypernetwork then loads it
    # into an optimizer over hypernetwork.weights(), in that order.
    assert theirs.optimizer_state_dict is not None and theirs.optimizer_name == "AdamW"
    weights = theirs.weights()
    optimizer = torch.optim.AdamW(params=weights, lr=1e-5)
    optimizer.load_state_dict(theirs.optimizer_state_dict)
    assert [optimizer.state[w]["exp_avg"].shape for w in weights] == [w.shape for w in weights]


@case("hn-safetensors", "A1111", "no")
def _(ctx):
    run, a = ctx.get("hn_run"), ctx.get("a1111")
    listed = a.hypernetwork.list_hypernetworks(str(run.out))
    assert HN_NAME in listed and listed[HN_NAME].endswith(".pt")  # A1111 lists .pt files only


# =====================================================================================================================
# ComfyUI


def _comfy_vectors(tokens: list) -> torch.Tensor | None:
    found = [t for batch in tokens for t, *_ in batch if isinstance(t, torch.Tensor)]
    return torch.stack(found) if found else None


def _comfy_sd1(ctx, folder: Path, word: str) -> torch.Tensor | None:
    comfy = ctx.get("comfy")
    tokens = comfy.sd1_clip.SD1Tokenizer(embedding_directory=str(folder)).tokenize_with_weights(
        f"a photo of embedding:{word}, in the snow")
    return _comfy_vectors(tokens["l"])


@case("emb-pt", "ComfyUI", "yes")
def _(ctx):
    run = ctx.get("ti_run")
    folder = _folder(ctx.tmp_path, run.out / f"{NAME}.pt", run.out / "embeddings" / f"{NAME}-2.pt")
    assert torch.equal(_comfy_sd1(ctx, folder, NAME), run.vectors)
    assert torch.equal(_comfy_sd1(ctx, folder, f"{NAME}-2"), run.step2)


@case("emb-safetensors", "ComfyUI", "yes")
def _(ctx):
    run = ctx.get("ti_run")
    folder = _folder(ctx.tmp_path, run.out / f"{NAME}.safetensors", run.out / "learned_embeds.safetensors")
    assert torch.equal(_comfy_sd1(ctx, folder, NAME), run.vectors)
    assert torch.equal(_comfy_sd1(ctx, folder, "learned_embeds"), run.vectors)


@case("emb-bin", "ComfyUI", "yes")
def _(ctx):
    run = ctx.get("ti_run")
    assert torch.equal(_comfy_sd1(ctx, _folder(ctx.tmp_path, run.out / "learned_embeds.bin"), "learned_embeds"),
                       run.vectors)


@case("emb-png", "ComfyUI", "no")
def _(ctx):
    run = ctx.get("ti_run")
    folder = _folder(ctx.tmp_path, run.out / "image_embeddings" / f"{NAME}-2.png")
    assert _comfy_sd1(ctx, folder, f"{NAME}-2") is None and _comfy_sd1(ctx, folder, f"{NAME}-2.png") is None


@case("emb-kohya", "ComfyUI", "yes")
def _(ctx):
    run = ctx.get("ti_run")
    path = _kohya_layout_file(ctx)
    assert torch.equal(_comfy_sd1(ctx, _folder(ctx.tmp_path, path), path.stem), run.vectors)


def _comfy_sdxl(ctx, folder: Path, word: str) -> dict:
    comfy = ctx.get("comfy")
    tokens = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=str(folder)).tokenize_with_weights(
        f"a photo of embedding:{word}")
    return {"clip_l": _comfy_vectors(tokens["l"]), "clip_g": _comfy_vectors(tokens["g"])}


@case("sdxl-safetensors", "ComfyUI", "yes")
def _(ctx):
    run = ctx.get("sdxl_run")
    found = _comfy_sdxl(ctx, _folder(ctx.tmp_path, run.out / f"{NAME}.safetensors"), NAME)
    assert all(torch.equal(found[k], run.vectors[k]) for k in ("clip_l", "clip_g"))


@case("sdxl-diffusers", "ComfyUI", "no⁸")
def _(ctx):
    run = ctx.get("sdxl_run")
    folder = _folder(ctx.tmp_path, run.out / "learned_embeds.safetensors", run.out / "learned_embeds_2.safetensors")
    for word in ("learned_embeds", "learned_embeds_2"):
        found = _comfy_sdxl(ctx, folder, word)
        # Both encoders get the one tensor the file holds: one of them the wrong width, which ComfyUI then ignores.
        assert found["clip_l"].shape[-1] == found["clip_g"].shape[-1]


def _comfy_patch(ctx, path: Path):
    return ctx.get("comfy").nodes_hypernetwork.load_hypernetwork_patch(str(path), 1.0)


def _comfy_outputs(patch):
    def run(dim, which, x):
        q, k, v = patch(x, x, x, {})
        return (k, v)[which]
    return run


@case("hn-pt", "ComfyUI", "yes⁶")
def _(ctx):
    run = ctx.get("hn_run")  # relu, no layer norm, no dropout: ComfyUI builds the same network
    for path in (run.pt, run.out / "hypernetworks" / f"{HN_NAME}-2.pt"):
        patch = _comfy_patch(ctx, path)
        ours = load_hypernetwork(path)
        assert sorted(patch.hypernet) == sorted(ours.layers)
        _same_outputs(_comfy_outputs(patch), ours)


@case("hn-safetensors", "ComfyUI", "no⁹")
def _(ctx):
    patch = _comfy_patch(ctx, ctx.get("hn_run").out / f"{HN_NAME}.safetensors")
    assert patch is not None and not patch.hypernet  # loads without complaint, and holds no layer


# =====================================================================================================================
# kohya


@case("emb-pt", "kohya", "yes")
def _(ctx):
    run, kohya = ctx.get("ti_run"), ctx.get("kohya")
    [emb] = kohya.load_weights(run.out / f"{NAME}.pt")
    assert torch.equal(emb, run.vectors)


@case("emb-safetensors", "kohya", "yes")
def _(ctx):
    run, kohya = ctx.get("ti_run"), ctx.get("kohya")
    for path in (run.out / f"{NAME}.safetensors", run.out / "learned_embeds.safetensors"):
        [emb] = kohya.load_weights(path)
        assert torch.equal(emb, run.vectors)


@case("emb-bin", "kohya", "yes")
def _(ctx):
    run, kohya = ctx.get("ti_run"), ctx.get("kohya")
    [emb] = kohya.load_weights(run.out / "learned_embeds.bin")
    assert torch.equal(emb, run.vectors)


@case("emb-png", "kohya", "no")
def _(ctx):
    with pytest.raises(Exception):
        ctx.get("kohya").load_weights(ctx.get("ti_run").out / "image_embeddings" / f"{NAME}-2.png")


@case("emb-kohya", "kohya", "yes")
def _(ctx):
    [emb] = ctx.get("kohya").load_weights(_kohya_layout_file(ctx))
    assert torch.equal(emb, ctx.get("ti_run").vectors)


@case("sdxl-safetensors", "kohya", "yes")
def _(ctx):
    run = ctx.get("sdxl_run")
    emb_l, emb_g = ctx.get("kohya").load_weights(run.out / f"{NAME}.safetensors", sdxl=True)
    assert torch.equal(emb_l, run.vectors["clip_l"]) and torch.equal(emb_g, run.vectors["clip_g"])


@case("sdxl-diffusers", "kohya", "no⁸")
def _(ctx):
    with pytest.raises(AssertionError, match="does not contains weights"):
        ctx.get("kohya").load_weights(ctx.get("sdxl_run").out / "learned_embeds.safetensors", sdxl=True)


def _kohya_hypernetwork(kohya: Kohya, path: Path):
    """kohya's NovelAI hypernetwork with our file's weights (kohya has no file loader: torch.load, as its scripts)."""
    hn = kohya.hypernetwork_nai.Hypernetwork()
    hn.load_from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return hn


def _kohya_outputs(hn):
    return lambda dim, which, x: hn.forward(None, x)[which]


@case("hn-pt", "kohya", "NAI only⁷")
def _(ctx):
    kohya, tmp = ctx.get("kohya"), ctx.tmp_path
    nai = _random_hypernetwork(HypernetworkOptions(activation_func="linear"), sizes=(320, 640))
    save_hypernetwork(nai, tmp / "nai.pt")
    _same_outputs(_kohya_outputs(_kohya_hypernetwork(kohya, tmp / "nai.pt")), nai)
    with pytest.raises(ValueError):  # the trainer's file has the tiny model's widths
        _kohya_hypernetwork(kohya, ctx.get("hn_run").pt)


# =====================================================================================================================
# diffusers


@contextlib.contextmanager
def _loaded(pipe, pairs):
    """Tokens added by load_textual_inversion are removed again afterwards (the pipeline is shared by tests)."""
    try:
        yield
    finally:
        for tokenizer, encoder in pairs:
            pipe.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)
        assert all(len(t) == 49408 for t, _ in pairs)


def _diffusers_load(pipe, path_or_tensor, **kwargs):
    """load_textual_inversion as a user calls it; returns {added token: its row}."""
    with _loaded(pipe, [(pipe.tokenizer, pipe.text_encoder)]):
        before = len(pipe.tokenizer)
        pipe.load_textual_inversion(path_or_tensor, **kwargs)
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        return {pipe.tokenizer.convert_ids_to_tokens(i): table[i].clone() for i in range(before, len(pipe.tokenizer))}


def _rows(found: dict) -> torch.Tensor:
    return torch.stack(list(found.values()))


@case("emb-pt", "diffusers", "yes¹")
def _(ctx):
    run, pipe = ctx.get("ti_run"), ctx.get("sd1_pipe")
    with pytest.raises(ValueError, match=f"Token {NAME} already in tokenizer vocabulary"):
        _diffusers_load(pipe, str(run.out / f"{NAME}.pt"))  # the stored name, 'tiger', is a CLIP word
    found = _diffusers_load(pipe, str(run.out / f"{NAME}.pt"), token=f"<{NAME}>")  # the README's call
    assert list(found) == [f"<{NAME}>", f"<{NAME}>_1"] and torch.equal(_rows(found), run.vectors)
    found = _diffusers_load(pipe, str(run.out / "embeddings" / f"{NAME}-2.pt"))
    assert list(found) == [f"{NAME}-2", f"{NAME}-2_1"] and torch.equal(_rows(found), run.step2)


@case("emb-safetensors", "diffusers", "yes²")
def _(ctx):
    run, pipe = ctx.get("ti_run"), ctx.get("sd1_pipe")
    for path in (run.out / "learned_embeds.safetensors", run.out / f"{NAME}.safetensors"):
        found = _diffusers_load(pipe, str(path))
        assert list(found) == [f"<{NAME}>", f"<{NAME}>_1"] and torch.equal(_rows(found), run.vectors)
    found = _diffusers_load(pipe, str(run.out / "embeddings" / f"{NAME}-2.safetensors"))
    assert list(found) == [f"<{NAME}-2>", f"<{NAME}-2>_1"] and torch.equal(_rows(found), run.step2)


@case("emb-bin", "diffusers", "yes²")
def _(ctx):
    run, pipe = ctx.get("ti_run"), ctx.get("sd1_pipe")
    found = _diffusers_load(pipe, str(run.out / "learned_embeds.bin"))
    assert list(found) == [f"<{NAME}>", f"<{NAME}>_1"] and torch.equal(_rows(found), run.vectors)


@case("emb-png", "diffusers", "no")
def _(ctx):
    with pytest.raises(Exception):
        _diffusers_load(ctx.get("sd1_pipe"), str(ctx.get("ti_run").out / "image_embeddings" / f"{NAME}-2.png"))


@case("emb-kohya", "diffusers", "yes⁵")
def _(ctx):
    found = _diffusers_load(ctx.get("sd1_pipe"), str(_kohya_layout_file(ctx)), token=f"<{NAME}>")
    assert list(found) == [f"<{NAME}>", f"<{NAME}>_1"] and torch.equal(_rows(found), ctx.get("ti_run").vectors)


def _diffusers_sdxl(pipe, first, second, **kwargs):
    """docs/sdxl.md's recipe: one call per text encoder; returns (CLIP-L rows, OpenCLIP-G rows)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    found = []
    with _loaded(pipe, pairs):
        for source, (tokenizer, encoder) in zip((first, second), pairs):
            pipe.load_textual_inversion(source, tokenizer=tokenizer, text_encoder=encoder, **kwargs)
            assert tokenizer.convert_ids_to_tokens(49408) == f"<{NAME}>"
            found.append(encoder.get_input_embeddings().weight.detach()[49408:].clone())
    return found


@case("sdxl-safetensors", "diffusers", "yes⁴")
def _(ctx):
    run = ctx.get("sdxl_run")
    state = load_file(run.out / f"{NAME}.safetensors")
    rows_l, rows_g = _diffusers_sdxl(ctx.get("sdxl_pipe"), state["clip_l"], state["clip_g"], token=f"<{NAME}>")
    assert torch.equal(rows_l, run.vectors["clip_l"]) and torch.equal(rows_g, run.vectors["clip_g"])


@case("sdxl-diffusers", "diffusers", "yes⁴")
def _(ctx):
    run = ctx.get("sdxl_run")
    rows_l, rows_g = _diffusers_sdxl(ctx.get("sdxl_pipe"), str(run.out / "learned_embeds.safetensors"),
                                     str(run.out / "learned_embeds_2.safetensors"))  # the token is in the files
    assert torch.equal(rows_l, run.vectors["clip_l"]) and torch.equal(rows_g, run.vectors["clip_g"])


@pytest.mark.parametrize("kind, client", list(CASES), ids=[f"{k}-{c}" for k, c in CASES])
def test_client_reads_our_file(kind, client, request, tmp_path):
    """One cell of the README's compatibility table, run against the client's real reader."""
    _, check = CASES[(kind, client)]
    check(SimpleNamespace(get=request.getfixturevalue, tmp_path=tmp_path))


# =====================================================================================================================
# Shared helpers for the cases


def _kohya_layout_file(ctx) -> Path:
    """The converter's kohya layout of the run's final embedding (``emb_params``)."""
    from tools.embeddings import main as embeddings_main

    out = ctx.tmp_path / "kohya" / f"{NAME}.safetensors"
    out.parent.mkdir(exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        assert embeddings_main(["convert", str(ctx.get("ti_run").out / f"{NAME}.pt"), str(out),
                                "--format", "kohya", "--overwrite"]) == 0
    assert list(load_file(out)) == ["emb_params"]
    return out


def _random_hypernetwork(options: HypernetworkOptions, sizes=(16, 24), seed: int = 0) -> Hypernetwork:
    """A hypernetwork with clearly non-zero weights everywhere (a fresh one is nearly the identity)."""
    torch.manual_seed(seed)
    hn = Hypernetwork.create("hn", sizes, options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    hn.step = 7
    return hn


# =====================================================================================================================
# Every hypernetwork option that changes the file, through each client


HN_OPTIONS = {
    "default": HypernetworkOptions(),  # activation None: written as "linear"
    "linear": HypernetworkOptions(activation_func="linear"),
    "relu": HypernetworkOptions(activation_func="relu"),
    "relu-activate-output": HypernetworkOptions(activation_func="relu", activate_output=True),
    "deep-leakyrelu-dropout": HypernetworkOptions([1, 2, 2, 1], "leakyrelu", use_dropout=True),
    "deep-elu-last-layer-dropout": HypernetworkOptions([1, 2, 2, 1], "elu", use_dropout=True,
                                                       last_layer_dropout=True),
    "swish-dropout-structure": HypernetworkOptions([1, 1.5, 2, 1], "swish", dropout_structure=[0, 0.05, 0.1, 0]),
    "mish-xavier": HypernetworkOptions([1, 0.5, 1], "mish", weight_initialization="XavierNormal"),
    "gelu": HypernetworkOptions(activation_func="gelu", weight_initialization="KaimingUniform"),
    "layer-norm": HypernetworkOptions(activation_func="linear", is_layer_norm=True),
    "layer-norm-tanh": HypernetworkOptions(activation_func="tanh", is_layer_norm=True),
    "layer-norm-sigmoid-activate-output": HypernetworkOptions(activation_func="sigmoid", is_layer_norm=True,
                                                              activate_output=True),
    "layer-norm-deep-relu-dropout": HypernetworkOptions([1, 2, 2, 1], "relu", is_layer_norm=True, use_dropout=True,
                                                        last_layer_dropout=True),
}


@pytest.fixture(scope="module")
def hn_files(tmp_path_factory) -> dict[str, tuple[Path, Hypernetwork]]:
    folder = tmp_path_factory.mktemp("hn-options")
    files = {}
    for i, (key, options) in enumerate(HN_OPTIONS.items()):
        hn = _random_hypernetwork(options, seed=i)
        files[key] = (save_hypernetwork(hn, folder / f"{key}.pt"), hn)
    return files


def _layer_types(seq) -> list[str]:
    return [type(m).__name__ for m in seq]


@pytest.mark.parametrize("key", list(HN_OPTIONS))
def test_hypernetwork_options_a1111(key, hn_files, a1111):
    path, ours = hn_files[key]
    a1111.reports.clear()
    theirs = a1111.load_hypernetwork(path)
    assert not a1111.reports, a1111.reports
    o = ours.options
    assert (theirs.layer_structure, theirs.activation_func, theirs.add_layer_norm, theirs.dropout_structure,
            theirs.activate_output, theirs.use_dropout, theirs.weight_init, theirs.step) == \
        (o.layer_structure, o.activation_func or "linear", o.is_layer_norm, o.dropout_structure, o.activate_output,
         o.use_dropout, o.weight_initialization, 7)
    for dim, pair in ours.layers.items():
        assert _layer_types(theirs.layers[dim][0].linear) == _layer_types(pair[0].linear)
        assert [m.p for m in theirs.layers[dim][0].linear if isinstance(m, torch.nn.Dropout)] == \
            [m.p for m in pair[0].linear if isinstance(m, torch.nn.Dropout)]
    _same_outputs(_a1111_outputs(theirs), ours)


def _expected_comfy_network(ours: Hypernetwork) -> Hypernetwork:
    """The ComfyUI LayerNorm bug: with layer norm, ComfyUI counts the LayerNorm weights as layers, so the last Linear
    never looks last and always gets the activation, i.e. it builds the network of ``activate_output=True``."""
    twin = Hypernetwork("twin", HypernetworkOptions(**{**vars(ours.options), "activate_output": True}))
    for dim, pair in ours.layers.items():
        twin.layers[dim] = tuple(twin.new_module(dim) for _ in pair)
        for mine, theirs in zip(twin.layers[dim], pair):  # same Linear/LayerNorm weights, in order
            with torch.no_grad():
                for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
                    a.copy_(b)
    return twin


@pytest.mark.parametrize("key", list(HN_OPTIONS))
def test_hypernetwork_options_comfyui(key, hn_files, comfy):
    path, ours = hn_files[key]
    patch = comfy.nodes_hypernetwork.load_hypernetwork_patch(str(path), 1.0)
    activation = ours.options.activation_func or "linear"
    if activation not in COMFY_ACTIVATIONS:
        assert patch is None  # "Unsupported Hypernetwork format": ComfyUI refuses it (logged)
        return
    sequences = [seq for pair in patch.hypernet.values() for seq in pair]
    dropouts = [m for seq in sequences for m in seq if isinstance(m, torch.nn.Dropout)]
    # ComfyUI never switches its modules to eval mode: dropout stays active while it generates.
    assert all(seq.training for seq in sequences) and bool(dropouts) == ours.options.use_dropout
    for seq in sequences:
        seq.eval()
    # The documented bug changes the outputs of layer-norm files with an activation but no activate_output.
    differs = ours.options.is_layer_norm and activation != "linear" and not ours.options.activate_output
    _same_outputs(_comfy_outputs(patch), _expected_comfy_network(ours) if differs else ours)
    if differs:
        with pytest.raises(AssertionError):
            _same_outputs(_comfy_outputs(patch), ours)


@pytest.mark.parametrize("key", list(HN_OPTIONS))
def test_hypernetwork_options_kohya(key, kohya, tmp_path):
    """kohya's only hypernetwork reader is the NovelAI module: it takes 1, 2, 1 linear files and refuses the rest."""
    ours = _random_hypernetwork(HN_OPTIONS[key], sizes=(320,))
    save_hypernetwork(ours, tmp_path / "hn.pt")
    if key in ("default", "linear"):
        _same_outputs(_kohya_outputs(_kohya_hypernetwork(kohya, tmp_path / "hn.pt")), ours)
    else:
        with pytest.raises(RuntimeError, match="state_dict"):
            _kohya_hypernetwork(kohya, tmp_path / "hn.pt")


# =====================================================================================================================
# A1111's safe check on every .pt we write


def _pt_files(*outs: Path) -> list[Path]:
    return sorted(p for out in outs for p in out.rglob("*") if p.suffix in (".pt", ".bin", ".optim")
                  and "checkpoint-" not in str(p))


def test_a1111_safe_check_passes_on_every_pt_we_write(ti_run, hn_run, hn_files, a1111, tmp_path):
    from tools.embeddings import main as embeddings_main

    with contextlib.redirect_stdout(io.StringIO()):  # the converter and `create` write .pt too
        embeddings_main(["convert", str(ti_run.out / "image_embeddings" / f"{NAME}-2.png"), str(tmp_path / "c.pt")])
        embeddings_main(["convert", str(ti_run.out / "learned_embeds.safetensors"), str(tmp_path / "c.bin")])
    files = _pt_files(ti_run.out, hn_run.out, tmp_path) + [p for p, _ in hn_files.values()]
    names = {p.relative_to(p.parents[1]).as_posix() for p in files}
    assert {"embeddings/tiger-2.pt", f"{ti_run.out.name}/{NAME}.pt.optim", f"{ti_run.out.name}/learned_embeds.bin",
            f"hypernetworks/{HN_NAME}-2.pt", f"{hn_run.out.name}/{HN_NAME}.pt.optim"} <= names
    for path in files:
        a1111.check_pt(path)  # raises "bad file inside ..." / "global ... is forbidden" like A1111 does
        assert zipfile.ZipFile(path).namelist()[0] == "archive/data.pkl"


# =====================================================================================================================
# The other way round: files written by A1111's and kohya's own savers, read by ours


def test_we_read_a1111_embedding_save(a1111, tmp_path):
    vec = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with a1111.active():
        emb = a1111.textual_inversion.Embedding(vec, "cat-toy", step=120)
        emb.sd_checkpoint, emb.sd_checkpoint_name = "abcdef1234", "v1-5-pruned"
        emb.save(str(tmp_path / "cat-toy.pt"))  # torch.save of the installed torch, as A1111 does
    ours = load_embedding(tmp_path / "cat-toy.pt")
    assert torch.equal(ours.vectors, vec) and (ours.name, ours.step, ours.sd_checkpoint, ours.sd_checkpoint_name) == \
        ("cat-toy", 120, "abcdef1234", "v1-5-pruned")
    # A1111's PNG card of it (embedding_to_b64 + insert_image_data_embed), as train_embedding writes one.
    data = torch.load(tmp_path / "cat-toy.pt", weights_only=True)
    ie = a1111.image_embedding
    with a1111.active():
        card = ie.caption_image_overlay(Image.new("RGB", (64, 64), (90, 120, 30)), "<cat-toy>", "model",
                                        "[abcdef1234]", "3v 120s")
        card = ie.insert_image_data_embed(card, data)
        b64 = ie.embedding_to_b64(data)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", b64)
    card.save(tmp_path / "card.png", pnginfo=info)
    Image.open(tmp_path / "card.png").save(tmp_path / "pixels.png")
    for path in (tmp_path / "card.png", tmp_path / "pixels.png"):
        ours = load_embedding(path)
        assert ours.name == "cat-toy" and torch.equal(ours.vectors, vec) and ours.step == 120


@pytest.mark.parametrize("key", ["default", "relu-activate-output", "deep-elu-last-layer-dropout", "layer-norm-tanh",
                                 "swish-dropout-structure"])
def test_we_read_a1111_hypernetwork_save(key, a1111, tmp_path):
    o = HN_OPTIONS[key].resolved()
    path = tmp_path / "their-hn.pt"
    with a1111.active():
        theirs = a1111.hypernetwork.Hypernetwork(
            "their-hn", [16, 24], o.layer_structure, o.activation_func, o.weight_initialization, o.is_layer_norm,
            o.use_dropout, o.activate_output, last_layer_dropout=o.last_layer_dropout,
            dropout_structure=o.dropout_structure)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for w in theirs.weights():
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        optimizer = torch.optim.AdamW(theirs.weights(), lr=1e-3)
        theirs.train()  # one optimizer step, so the sidecar holds state
        sum(m(torch.ones(1, dim)).sum() for dim, pair in theirs.layers.items() for m in pair).backward()
        optimizer.step()
        theirs.eval()
        theirs.step, theirs.filename = 40, str(path)
        theirs.optimizer_name, theirs.optimizer_state_dict = "AdamW", optimizer.state_dict()
        a1111.shared.opts.save_optimizer_state = True
        try:
            theirs.save(str(path))
        finally:
            a1111.shared.opts.save_optimizer_state = False
    ours = load_hypernetwork(path)
    assert ours.step == 40 and ours.name == "their-hn" and ours.options.layer_structure == o.layer_structure
    _same_outputs(_a1111_outputs(theirs), ours)
    sidecar = load_optimizer_sidecar(path)  # bound to the .pt by A1111's own hash
    assert sidecar is not None and sidecar.optimizer_name == "AdamW"
    assert sidecar.optimizer_state_dict["param_groups"] == optimizer.state_dict()["param_groups"]


@pytest.mark.parametrize("save_dtype", [None, torch.float16])
def test_we_read_kohya_save_weights(save_dtype, kohya, tmp_path):
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(3, 32, generator=g)
    expected = emb if save_dtype is None else emb.to(save_dtype).float()
    for name in ("k.safetensors", "k.pt"):
        kohya.save_weights(tmp_path / name, [emb], save_dtype, {"ss_steps": "10"})
        ours = load_embedding(tmp_path / name)
        assert ours.name == "k" and torch.equal(ours.vectors, expected)
    pair = [torch.randn(2, 768, generator=g), torch.randn(2, 1280, generator=g)]
    kohya.save_weights(tmp_path / "xl.safetensors", pair, save_dtype, {}, sdxl=True)
    ours = load_embedding(tmp_path / "xl.safetensors")
    assert ours.is_sdxl and all(torch.equal(ours.vectors[k], t if save_dtype is None else t.to(save_dtype).float())
                                for k, t in zip(("clip_l", "clip_g"), pair))


# =====================================================================================================================
# The writers themselves


def test_pt_files_do_not_depend_on_the_installed_torch_serializer(tmp_path, monkeypatch):
    """The .pt layout is ours, not torch.save's: same bytes every time, the records A1111 allows, torch reads them."""
    from utils.embeddings import save_a1111_pt
    from utils.pt_file import ALIGNMENT

    def no_torch_save(*args, **kwargs):
        raise AssertionError("torch.save's layout depends on the torch version")

    monkeypatch.setattr(torch, "save", no_torch_save)
    emb = Embedding(NAME, torch.randn(2, 8), step=3, sd_checkpoint="abcdef1234", sd_checkpoint_name="m")
    a, b = save_a1111_pt(emb, tmp_path / "a.pt"), save_a1111_pt(emb, tmp_path / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert z.namelist() == ["archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/version"]
        for info in z.infolist():  # tensor data aligned as torch's own files, so torch can memory-map it
            raw = a.read_bytes()[info.header_offset:]
            start = info.header_offset + 30 + int.from_bytes(raw[26:28], "little") + int.from_bytes(raw[28:30],
                                                                                                  "little")
            assert start % ALIGNMENT == 0
    for mmap in (False, True):
        data = torch.load(a, map_location="cpu", weights_only=True, mmap=mmap)
        assert torch.equal(data["string_to_param"]["*"], emb.vectors) and data["name"] == NAME
    hn = _random_hypernetwork(HN_OPTIONS["layer-norm-tanh"])
    opt = torch.optim.AdamW(hn.parameters())
    hn.train()
    hn.parameters()[0].sum().backward()
    opt.step()
    hn.eval()
    save_hypernetwork(hn, tmp_path / "hn.pt", optimizer=opt)
    assert torch.load(tmp_path / "hn.pt.optim", weights_only=True)["optimizer_state_dict"]["state"][0]["step"] == 1
    assert load_hypernetwork(tmp_path / "hn.pt").layers.keys() == hn.layers.keys()


def test_one_run_writes_one_diffusers_token(ti_run, sdxl_run):
    """learned_embeds.safetensors / .bin and <name>.safetensors of one run carry the same token, <name>."""
    for path in (ti_run.out / "learned_embeds.safetensors", ti_run.out / f"{NAME}.safetensors",
                 sdxl_run.out / "learned_embeds.safetensors", sdxl_run.out / "learned_embeds_2.safetensors"):
        assert list(load_file(path)) == [f"<{NAME}>"], path
    assert list(torch.load(ti_run.out / "learned_embeds.bin", weights_only=True)) == [f"<{NAME}>"]


def test_vocabulary_word_names_are_announced(ti_run, sd1_text):
    from utils.trainers.textual_inversion import prompt_word_lines

    tokenizer, _ = sd1_text
    lines = prompt_word_lines(NAME, [tokenizer])
    assert len(lines) == 2 and "'<tiger>' in diffusers" in lines[0] and "already a word" in lines[1]
    assert all(line in ti_run.printed.splitlines() for line in lines)  # printed once, at the start of the run
    assert len(prompt_word_lines("red-ball", [tokenizer])) == 1  # not one vocabulary token: nothing to warn about


def test_periodic_copy_and_card_at_the_last_step(ti_run, hn_run):
    """--save_every 2 --max_train_steps 2: the step-2 copies and PNG card exist (A1111 saves at every multiple of the
    interval, the last step included); the step's preview is rendered once and is what the card shows."""
    out = ti_run.out
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [f"{NAME}-2.pt", f"{NAME}-2.safetensors"]
    assert sorted(p.name for p in (out / "image_embeddings").iterdir()) == [f"{NAME}-2.png"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{NAME}-2-0.png"]
    assert torch.equal(ti_run.step2, ti_run.vectors)
    assert load_embedding(out / "image_embeddings" / f"{NAME}-2.png").name == f"{NAME}-2"
    assert sorted(p.name for p in (hn_run.out / "hypernetworks").iterdir()) == [f"{HN_NAME}-2.pt"]


def test_loop_saves_at_every_multiple_of_the_interval_the_last_step_included(tiny_sd1, tmp_path):
    """The loop's order of outputs: a copy at every multiple of save_every (the final step too), a preview at every
    multiple of preview_every, and at a final step with a copy the final preview comes first (the PNG card shows it),
    never twice."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from utils.trainers.textual_inversion import TextualInversion
    from utils.training import LoopConfig, Outputs, make_accelerator, train

    class Latents:
        micro_batches_per_epoch = 4

        def iter_epoch(self, epoch, skip):
            g = torch.Generator().manual_seed(epoch)
            for j in range(skip, 4):
                yield {"latents": torch.randn(2, 4, 8, 8, generator=g), "prompts": ["a photo of myemb"] * 2,
                       "positions": [2 * j, 2 * j + 1]}

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    ti = TextualInversion.build(pipe, Embedding("myemb", torch.zeros(1, 32)))
    events = []
    outputs = Outputs(save=lambda s: events.append(f"save {s}") or [],
                      final=lambda s, o: events.append(f"final {s}") or [],
                      preview=lambda s: events.append(f"preview {s}") or [])
    cfg = LoopConfig(output_dir=tmp_path, max_train_steps=6, train_batch_size=2, save_every=2, preview_every=3,
                     checkpointing_steps=0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    train(make_accelerator(tmp_path, "no", 1, "none", 0), ti, Latents(), scheduler, cfg, outputs)
    assert events == ["save 2", "preview 3", "save 4", "preview 6", "save 6", "final 6"]


def test_a_card_shows_only_the_preview_of_its_own_step(monkeypatch, tmp_path):
    """The picture of a PNG card is the preview of the same step; an older one would misrepresent the embedding."""
    from utils.trainers import textual_inversion as ti_outputs

    shown = {}
    monkeypatch.setattr(ti_outputs, "save_png_card", lambda emb, path, image: shown.setdefault(emb.step, image))
    picture = Image.new("RGB", (8, 8))
    outputs = SimpleNamespace(
        trainable=SimpleNamespace(name=NAME), out_dir=tmp_path, save_image_embeddings=True, last_preview=(4, picture),
        _current=lambda step, name: Embedding(name, torch.zeros(1, 8), step=step), _write=lambda emb, stem: [])
    for step in (4, 6):
        ti_outputs.TextualInversionOutputs.save(outputs, step)
    assert shown == {4: picture, 6: None}
