"""The textual-inversion Trainable on its own (no training run): what it trains, reports, saves and hands back."""

from __future__ import annotations

import pytest
import torch

from utils.embeddings import Embedding
from utils.trainers.textual_inversion import TextualInversion
from utils.training import loss_log_name, method_title, parameter_norm


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_sd1)


def _ti(pipe, vectors=None, step=None) -> TextualInversion:
    vectors = torch.tensor([[3.0] + [0.0] * 31, [0.0, 4.0] + [0.0] * 30]) if vectors is None else vectors
    return TextualInversion.build(pipe, Embedding("my-emb", vectors, step=step, filename="/x/my-emb.pt",
                                                  sha256="ab" * 32))


def test_only_the_vectors_are_parameters_and_the_models_are_frozen(pipe):
    ti = _ti(pipe)
    params = ti.parameters()
    assert len(params) == 1 and params[0].shape == (2, 32) and params[0].requires_grad
    assert params[0].dtype == torch.float32
    for module in (pipe.text_encoder, pipe.unet):
        assert not any(p.requires_grad for p in module.parameters()) and not module.training
    # The loop derives the messages' title and the loss log's name (A1111's) from the method.
    assert ti.name == "my-emb" and method_title(ti) == "textual inversion"
    assert loss_log_name(ti) == "textual_inversion_loss.csv"


def test_vector_norm_and_initial_step(pipe):
    ti = _ti(pipe, step=120)
    assert parameter_norm(ti.parameters()) == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    assert ti.initial_step == 120
    assert _ti(pipe).initial_step == 0


def test_current_is_a_detached_copy_at_a_step(pipe):
    ti = _ti(pipe, step=3)
    with torch.no_grad():
        ti.parameters()[0].add_(1.0)
    emb = ti.current(17)
    assert emb.name == "my-emb" and emb.step == 17 and emb.filename is None and emb.sha256 is None
    assert torch.equal(emb.vectors, ti.parameters()[0].detach()) and not emb.vectors.requires_grad
    with torch.no_grad():
        ti.parameters()[0].add_(1.0)
    assert not torch.equal(emb.vectors, ti.parameters()[0].detach())  # a copy, not a view
    assert ti.embedding.step == 3 and ti.embedding.filename == "/x/my-emb.pt"  # the original is untouched


def test_state_dict_round_trip(pipe):
    a, b = _ti(pipe), _ti(pipe, vectors=torch.zeros(2, 32))
    state = a.state_dict()
    assert list(state) == ["vectors.0"] and torch.equal(state["vectors.0"], a.parameters()[0].detach())
    b.load_state_dict(state)
    assert torch.equal(b.parameters()[0].detach(), a.parameters()[0].detach())
    with torch.no_grad():
        a.parameters()[0].add_(1.0)
    assert not torch.equal(state["vectors.0"], a.parameters()[0].detach())  # the state was a copy


def test_model_inputs_put_the_placeholder_in_every_prompt(pipe):
    ti = _ti(pipe)
    inputs = ti.model_inputs({"prompts": ["a photo of my-emb", "my-emb, my-emb"]}, "cpu")
    (ids,) = inputs["input_ids"]
    assert ids.shape == (2, 77) and set(inputs) == {"input_ids"}
    assert (ids[0] < 0).sum() == 2 and (ids[1] < 0).sum() == 4
    again = ti.model_inputs({"prompts": ["a photo of my-emb", "my-emb, my-emb"]}, "cpu")["input_ids"][0]
    assert torch.equal(again, ids)  # from the per-prompt cache: the same ids
    # on the training device ("meta" stands in for a GPU)
    assert ti.model_inputs({"prompts": ["my-emb"]}, "meta")["input_ids"][0].device.type == "meta"


def test_the_text_encoder_keeps_its_plain_table(pipe):
    """The vectors are spliced in for each forward only: the pipeline's encoder (saved, exported, used for previews)
    never holds the wrapper, and the spliced ids make a difference."""
    table = pipe.text_encoder.get_input_embeddings()
    ti = _ti(pipe)
    ids = torch.tensor([[49406, 320, -1, -2, 49407]])
    with torch.no_grad():
        spliced = ti.model.encode([ids])[0]
    assert pipe.text_encoder.get_input_embeddings() is table
    plain_ids = torch.tensor([[49406, 320, 320, 320, 49407]])
    with torch.no_grad():
        assert not torch.equal(pipe.text_encoder(plain_ids)[0], spliced)


