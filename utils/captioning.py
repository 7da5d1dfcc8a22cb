"""Captions for training pictures: image-to-text models (BLIP and friends) and booru-style taggers, batched.

Also the small text rules around captions that A1111's preprocessing had: combining with an existing caption file, and the
old layout that put the caption in the file name (docs/a1111-rules.md, "Preprocessing").
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from utils.errors import UserError

EXISTING_CAPTION_ACTIONS = ("ignore", "copy", "prepend", "append")

# What the trainers strip from a file stem to get the caption back (A1111 dataset.py rule).
FILENAME_PREFIX = re.compile(r"^[-\d]+\s*")
_PATH_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')


def combine_caption(existing: str | None, new: str, action: str) -> str:
    """A1111's "existing caption txt action": prepend -> "<existing> <new>", append -> "<new> <existing>"."""
    existing = (existing or "").strip()
    new = new.strip()
    if action == "ignore" or not existing:
        return new
    if action == "copy":
        return existing
    if action == "prepend":
        return f"{existing} {new}".strip()
    if action == "append":
        return f"{new} {existing}".strip()
    raise ValueError(f"unknown existing-caption action {action!r}; expected one of {EXISTING_CAPTION_ACTIONS}")


def caption_for_filename(caption: str, max_bytes: int = 200) -> str:
    """The caption made safe as part of a file name: no path-invalid characters, one line, at most max_bytes of UTF-8.

    200 bytes leaves room for the `00000-0-` prefix and `.png` under the usual 255-byte name limit.
    """
    text = " ".join(_PATH_UNSAFE.sub(" ", caption).split()).strip(" .")
    data = text.encode("utf-8")[:max_bytes]
    return data.decode("utf-8", errors="ignore").rstrip(" .")


def caption_from_filename(stem: str) -> str:
    """What a trainer reads as the caption of a picture without a .txt (A1111: strip leading digits/dashes)."""
    return FILENAME_PREFIX.sub("", stem)


def best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _image_processor_kwargs() -> dict:
    # transformers picks the torchvision image processor when it can and warns when it cannot; we never require
    # torchvision, so ask for the PIL one outright in that case.
    from transformers.utils import is_torchvision_available

    return {} if is_torchvision_available() else {"backend": "pil"}


@dataclass
class CaptionerConfig:
    model: str | None = None  # hub id or folder of an image-to-text model (BLIP, GIT, BLIP-2, ...)
    tagger: str | None = None  # folder of a transformers image-classification tagger, or an ONNX tagger file/folder
    batch_size: int = 8
    max_new_tokens: int = 40
    num_beams: int = 1
    prompt: str | None = None  # text prompt for models that want one (e.g. "a picture of")
    tagger_threshold: float = 0.35
    device: str | None = None  # None: CUDA when present, else CPU


class ImageToText:
    """An image-to-text model that transformers can load with AutoModelForImageTextToText."""

    def __init__(self, model: str, device: str, max_new_tokens: int = 40, num_beams: int = 1, prompt: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model, **_image_processor_kwargs())
            dtype = torch.float16 if device == "cuda" else torch.float32
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load caption model {model!r}: {' '.join(str(e).split())[:300]}") from None
        self.device, self.dtype = device, dtype
        self.max_new_tokens, self.num_beams, self.prompt = max_new_tokens, num_beams, prompt

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        kwargs = {"images": [im.convert("RGB") for im in images], "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _tag_text(name: str) -> str:
    # A1111's deepbooru defaults: underscores as spaces, parentheses escaped so prompts do not read them as emphasis.
    return name.replace("_", " ").replace("(", "\\(").replace(")", "\\)")


class ClassifierTagger:
    """A booru tagger saved as a transformers image-classification model (multi-label: sigmoid per tag)."""

    def __init__(self, path: str, device: str, threshold: float):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            self.processor = AutoImageProcessor.from_pretrained(path, **_image_processor_kwargs())
            self.model = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load tagger {path!r}: {' '.join(str(e).split())[:300]}") from None
        self.device, self.threshold = device, threshold
        self.labels = self.model.config.id2label

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(**inputs).logits.float()).cpu().numpy()
        return [_tags_above(p, [self.labels[i] for i in range(len(p))], self.threshold) for p in probs]


def _tags_above(probs: np.ndarray, names: Sequence[str], threshold: float) -> str:
    order = np.argsort(-probs, kind="stable")
    return ", ".join(_tag_text(names[i]) for i in order if probs[i] >= threshold)


class OnnxTagger:
    """A WD14-style ONNX tagger: `model.onnx` (NHWC BGR 0-255 input) and `selected_tags.csv` beside it.

    Needs the optional onnxruntime package. Rating tags (category 9) are left out of captions.
    """

    def __init__(self, path: str, threshold: float):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("an ONNX tagger needs the onnxruntime package: pip install onnxruntime") from None
        p = Path(path)
        model = p / "model.onnx" if p.is_dir() else p
        tags_csv = model.parent / "selected_tags.csv"
        if not model.is_file() or not tags_csv.is_file():
            raise UserError(f"ONNX tagger needs {model} and {tags_csv}")
        self.session = ort.InferenceSession(str(model), providers=ort.get_available_providers())
        self.input = self.session.get_inputs()[0]
        self.size = int(self.input.shape[1])
        with open(tags_csv, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        self.names = [r["name"] for r in rows]
        self.keep = np.array([r.get("category", "0") != "9" for r in rows])
        self.threshold = threshold

    def _prepare(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        side = max(img.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        batch = np.ascontiguousarray(np.stack([self._prepare(im) for im in images]))
        probs = self.session.run(None, {self.input.name: batch})[0]
        probs = np.where(self.keep, probs, 0.0)
        return [_tags_above(p, self.names, self.threshold) for p in probs]


def _is_onnx(path: str) -> bool:
    return path.endswith(".onnx") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.onnx")))


class Captioner:
    """Caption text for pictures: the image-to-text caption, then `", "` and the tagger's tags (A1111's order)."""

    def __init__(self, cfg: CaptionerConfig):
        if not cfg.model and not cfg.tagger:
            raise ValueError("Captioner needs a caption model, a tagger, or both")
        self.cfg = cfg
        self.device = cfg.device or best_device()
        self.model = (
            ImageToText(cfg.model, self.device, cfg.max_new_tokens, cfg.num_beams, cfg.prompt) if cfg.model else None
        )
        self.tagger = None
        if cfg.tagger:
            if _is_onnx(cfg.tagger):
                self.tagger = OnnxTagger(cfg.tagger, cfg.tagger_threshold)
            else:
                self.tagger = ClassifierTagger(cfg.tagger, self.device, cfg.tagger_threshold)

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        out: list[str] = []
        for batch in _batches(list(images), max(1, self.cfg.batch_size)):
            captions = self.model(batch) if self.model else [""] * len(batch)
            tags = self.tagger(batch) if self.tagger else [""] * len(batch)
            out += [", ".join(t for t in (c, g) if t) for c, g in zip(captions, tags)]
        return out


TINY_BLIP_WORDS = (
    "a photo of the cat dog tree house red blue green small large sitting on in with and picture painting man woman "
    "field sky water city road"
).split()


def build_tiny_blip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-weight BLIP captioner (a few hundred kB) that loads like a real one; for tests and demos.

    BERT word-piece vocab from a short word list, a 1-layer 32-wide BLIP, and the PIL image processor (no torchvision).
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *TINY_BLIP_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, sep_token_id=3,
                bos_token_id=vocab.index("[DEC]"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(folder)
    return folder
