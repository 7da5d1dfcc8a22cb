"""Image-based fidelity scores, as DreamBench measures them: CLIP-I and DINO (generated pictures against the training
pictures) and CLIP-T (generated pictures against the prompt without the concept word).

Any transformers CLIP folder or Hub id works for CLIP (``CLIPModel`` + its processor), any transformers vision
backbone for DINO (``AutoModel`` + ``AutoImageProcessor``: DINO ViT, DINOv2, ...; the CLS token is the feature).
Each score is the mean cosine similarity over all (generated, reference) pairs. The reference features are computed
once; the models run in inference mode and use no RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.errors import UserError


def _features(output) -> torch.Tensor:
    # transformers < 5 returns the projected features as a tensor, 5 inside a model output (pooler_output)
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _load(kind: str, name: str, loader):
    try:
        return loader()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--eval_{kind}_model {name}: could not load it ({first})") from None


@dataclass
class _Model:
    model: object
    processor: object
    device: object
    dtype: torch.dtype

    def pixels(self, images: list) -> torch.Tensor:
        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return batch["pixel_values"].to(self.device, self.dtype)


class ClipScorer:
    """CLIP image and text features from a transformers CLIP folder or Hub id."""

    def __init__(self, name: str, device="cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, CLIPModel

        model = _load("clip", name, lambda: CLIPModel.from_pretrained(name, dtype=dtype))
        processor = _load("clip", name, lambda: AutoProcessor.from_pretrained(name))
        self.m = _Model(model.to(device).eval().requires_grad_(False), processor, device, dtype)

    @torch.inference_mode()
    def image_features(self, images: list, batch_size: int = 16) -> torch.Tensor:
        out = [_features(self.m.model.get_image_features(pixel_values=self.m.pixels(images[i:i + batch_size])))
               for i in range(0, len(images), batch_size)]
        return _unit(torch.cat(out)).cpu()

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tok = self.m.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.m.model.get_text_features(input_ids=tok["input_ids"].to(self.m.device),
                                             attention_mask=tok["attention_mask"].to(self.m.device))
        return _unit(_features(out)).cpu()


class DinoScorer:
    """CLS-token features of a transformers vision backbone (DINO ViT-S/16 in DreamBench)."""

    def __init__(self, name: str, device="cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, AutoModel

        model = _load("dino", name, lambda: AutoModel.from_pretrained(name, dtype=dtype))
        processor = _load("dino", name, lambda: AutoImageProcessor.from_pretrained(name))
        self.m = _Model(model.to(device).eval().requires_grad_(False), processor, device, dtype)

    @torch.inference_mode()
    def image_features(self, images: list, batch_size: int = 16) -> torch.Tensor:
        out = [self.m.model(pixel_values=self.m.pixels(images[i:i + batch_size])).last_hidden_state[:, 0]
               for i in range(0, len(images), batch_size)]
        return _unit(torch.cat(out)).cpu()


def mean_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of two unit-normalised feature matrices."""
    return float((a @ b.T).mean())


class ImageScores:
    """``scores(images, prompt)`` -> {"clip_i", "clip_t", "dino"} for the models given (either may be None).

    ``references``: the training pictures (PIL), embedded once."""

    def __init__(self, references: list, clip_model: str | None = None, dino_model: str | None = None,
                 device="cpu", dtype: torch.dtype = torch.float32):
        if not references:
            raise ValueError("image scores need at least one reference picture")
        self.clip = ClipScorer(clip_model, device, dtype) if clip_model else None
        self.dino = DinoScorer(dino_model, device, dtype) if dino_model else None
        self.clip_refs = self.clip.image_features(references) if self.clip else None
        self.dino_refs = self.dino.image_features(references) if self.dino else None

    def scores(self, images: list, prompt: str | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        if not images:
            return out
        if self.clip is not None:
            feats = self.clip.image_features(images)
            out["clip_i"] = mean_similarity(feats, self.clip_refs)
            if prompt is not None:
                out["clip_t"] = mean_similarity(feats, self.clip.text_features([prompt]))
        if self.dino is not None:
            out["dino"] = mean_similarity(self.dino.image_features(images), self.dino_refs)
        return out


def prompt_without(prompt: str, name: str, replacement: str = "") -> str:
    """CLIP-T's text: the prompt with the concept's word removed, or replaced by ``replacement`` (e.g. the class
    word: "a photo of a my-cat" -> "a photo of a cat")."""
    return " ".join(prompt.replace(name, f" {replacement} ").split())