def test_sdxl_current_and_state_hold_both_tables(tiny_sdxl):
    from diffusers import DiffusionPipeline

    sdxl = DiffusionPipeline.from_pretrained(tiny_sdxl)
    widths = (sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size)
    vectors = {"clip_l": torch.ones(2, widths[0]), "clip_g": torch.full((2, widths[1]), 2.0)}
    ti = TextualInversion.build(sdxl, Embedding("x-emb", vectors))
    assert [p.shape for p in ti.parameters()] == [(2, widths[0]), (2, widths[1])]
    emb = ti.current(5)
    assert set(emb.vectors) == {"clip_l", "clip_g"} and torch.equal(emb.vectors["clip_g"], vectors["clip_g"])
    assert list(ti.state_dict()) == ["vectors.0", "vectors.1"]
    assert parameter_norm(ti.parameters()) == pytest.approx((2 * widths[0] + 4 * 2 * widths[1]) ** 0.5)
    batch = {"prompts": ["x-emb"], "add_time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    inputs = ti.model_inputs(batch, "cpu")
    assert len(inputs["input_ids"]) == 2 and torch.equal(inputs["add_time_ids"], batch["add_time_ids"])
    assert ti.model_inputs(batch, "meta")["add_time_ids"].device.type == "meta"


def test_the_unet_gets_the_conditioning_in_its_own_dtype(tiny_sd1):
    """A bf16 UNet beside a float32 text encoder (and the float32 vectors): the conditioning is cast for the UNet."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.unet.to(torch.bfloat16)
    ti = _ti(pipe)
    ids = ti.model_inputs({"prompts": ["a photo of my-emb"]}, "cpu")
    noisy = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        pred = ti.model(noisy, torch.tensor([10]), **ids)
    assert pred.dtype == torch.bfloat16 and pred.shape == (1, 4, 8, 8)


def test_each_prompt_is_tokenized_once(pipe):
    """Templates repeat a bounded set of prompts: the ids are cached per prompt (tokenizing is a per-step cost)."""
    ti = _ti(pipe)
    chunker = ti.prompt_tokens.chunkers[0]
    tokenizer, calls = chunker.tokenizer, []

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return tokenizer(*args, **kwargs)

    chunker.tokenizer = Counting()
    first = ti.model_inputs({"prompts": ["a photo of my-emb"]}, "cpu")["input_ids"][0]
    n = len(calls)
    again = ti.model_inputs({"prompts": ["a photo of my-emb"] * 3}, "cpu")["input_ids"][0]
    assert n > 0 and len(calls) == n and torch.equal(again[1], first[0])
    ti.model_inputs({"prompts": ["another my-emb"]}, "cpu")
    assert len(calls) > n


def test_a_dotted_name_keeps_its_whole_name_in_the_file_names(tmp_path):
    """'v1.5-x' is a whole name, not a stem with a '.5-x' suffix to replace."""
    from utils.embeddings import Embedding, load_embedding
    from utils.trainers.textual_inversion import TextualInversionOutputs

    emb = Embedding("v1.5-x", torch.randn(2, 8))
    files = TextualInversionOutputs._write(None, emb, tmp_path / "v1.5-x")
    assert sorted(f.name for f in files) == ["v1.5-x.pt", "v1.5-x.safetensors"]
    assert load_embedding(tmp_path / "v1.5-x.pt").name == "v1.5-x"


def test_an_embedding_of_another_width_or_family_cannot_be_continued(tiny_sd1):
    """check_width: a plain (SD) embedding 768 wide on a 32-wide SD-1 model is refused in one line, like an SDXL one;
    one of the model's own width passes."""
    from types import SimpleNamespace

    from diffusers import DiffusionPipeline

    from utils.errors import UserError
    from utils.trainers.textual_inversion import check_width

    loaded = SimpleNamespace(pipeline=DiffusionPipeline.from_pretrained(tiny_sd1), family="sd1")
    check_width(Embedding("fits", torch.zeros(2, 32)), loaded)
    with pytest.raises(UserError) as e:
        check_width(Embedding("wide", torch.zeros(2, 768)), loaded)
    assert str(e.value) == "embedding 'wide' is 768 wide (SD), but the model's text encoder(s) are 32 wide (sd1)"
    xl = Embedding("xl", {"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(2, 16)})
    with pytest.raises(UserError, match="embedding 'xl' is 32 wide \\(SDXL\\)"):
        check_width(xl, loaded)
