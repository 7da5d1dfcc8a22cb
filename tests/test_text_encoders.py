"""One description of the text encoders and one tokenize-and-splice path: what training feeds the UNet is what
previews and inference feed it for the same prompt and vectors (SD-1, SD-2, SDXL)."""

from __future__ import annotations

import pytest
import torch

from utils.embeddings import Embedding
from utils.prompts import EmbeddingDatabase, PromptEncoder
from utils.text_encoders import TextEncoders
from utils.trainers.textual_inversion import TextualInversion

NAME = "my-emb"
FAMILIES = ["tiny_sd1", "tiny_sd2", "tiny_sdxl"]
PROMPTS = [
    f"a photo of {NAME}, on a table",
    NAME,
    f"a (red:1.3) {NAME} BREAK by a [river]",  # emphasis and a second chunk
    "word " * 74 + NAME,  # the slots do not fit in the first chunk: they open the second one whole
    "a photo of a cat",  # no placeholder at all
]


def _setup(family, request):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(family))
    encoders = TextEncoders.of(pipe)
    g = torch.Generator().manual_seed(3)
    tables = [torch.randn(3, s.width, generator=g) for s in encoders.slots]
    ti = TextualInversion.build(pipe, Embedding(NAME, encoders.embedding_vectors(tables)))
    return pipe, encoders, ti


def _batch(prompts):
    return {"prompts": prompts, "add_time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(prompts))}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_description_of_each_family(family, request):
    pipe, encoders, _ = _setup(family, request)
    expected = {"tiny_sd1": "sd1", "tiny_sd2": "sd2", "tiny_sdxl": "sdxl"}[family]
    assert encoders.family == expected
    if expected == "sdxl":
        assert [(s.component, s.key, s.penultimate, s.pooled) for s in encoders.slots] == [
            ("text_encoder", "clip_l", True, False), ("text_encoder_2", "clip_g", True, True)]
        assert encoders.width == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    else:
        # SD-2: diffusers' encoder already ends at OpenCLIP's penultimate layer (23 of 24 layers in
        # utils/model_configs/sd2-*), so its last hidden state is what the UNet takes, as for SD-1.
        ((slot),) = encoders.slots
        assert (slot.component, slot.key, slot.penultimate, slot.pooled) == ("text_encoder", None, False, False)
        assert encoders.width == (1024 if expected == "sd2" else 32)
    if expected == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token_id == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_training_and_previews_give_identical_conditioning(family, request):
    """The training step's input (model_inputs -> the model's encode) against the preview/inference path (the
    embedding as trained so far, registered by name in a PromptEncoder): bit-identical, pooled output included."""
    pipe, encoders, ti = _setup(family, request)
    inputs = ti.model_inputs(_batch(PROMPTS), "cpu")
    assert all(ids.shape == (len(PROMPTS), 154) for ids in inputs["input_ids"])
    assert "weights" in inputs  # the emphasis of the third prompt reaches training too
    with torch.no_grad():
        hidden, pooled = ti.model.encode(inputs["input_ids"], inputs["weights"])
    db = EmbeddingDatabase([])
    db.register(ti.current(0))
    encoder = PromptEncoder(pipe, db)
    encoder.refresh()
    with torch.no_grad():
        cond = encoder.encode(PROMPTS)
    assert list(encoder.used_embeddings) == [NAME]
    assert hidden.shape == cond.embeds.shape == (len(PROMPTS), 154, encoders.width)
    assert torch.equal(hidden, cond.embeds)
    if encoders.is_sdxl:
        assert pooled is not None and torch.equal(pooled, cond.pooled)
    else:
        assert pooled is None and cond.pooled is None
    # the vectors are what differs from the plain words: another value gives another conditioning
    with torch.no_grad():
        for v in ti.parameters():
            v.add_(1.0)
        assert not torch.equal(ti.model.encode(inputs["input_ids"], inputs["weights"])[0][:4], hidden[:4])
        assert torch.equal(ti.model.encode(inputs["input_ids"], inputs["weights"])[0][4], hidden[4])


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_vectors_of_the_prompts_that_name_them(family, request):
    pipe, encoders, ti = _setup(family, request)
    frozen = [p for m in (*encoders.modules, pipe.unet) for p in m.parameters()]
    table = [e.get_input_embeddings().weight.detach().clone() for e in encoders.modules]

    def loss_of(prompts):
        inputs = ti.model_inputs(_batch(prompts), "cpu")
        noisy = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return ti.model(noisy, torch.tensor([10] * len(prompts)), **inputs).pow(2).mean()

    loss_of([PROMPTS[0], PROMPTS[2]]).backward()  # two chunks and emphasis through the UNet too
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in ti.parameters())  # every encoder's table
    assert all(p.grad is None for p in frozen)
    for v in ti.parameters():
        v.grad = None
    loss_of([PROMPTS[-1]]).backward()  # no placeholder: the vectors are in the graph but get nothing
    assert all(v.grad is not None and not v.grad.any() for v in ti.parameters())
    assert all(torch.equal(e.get_input_embeddings().weight, t) for e, t in zip(encoders.modules, table))


def test_an_embedding_of_the_other_family_is_one_line_naming_it(tiny_sd1, tiny_sdxl):
    """An SDXL embedding (clip_l/clip_g tables) on an SD-1 model, or an SD-1 one on SDXL: a UserError that names the
    embedding and says which kind it is, not a shape error from deep inside a text encoder."""
    from diffusers import DiffusionPipeline

    from utils.errors import UserError

    sd1 = TextEncoders.of(DiffusionPipeline.from_pretrained(tiny_sd1))
    sdxl = TextEncoders.of(DiffusionPipeline.from_pretrained(tiny_sdxl))
    xl_emb = Embedding("xl-emb", sdxl.embedding_vectors([torch.zeros(2, s.width) for s in sdxl.slots]))
    plain = Embedding("plain-emb", torch.zeros(2, sd1.width))
    with pytest.raises(UserError) as e:
        sd1.vectors_of(xl_emb)
    assert str(e.value) == "embedding 'xl-emb' is an SDXL embedding; this model is not SDXL"
    with pytest.raises(UserError) as e:
        sdxl.vectors_of(plain)
    assert str(e.value) == "embedding 'plain-emb' is not an SDXL embedding (it has no clip_l/clip_g vectors)"
