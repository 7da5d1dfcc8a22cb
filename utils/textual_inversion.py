"""What makes a training run textual inversion: new vectors spliced into the frozen text encoder(s).

The loop in utils/training.py sees only the small Trainable interface implemented here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from utils.embeddings import Embedding
from utils.prompts import PromptTokenizer
from utils.text_encoders import TextEncoders


class TextualInversionModel(nn.Module):
    """Everything the gradient flows through, as one module (so DDP wraps it and all-reduces only the vectors).

    The text encoder(s), UNet and their weights are frozen; the only parameters with ``requires_grad`` are the
    new vectors, one table per text encoder, kept in float32 whatever the models' dtype.
    """

    def __init__(self, encoders: TextEncoders, unet: nn.Module, vectors: list[torch.Tensor]):
        super().__init__()
        self.encoders = encoders
        self.text_encoders = nn.ModuleList(encoders.modules)
        self.unet = unet
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in vectors])
        self.sdxl = encoders.is_sdxl
        # Read once: diffusers' .dtype walks every submodule (about 1 ms per call on a small UNet).
        self.unet_dtype = next(unet.parameters()).dtype

    def encode(self, input_ids: list[torch.Tensor], weights: list[torch.Tensor | None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The same call as previews and inference make (utils/text_encoders.py), with this module's vectors as the
        # tables. A view of each Parameter, never the Parameter itself, goes into the encoders (see
        # utils.text_encoders.spliced); a fresh view per forward keeps the gradient flowing to the Parameter this
        # module owns (and DDP syncs).
        cond = self.encoders.encode(input_ids, [v.view_as(v) for v in self.vectors], weights)
        return cond.embeds, cond.pooled

    def forward(self, noisy_latents, timesteps, input_ids: list[torch.Tensor], add_time_ids=None, weights=None):
        hidden, pooled = self.encode(input_ids, weights)
        hidden = hidden.to(self.unet_dtype)
        added = None
        if self.sdxl:
            added = {"text_embeds": pooled.to(self.unet_dtype), "time_ids": add_time_ids.to(self.unet_dtype)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def tokenize_with_placeholder(tokenizer, prompts: list[str], name: str, num_vectors: int) -> torch.Tensor:
    """Token ids [B, 77·k] of ``prompts`` for one tokenizer, every ``name`` taking ``num_vectors`` slots (ids -1 ..
    -n): what training feeds the text encoder, from utils.prompts.PromptTokenizer like previews and inference.

    The name is matched as a token sequence, as A1111 does, so the prompt word and the embedding name cannot drift
    apart (diffusers#3097). Past 75 tokens a prompt goes on in a second 77-token window, never splitting the slots.
    """
    placeholder = Embedding(name, torch.zeros(num_vectors, 1))
    return PromptTokenizer([tokenizer], {name: placeholder})(list(prompts))[0].ids


@dataclass
class TextualInversion:
    """The Trainable for embeddings: the module, its parameters, how a batch becomes model inputs, the outputs."""

    embedding: Embedding  # name, starting vectors, step counter, checkpoint identity
    prompt_tokens: PromptTokenizer  # the trained embedding by name (each distinct prompt tokenized once)
    model: TextualInversionModel
    csv_name: str = "textual_inversion_loss.csv"
    kind: str = "textual inversion"

    @classmethod
    def build(cls, pipeline, embedding: Embedding) -> "TextualInversion":
        encoders = TextEncoders.of(pipeline)
        vectors = encoders.vectors_of(embedding)
        for module in (*encoders.modules, pipeline.unet):
            module.requires_grad_(False)
            module.eval()
        tokens = PromptTokenizer(encoders.tokenizers, {embedding.name: embedding})
        return cls(embedding, tokens, TextualInversionModel(encoders, pipeline.unet, vectors))

    @property
    def tokenizers(self) -> list:
        return self.model.encoders.tokenizers

    @property
    def name(self) -> str:
        return self.embedding.name

    @property
    def initial_step(self) -> int:
        return int(self.embedding.step or 0)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.vectors)

    def train(self) -> None:
        pass  # frozen models stay in eval mode (no dropout in what we do not train)

    def eval(self) -> None:
        pass

    def model_inputs(self, batch: dict, device) -> dict:
        tokens = self.prompt_tokens(batch["prompts"])
        inputs = {"input_ids": [t.ids.to(device) for t in tokens]}
        if any(t.weights is not None for t in tokens):  # A1111's (emphasis:1.2) in a caption
            inputs["weights"] = [None if t.weights is None else t.weights.to(device) for t in tokens]
        if self.model.sdxl:
            inputs["add_time_ids"] = batch["add_time_ids"].to(device)
        return inputs

    def vector_norm(self) -> float:
        return float(sum(v.detach().float().norm() ** 2 for v in self.model.vectors) ** 0.5)

    def current(self, step: int) -> Embedding:
        """A detached CPU float32 copy of the embedding as trained so far."""
        emb = copy.copy(self.embedding)
        vecs = [v.detach().float().cpu().clone() for v in self.model.vectors]
        emb.vectors = self.model.encoders.embedding_vectors(vecs)
        emb.step = step
        emb.filename = None
        emb.sha256 = None
        return emb

    def state_dict(self) -> dict:
        return {f"vectors.{i}": v.detach().cpu().clone() for i, v in enumerate(self.model.vectors)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for i, v in enumerate(self.model.vectors):
                v.copy_(state[f"vectors.{i}"].to(v.device, v.dtype))
