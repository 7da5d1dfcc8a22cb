"""CLIP-I / CLIP-T / DINO scores (utils/image_scores.py) with tiny random CLIP and ViT models built offline."""

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import UserError
from utils.image_scores import ImageScores, mean_similarity, prompt_without


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from utils.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    out = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(cfg).save_pretrained(out)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=build_clip_tokenizer(False))
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-vit")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def test_scores_of_identical_pictures_are_one_and_repeat_exactly(tiny_clip, tiny_vit):
    refs = [picture(0)]
    scorer = ImageScores(refs, clip_model=tiny_clip, dino_model=tiny_vit)
    same = scorer.scores([picture(0)], "a photo of a")
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)
    other = scorer.scores([picture(1), picture(2)], "a photo of a")
    assert other["clip_i"] < 1 - 1e-4 and other["dino"] < 1 - 1e-4
    assert scorer.scores([picture(1), picture(2)], "a photo of a") == other
    assert set(other) == {"clip_i", "clip_t", "dino"} and -1 <= other["clip_t"] <= 1


def test_scores_are_mean_cosine_over_all_pairs(tiny_clip):
    from transformers import AutoProcessor, CLIPModel

    refs = [picture(3), picture(4)]
    scorer = ImageScores(refs, clip_model=tiny_clip)
    gen = [picture(5), picture(6), picture(7)]
    got = scorer.scores(gen, "a red square")
    model, proc = CLIPModel.from_pretrained(tiny_clip), AutoProcessor.from_pretrained(tiny_clip)

    def feats(out):
        f = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(f, dim=-1)

    with torch.no_grad():
        g = feats(model.get_image_features(**proc(images=gen, return_tensors="pt")))
        r = feats(model.get_image_features(**proc(images=refs, return_tensors="pt")))
        t = feats(model.get_text_features(**proc.tokenizer(["a red square"], return_tensors="pt")))
    sims = [float(g[i] @ r[j]) for i in range(3) for j in range(2)]
    assert got["clip_i"] == pytest.approx(sum(sims) / 6, abs=1e-5)
    assert got["clip_t"] == pytest.approx(float((g @ t.T).mean()), abs=1e-5)
    assert "dino" not in got
    assert mean_similarity(torch.eye(2), torch.eye(2)) == 0.5


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--eval_clip_model .*could not load it") as e:
        ImageScores([picture(0)], clip_model=str(tmp_path / "missing"))
    assert "\n" not in str(e.value)


def test_prompt_without_the_concept_word():
    assert prompt_without("a photo of my-cat on a beach", "my-cat") == "a photo of on a beach"
    assert prompt_without("a photo of a my-cat", "my-cat", "cat") == "a photo of a cat"
