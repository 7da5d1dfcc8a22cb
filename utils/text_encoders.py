"""The text side of Stable Diffusion models, described once, and the one way embedding vectors enter it.

* :class:`TextEncoders` -- which text encoders a pipeline has, in the order their outputs are joined, with their
  tokenizers and widths and which hidden state conditions the UNet: SD-1 (CLIP-L, 768) and SD-2 (OpenCLIP-H, 1024)
  take the last hidden state of their one encoder (diffusers' SD-2 encoder already ends at OpenCLIP's penultimate
  layer); SDXL takes the penultimate hidden states of CLIP-L (768) and OpenCLIP-G (1280) side by side, plus the
  second encoder's pooled output (a refiner has only the second encoder). An SDXL embedding holds one vector table
  per encoder, under the keys ``clip_l`` and ``clip_g``.
* :meth:`TextEncoders.encode` -- token ids + one vector table per encoder -> :class:`Conditioning`. Training,
  previews and inference all come here with ids from utils.prompts.PromptTokenizer: a negative id ``-(r + 1)``
  takes row ``r`` of the table instead of a vocabulary row. Training passes the vectors it optimises (the gradient
  reaches them and nothing else), inference the vectors of the embeddings named in the prompt.

The table goes in by wrapping the encoder's token-embedding module for the one call (:func:`spliced`). Negative ids
leave the rest of the text model working unchanged: CLIP's pooling looks for the EOS id (or the largest id, in old
configs), which stays where it was. The vocabulary, the tokenizer and every weight stay as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from utils.embeddings import SDXL_KEYS, Embedding
from utils.errors import UserError

WINDOW = 77  # tokens per text-encoder call: BOS + 75 + EOS (A1111's chunk)


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a pipeline and the part it plays."""

    component: str  # the pipeline attribute: "text_encoder" | "text_encoder_2" (tokenizer: "tokenizer" | "_2")
    tokenizer: object
    text_encoder: nn.Module
    key: str | None  # which vectors of an SDXL embedding go here ('clip_l' / 'clip_g'); None for SD-1/SD-2
    penultimate: bool  # SDXL conditions on the second-to-last hidden layer
    pooled: bool  # this encoder gives SDXL's pooled text embedding

    @property
    def width(self) -> int:
        return int(self.text_encoder.config.hidden_size)


@dataclass
class Conditioning:
    embeds: torch.Tensor  # [B, 77·k, C]
    pooled: torch.Tensor | None = None  # [B, P] for SDXL


