"""utils/captioning.py: caption text rules, a tiny random BLIP built offline, a tiny transformers tagger."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from utils.captioning import (
    Captioner,
    CaptionerConfig,
    build_tiny_blip,
    caption_for_filename,
    caption_from_filename,
    combine_caption,
)
from utils.errors import UserError


def test_combine_caption_actions():
    assert combine_caption("a cat", "a dog", "ignore") == "a dog"
    assert combine_caption("a cat", "a dog", "copy") == "a cat"
    assert combine_caption("a cat\n", "a dog", "prepend") == "a cat a dog"
    assert combine_caption("a cat", "a dog", "append") == "a dog a cat"
    assert combine_caption(None, "a dog", "prepend") == "a dog"
    assert combine_caption("a cat", "", "append") == "a cat"
    assert combine_caption("", "", "copy") == ""
    with pytest.raises(ValueError):
        combine_caption("a", "b", "merge")


def test_caption_in_file_name_round_trips_through_the_trainer_rule():
    name = caption_for_filename('a photo: "cat" / dog?\n on a <mat>')
    assert name == "a photo cat dog on a mat"
    assert caption_from_filename(f"00012-3-{name}") == name
    assert caption_from_filename("00000-0-cat") == "cat"
    long = caption_for_filename("é" * 300, max_bytes=201)
    assert long == "é" * 100 and len(long.encode()) == 200  # never cut inside a UTF-8 character


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


def pictures(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_blip_captions_in_batches_without_torchvision(tiny_blip):
    captioner = Captioner(CaptionerConfig(model=str(tiny_blip), batch_size=2, max_new_tokens=8, device="cpu"))
    assert type(captioner.model.processor.image_processor).__name__ == "BlipImageProcessorPil"
    assert "torchvision" not in sys.modules
    imgs = pictures(5)
    batched = captioner(imgs)
    assert len(batched) == 5
    assert batched == [captioner([im])[0] for im in imgs]  # batching does not change a caption
    words = set((tiny_blip / "vocab.txt").read_text().split())
    assert all(c and set(c.split()) <= words for c in batched)  # decoded text, special tokens removed
    assert len(batched[0].split()) <= 8


def test_bad_caption_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load caption model"):
        Captioner(CaptionerConfig(model=str(tmp_path), device="cpu"))


@pytest.fixture(scope="module")
def tiny_tagger(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tagger")
    labels = ["long_hair", "smile_(happy)", "outdoors"]
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=16, num_labels=3, id2label=dict(enumerate(labels)),
                    label2id={v: k for k, v in enumerate(labels)}, problem_type="multi_label_classification")
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg)
    with torch.no_grad():  # fixed, distinct tag probabilities whatever the picture: 0.88, 0.5, 0.12
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_tagger_tags_above_threshold_sorted_and_escaped(tiny_tagger):
    tagger_only = Captioner(CaptionerConfig(tagger=str(tiny_tagger), tagger_threshold=0.3, device="cpu"))
    assert tagger_only(pictures(2)) == ["long hair, smile \\(happy\\)"] * 2
    everything = Captioner(CaptionerConfig(tagger=str(tiny_tagger), tagger_threshold=0.0, device="cpu"))
    assert everything(pictures(1)) == ["long hair, smile \\(happy\\), outdoors"]


def test_caption_then_tags_joined_with_comma(tiny_blip, tiny_tagger):
    both = Captioner(CaptionerConfig(model=str(tiny_blip), tagger=str(tiny_tagger), tagger_threshold=0.6,
                                     max_new_tokens=6, device="cpu"))
    blip_only = Captioner(CaptionerConfig(model=str(tiny_blip), max_new_tokens=6, device="cpu"))
    imgs = pictures(3)
    assert both(imgs) == [f"{c}, long hair" for c in blip_only(imgs)]


def test_onnx_tagger_without_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it raises ImportError
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="onnxruntime"):
        Captioner(CaptionerConfig(tagger=str(tmp_path / "model.onnx")))


def test_onnx_tagger_wd14_layout(tmp_path):
    """A WD14-style tagger built with onnx.helper: NHWC BGR 0-255 input, selected_tags.csv, ratings left out."""
    import onnx  # both in requirements.txt: this test runs everywhere, CI included
    from onnx import TensorProto, helper, numpy_helper

    # probs = sigmoid(mean_hw(pixels) @ W + b); only the blue channel (index 0 in BGR) feeds tag 3.
    w = np.zeros((3, 5), dtype=np.float32)
    w[0, 3] = 0.1
    b = np.array([2.0, 0.0, -2.0, -20.0, 3.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "W"], ["z"]), helper.make_node("Add", ["z", "b"], ["l"]),
         helper.make_node("Sigmoid", ["l"], ["probs"])],
        "tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"), numpy_helper.from_array(w, "W"),
         numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "selected_tags.csv").write_text(
        "tag_id,name,category,count\n1,long_hair,0,10\n2,smile_(happy),0,9\n3,outdoors,0,8\n4,blue_theme,0,7\n"
        "5,general,9,100\n", encoding="utf-8")
    tagger = Captioner(CaptionerConfig(tagger=str(tmp_path), tagger_threshold=0.3))
    red, blue = Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("RGB", (20, 40), (0, 0, 255))
    # Padded to a white square: blue's mean B is 255 (logit 5.5, kept); red's is 127.5 from the padding (logit -7.25).
    assert tagger([blue, red]) == ["blue theme, long hair, smile \\(happy\\)", "long hair, smile \\(happy\\)"]
