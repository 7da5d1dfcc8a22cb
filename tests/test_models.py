"""Model loading: folder, offline single file (LDM layout, .safetensors and .ckpt), refused pickles, VAE override,
variant/revision, the shipped architecture configs, and the precision/attention helpers."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from utils.errors import UserError
from utils.hashes import folder_weights_hash
from utils.ldm_export import (
    clip_to_ldm,
    export_single_file,
    openclip_to_ldm,
    pipeline_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from utils.models import (  # noqa: I001
    _offline_tokenizers,
    _switch_to,
    ARCHITECTURES,
    CONFIGS_DIR,
    ModelSource,
    architecture_config,
    detect_architecture,
    enable_xformers,
    load_pipeline,
    load_vae,
    set_tf32,
    uses_v_prediction,
    weight_dtype,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd1_reference(tiny_sd1):
    """The tiny folder loaded once, to compare other loading paths against (never modified)."""
    return load_pipeline(ModelSource(str(tiny_sd1))).pipeline


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1, tmp_path_factory):
    return export_single_file(tiny_sd1, tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors")


def _image(pipe, seed=3):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a tree", num_inference_steps=4, height=64, width=64, generator=g,
                output_type="np").images


def _assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def _processors(module):
    return {type(p).__name__ for p in module.attn_processors.values()}


# ---------------------------------------------------------------------------------------------------------------
# folders and single files


def test_folder_load(tiny_sd1):
    m = load_pipeline(ModelSource(str(tiny_sd1)))
    assert type(m.pipeline).__name__ == "StableDiffusionPipeline"
    assert (m.family, m.prediction_type) == ("sd1", "epsilon")
    assert m.identity.name == tiny_sd1.name
    assert m.identity.sha256 == folder_weights_hash(tiny_sd1)
    assert m.identity.shorthash == m.identity.sha256[:10] and m.identity.legacy_hash is None
    # attention stays PyTorch SDPA: nothing in loading swaps the processors
    assert _processors(m.pipeline.unet) == {"AttnProcessor2_0"}
    assert _processors(m.pipeline.vae) == {"AttnProcessor2_0"}


def test_single_file_roundtrip_same_image_offline(tiny_sd1, sd1_file, sd1_reference, tmp_path):
    keys = pipeline_to_ldm(sd1_reference).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys

    # like the shipped configs: JSON only, no weights and no tokenizer files (the tokenizer is built offline)
    config_only = tmp_path / "config-only"
    shutil.copytree(tiny_sd1, config_only, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    single = load_pipeline(ModelSource(str(sd1_file), model_config=str(config_only)))
    assert (single.family, single.prediction_type) == ("sd1", "epsilon")
    assert single.pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert single.pipeline.tokenizer("a photo of a tree").input_ids == [49406, 320, 1125, 539, 320, 2677, 49407]
    _assert_same_weights(sd1_reference, single.pipeline)
    assert _processors(single.pipeline.unet) == {"AttnProcessor2_0"}
    a, b = _image(sd1_reference), _image(single.pipeline)
    assert a.shape == (1, 64, 64, 3) and a.std() > 0.01
    assert abs(a - b).max() < 1e-5

    data = sd1_file.read_bytes()
    assert single.identity.name == "tiny-sd1"
    assert single.identity.sha256 == hashlib.sha256(data).hexdigest()
    assert single.identity.shorthash == single.identity.sha256[:10]
    assert single.identity.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_ckpt_with_state_dict_wrapper_loads(tiny_sd1, sd1_file, sd1_reference, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(sd1_file)), "global_step": 1000}, ckpt)
    m = load_pipeline(ModelSource(str(ckpt), model_config=str(tiny_sd1)))
    _assert_same_weights(sd1_reference, m.pipeline)
    assert m.identity.name == "tiny"


class _Payload:
    """Unpickling this runs open(marker, 'w'): a stand-in for any code a hostile .ckpt would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_ckpt_is_refused_and_never_run(tmp_path, tiny_sd1):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": _Payload(marker)}, bad)
    with pytest.raises(UserError, match=r"evil\.ckpt: refusing to load this pickle: it references io\.open") as e:
        load_pipeline(ModelSource(str(bad)))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="refusing"):
        load_pipeline(ModelSource(str(bad), model_config=str(tiny_sd1)))
    with pytest.raises(UserError, match="refusing"):
        load_pipeline(ModelSource(str(tiny_sd1), vae=str(bad)))
    assert not marker.exists()
    # the file really is hostile: an unsafe load would have run the payload
    torch.load(bad, weights_only=False)["callback"].close()
    assert marker.exists()


