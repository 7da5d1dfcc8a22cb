"""diffusers' ``--save_as_full_pipeline``: the whole model, with the trained embedding added, as a diffusers folder.

As diffusers' textual-inversion examples do, the pipeline is saved into the output folder itself (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/ beside the embedding files), so
``StableDiffusionPipeline.from_pretrained(output_dir)`` loads a model that understands the trigger word. The
embedding goes in the way diffusers' own loader puts it: new tokenizer tokens (``<name>``, ``<name>_1``, ...: the token our diffusers files carry) and new
rows in the text encoder's vocabulary; every original weight is saved unchanged, in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils.embeddings import diffusers_prompt_token
from utils.models import ModelSource, load_pipeline
from utils.text_encoders import TextEncoders


def save_full_pipeline(source: ModelSource, name: str, out_dir: Path) -> Path:
    """Load the model again (CPU, float32: the training copy may be cast to fp16/bf16), add the run's learned_embeds
    files to it (one per text encoder), save it into ``out_dir``."""
    out_dir = Path(out_dir)
    pipe = load_pipeline(source, torch.float32).pipeline
    files = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
    for slot, weights in zip(TextEncoders.of(pipe).slots, files):
        pipe.load_textual_inversion(str(out_dir), weight_name=weights, token=diffusers_prompt_token(name),
                                    text_encoder=slot.text_encoder, tokenizer=slot.tokenizer)
    pipe.save_pretrained(str(out_dir))
    return out_dir / "model_index.json"