class TextEncoders:
    """The text encoders of a pipeline (SD-1, SD-2, SDXL, SDXL refiner)."""

    def __init__(self, slots: list[TextEncoderSlot]):
        self.slots = slots

    @classmethod
    def of(cls, pipeline) -> "TextEncoders":
        te1 = getattr(pipeline, "text_encoder", None)
        te2 = getattr(pipeline, "text_encoder_2", None)
        if te2 is None:
            return cls([TextEncoderSlot("text_encoder", pipeline.tokenizer, te1, None, False, False)])
        slots = []
        if te1 is not None:
            slots.append(TextEncoderSlot("text_encoder", pipeline.tokenizer, te1, SDXL_KEYS[0], True, False))
        slots.append(TextEncoderSlot("text_encoder_2", pipeline.tokenizer_2, te2, SDXL_KEYS[1], True, True))
        return cls(slots)

    @property
    def is_sdxl(self) -> bool:
        return self.slots[-1].key is not None

    @property
    def family(self) -> str:
        """'sdxl' for two text encoders, else 'sd2' for a 1024-wide text encoder, else 'sd1'."""
        if self.is_sdxl:
            return "sdxl"
        return "sd2" if self.width == 1024 else "sd1"

    @property
    def width(self) -> int:
        """A1111's expected embedding width: SD-1 768, SD-2 1024, SDXL 768 + 1280."""
        return sum(s.width for s in self.slots)

    @property
    def tokenizers(self) -> list:
        return [s.tokenizer for s in self.slots]

    @property
    def modules(self) -> list[nn.Module]:
        return [s.text_encoder for s in self.slots]

    def token_tables(self) -> list[tuple[object, nn.Module]]:
        """(tokenizer, token-embedding table) per encoder: what new embeddings are initialised from."""
        return [(s.tokenizer, s.text_encoder.get_input_embeddings()) for s in self.slots]

    def vectors_of(self, emb: Embedding) -> list[torch.Tensor]:
        """``emb``'s vectors as one table per encoder; a one-line error when it was made for another family."""
        if emb.is_sdxl and not self.is_sdxl:
            raise UserError(f"embedding {emb.name!r} is an SDXL embedding; this model is not SDXL")
        if self.is_sdxl and not emb.is_sdxl:
            raise UserError(f"embedding {emb.name!r} is not an SDXL embedding (it has no {'/'.join(SDXL_KEYS)} vectors)")
        return [emb.vectors[s.key] for s in self.slots] if self.is_sdxl else [emb.vectors]

    def embedding_vectors(self, tables: list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """The inverse of :meth:`vectors_of`: per-encoder tables as an Embedding's ``vectors``."""
        return {s.key: t for s, t in zip(self.slots, tables)} if self.is_sdxl else tables[0]

    def tables_for(self, embeddings: list[Embedding]) -> list[torch.Tensor | None]:
        """Per encoder, the vectors of ``embeddings`` stacked in order (what the ids of a PromptTokenizer batch
        point into); None when there are none."""
        if not embeddings:
            return [None] * len(self.slots)
        per = [self.vectors_of(e) for e in embeddings]
        return [torch.cat([p[i] for p in per]) for i in range(len(self.slots))]

    def encode(self, input_ids: list[torch.Tensor], tables: list[torch.Tensor | None],
               weights: list[torch.Tensor | None] | None = None) -> Conditioning:
        """The UNet's conditioning from ids [B, 77·k] per encoder: each 77-token window through the encoder with
        ``tables[i]`` spliced in, windows joined along the sequence, encoders along the width; A1111's emphasis
        ``weights`` [B, 77·k] (None: all 1); the pooled output of the first window. Gradients reach the tables."""
        hidden, pooled = [], None
        for i, (slot, ids, table) in enumerate(zip(self.slots, input_ids, tables)):
            te = slot.text_encoder
            w = None if weights is None else weights[i]
            outs = []
            with spliced(te, table):
                for c, window in enumerate(ids.split(WINDOW, dim=1)):
                    out = te(window, output_hidden_states=slot.penultimate)
                    z = out.hidden_states[-2] if slot.penultimate else out[0]
                    if w is not None:
                        z = apply_emphasis(z, w[:, c * WINDOW : c * WINDOW + window.shape[1]])
                    outs.append(z)
                    if c == 0 and slot.pooled:
                        pooled = out[0]
            hidden.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        return Conditioning(hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1), pooled)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis: scale each token's output, then restore each sample's mean."""
    if bool((weights == 1).all()):
        return z
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z)[:, :, None]
    after = z.mean(dim=(1, 2), keepdim=True)
    return z * (before / after)


class SplicedTokenEmbedding(nn.Module):
    """A token-embedding module where id ``-(r + 1)`` takes row ``r`` of ``table`` (ids >= 0: the vocabulary)."""

    def __init__(self, base: nn.Module, table: torch.Tensor):
        super().__init__()
        self.base = base
        self.table = table

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight (dtype, device)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(min=0))
        rows = self.table.to(device=out.device, dtype=out.dtype)[(-input_ids - 1).clamp(min=0)]
        return torch.where((input_ids < 0).unsqueeze(-1), rows, out)


@contextmanager
def spliced(text_encoder: nn.Module, table: torch.Tensor | None):
    """For one call, ``text_encoder`` reads negative ids as rows of ``table`` (see :class:`SplicedTokenEmbedding`).

    The table is never registered inside the encoder: a float32 Parameter there would make transformers report the
    encoder's dtype as float32 under bf16/fp16 (and pipelines cast the conditioning to it). The encoder gets its own
    module back afterwards, so saved or exported models never see the wrapper."""
    if table is None:
        yield
        return
    original = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(SplicedTokenEmbedding(original, table))
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(original)