def test_bad_paths_are_one_line_errors(tmp_path, a1111_fixtures, sd1_file):
    cases = {
        str(tmp_path / "missing.safetensors"): "model not found",
        "someone/some-model": "cannot be fetched from the Hub",
        str(tmp_path): "no model_index.json",
    }
    (tmp_path / "notes.txt").write_text("hello")
    cases[str(tmp_path / "notes.txt")] = "unknown checkpoint format .txt"
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00garbage")
    cases[str(tmp_path / "broken.safetensors")] = "not a readable .safetensors"
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    cases[str(tmp_path / "broken.ckpt")] = "not a readable checkpoint"
    cases[str(a1111_fixtures / "EasyNegative.safetensors")] = "not a Stable Diffusion checkpoint"
    # the tiny model does not fit the shipped SD-1 config: say so and point at --model_config
    cases[str(sd1_file)] = "does not fit the model config .*sd1.*--model_config"
    for where, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            load_pipeline(ModelSource(where))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--model_config"):
        load_pipeline(ModelSource(str(sd1_file), model_config=str(tmp_path)))
    with pytest.raises(UserError, match="does not fit"):
        load_pipeline(ModelSource(str(sd1_file), model_config="sd2-768"))


# ---------------------------------------------------------------------------------------------------------------
# VAE override, variant, revision


def test_vae_override_folder_and_single_file(tiny_sd1, sd1_reference, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from utils.tiny_models import tiny_model_path

    other = tiny_model_path("sd1", seed=1)  # same shapes, other weights
    want = AutoencoderKL.from_pretrained(other / "vae").state_dict()
    base = sd1_reference.vae.state_dict()
    assert not all(torch.equal(base[k], want[k]) for k in want)

    vae_file = tmp_path / "other.vae.safetensors"  # A1111 VAE files: LDM names without first_stage_model.
    save_file({k: v.contiguous() for k, v in vae_to_ldm(want).items()}, str(vae_file))
    vae_ckpt = tmp_path / "other.vae.pt"
    torch.save({"state_dict": vae_to_ldm(want)}, vae_ckpt)
    diffusers_names = tmp_path / "other-diffusers-names.safetensors"
    save_file({k: v.contiguous() for k, v in want.items()}, str(diffusers_names))
    # through the whole loader once (the override replaces the pipeline's VAE) ...
    from_file = load_pipeline(ModelSource(str(tiny_sd1), vae=str(vae_file))).pipeline.vae.state_dict()
    # ... and every other form through load_vae, which the loader calls
    others = [load_vae(v, tiny_sd1).state_dict() for v in (other / "vae", other, vae_ckpt, diffusers_names)]
    for got in [from_file] + others:
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(UserError, match="--vae .*not found"):
        load_pipeline(ModelSource(str(tiny_sd1), vae=str(tmp_path / "nope.safetensors")))


def test_variant_selects_weights(tiny_sd1, sd1_reference, tmp_path):
    from utils.tiny_models import build_pipeline

    folder = tmp_path / "with-variant"
    shutil.copytree(tiny_sd1, folder)
    build_pipeline("sd1", seed=1).save_pretrained(folder, variant="ema")
    plain = load_pipeline(ModelSource(str(folder)))
    ema = load_pipeline(ModelSource(str(folder), variant="ema"))
    _assert_same_weights(plain.pipeline, sd1_reference)
    w1, w2 = plain.pipeline.unet.conv_in.weight, ema.pipeline.unet.conv_in.weight
    assert not torch.equal(w1, w2)
    assert plain.identity.sha256 == folder_weights_hash(tiny_sd1)  # the extra variant does not change it
    assert ema.identity.sha256 == folder_weights_hash(folder, "ema") != plain.identity.sha256


def test_hub_id_goes_through_download_with_revision_and_variant(tiny_sd1, monkeypatch):
    from diffusers import DiffusionPipeline

    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny_sd1)

    monkeypatch.setattr(DiffusionPipeline, "download", staticmethod(fake_download))
    m = load_pipeline(ModelSource("someone/tiny", revision="abc123", variant=None))
    assert seen == {"repo_id": "someone/tiny", "revision": "abc123", "variant": None}
    assert m.identity.name == "someone_tiny"
    assert m.identity.sha256 == folder_weights_hash(tiny_sd1)


# ---------------------------------------------------------------------------------------------------------------
# shipped architecture configs, checked on the meta device (no memory for the weights)


def _meta_models(arch):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = CONFIGS_DIR / arch
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(d, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(d, subfolder="text_encoder")),
        }
        if (d / "text_encoder_2").is_dir():
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(d, subfolder="text_encoder_2"))
    return models


# Parameter counts of the released models (UNet, VAE, text encoder(s)).
RELEASED = {
    "sd1": (859_520_964, 83_653_863, 123_060_480),
    "sd2-512": (865_910_724, 83_653_863, 340_387_840),
    "sd2-768": (865_910_724, 83_653_863, 340_387_840),
    "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840),
}


def _ldm_shapes(arch, models):
    shapes = {"model.diffusion_model." + k: v.shape for k, v in unet_to_ldm(models["unet"].state_dict()).items()}
    shapes.update({"first_stage_model." + k: v.shape for k, v in vae_to_ldm(models["vae"].state_dict()).items()})
    te = models["text_encoder"].state_dict()
    if arch == "sdxl":
        shapes.update({k.replace("cond_stage_model.", "conditioner.embedders.0."): v.shape
                       for k, v in clip_to_ldm(te).items()})
        te2 = {k: v for k, v in models["text_encoder_2"].state_dict().items() if not k.startswith("text_projection")}
        shapes.update({k.replace("cond_stage_model.", "conditioner.embedders.1."): v.shape
                       for k, v in openclip_to_ldm(te2).items()})
        shapes["conditioner.embedders.1.model.text_projection"] = (1280, 1280)
    elif arch.startswith("sd2"):
        shapes.update({k: v.shape for k, v in openclip_to_ldm(te).items()})
    else:
        shapes.update({k: v.shape for k, v in clip_to_ldm(te).items()})
    return shapes


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shipped_configs_are_the_released_architectures(arch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    models = _meta_models(arch)
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in models.values())
    assert counts == RELEASED[arch]
    assert architecture_config(arch) == CONFIGS_DIR / arch

    # an LDM checkpoint of this architecture (names and shapes only) is recognised ...
    shapes = _ldm_shapes(arch, models)
    assert detect_architecture(shapes) == ("sd2-768" if arch.startswith("sd2") else arch)
    # ... and our exporter's names are exactly what diffusers' importer maps back, on the real block layout
    unet = models["unet"]
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict()).items()}
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    vae = models["vae"]
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict()).items()},
                                      vae.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae.state_dict().items()}


def test_offline_tokenizers_for_shipped_configs():
    import json

    pads = {}
    for arch in ARCHITECTURES:
        index = json.loads((CONFIGS_DIR / arch / "model_index.json").read_text())
        pads[arch] = {k: t.pad_token for k, t in _offline_tokenizers(CONFIGS_DIR / arch, index).items()}
    assert pads == {"sd1": {"tokenizer": "<|endoftext|>"}, "sd2-512": {"tokenizer": "!"}, "sd2-768": {"tokenizer": "!"},
                    "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}}


def test_sd2_release_switch(tiny_sd1):
    """What the loader does when an SD-2.x file turns out not to predict v: 512-base scheduler and sizes."""
    pipe = load_pipeline(ModelSource(str(tiny_sd1))).pipeline
    _switch_to(pipe, CONFIGS_DIR / "sd2-768")
    assert (type(pipe.scheduler).__name__, pipe.scheduler.config.prediction_type) == ("DDIMScheduler", "v_prediction")
    assert (pipe.unet.config.sample_size, pipe.vae.config.sample_size) == (96, 768)
    _switch_to(pipe, CONFIGS_DIR / "sd2-512")
    assert (type(pipe.scheduler).__name__, pipe.scheduler.config.prediction_type) == ("PNDMScheduler", "epsilon")
    assert (pipe.unet.config.sample_size, pipe.vae.config.sample_size) == (64, 512)


def test_unsupported_checkpoints_are_named():
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    with pytest.raises(UserError, match="SD-1.x inpainting checkpoints are not supported"):
        detect_architecture(shapes, "inpaint.safetensors")
    with pytest.raises(UserError, match="one diffusers component"):
        detect_architecture({"conv_in.weight": (320, 4, 3, 3)}, "unet.safetensors")


def test_openclip_layout_roundtrip():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"))
    sd = te.state_dict()
    back = convert_open_clip_checkpoint(te, openclip_to_ldm(sd))
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert back.keys() == {k for k in sd if not k.endswith("position_ids")}
    assert all(torch.equal(back[k], sd[k]) for k in back)


class _FakeUNet(torch.nn.Module):
    """Returns ``x + shift``: a v-model on a flat latent at t=999 lands far below the input."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"cross_attention_dim": 1024})()

    def forward(self, x, t, encoder_hidden_states):
        assert int(t) == 999 and encoder_hidden_states.shape == (1, 2, 1024)
        return type("O", (), {"sample": x + self.shift})()


def test_v_prediction_probe():
    assert uses_v_prediction(_FakeUNet(-1.6))
    assert not uses_v_prediction(_FakeUNet(-0.2))


# ---------------------------------------------------------------------------------------------------------------
# precision and attention helpers


def test_weight_dtype():
    assert weight_dtype("no") is torch.float32
    assert weight_dtype(None) is torch.float32
    assert weight_dtype("fp16") is torch.float16
    assert weight_dtype("bf16") is torch.bfloat16
    with pytest.raises(UserError, match="--mixed_precision fp8: expected one of no, fp16, bf16"):
        weight_dtype("fp8")


def test_xformers_missing_is_a_one_line_instruction(tiny_sd1):
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet")
    with pytest.raises(UserError) as e:
        enable_xformers(unet)
    msg = str(e.value)
    assert "\n" not in msg
    assert "xformers is not installed" in msg and "pip install -r requirements-cuda.txt" in msg
    assert _processors(unet) == {"AttnProcessor2_0"}  # the failed switch left SDPA in place


def test_xformers_without_cuda_says_so():
    class NoCuda:
        def enable_xformers_memory_efficient_attention(self):
            raise ValueError("torch.cuda.is_available() should be True but is False. xformers' memory efficient "
                             "attention is only available for GPU")

    with pytest.raises(UserError, match="xformers needs a CUDA GPU") as e:
        enable_xformers(NoCuda())
    assert "\n" not in str(e.value)


def test_set_tf32_round_trip():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before

