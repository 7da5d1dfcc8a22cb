"""Putting embedding vectors into a CLIP text encoder without touching its vocabulary.

Token ids >= 0 look up the frozen vocabulary as usual; a negative id ``-(k + 1)`` takes row ``k`` of an extra vector
table instead. Negative ids leave the rest of the text model working unchanged: CLIP's pooling looks for the EOS id
(or the largest id, in old configs), which stays where it was. Because the vectors are a separate tensor, training
updates only them and every vocabulary row stays bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn


class SplicedTokenEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, vectors: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        # A Parameter when training (its gradient is what the optimizer sees), a plain tensor at inference.
        self.vectors = vectors

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight (dtype, device, tied weights)
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(min=0))
        if self.vectors is None:
            return out
        spliced = input_ids < 0
        rows = self.vectors.to(device=out.device, dtype=out.dtype)[(-input_ids - 1).clamp(min=0)]
        return torch.where(spliced.unsqueeze(-1), rows, out)


def splice_into(text_encoder: nn.Module, vectors: torch.Tensor | None) -> SplicedTokenEmbedding:
    """Wrap ``text_encoder``'s token embedding (once) and point it at ``vectors``; returns the wrapper."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, SplicedTokenEmbedding):
        current.vectors = vectors
        return current
    wrapper = SplicedTokenEmbedding(current, vectors)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def unsplice(text_encoder: nn.Module) -> None:
    current = text_encoder.get_input_embeddings()
    if isinstance(current, SplicedTokenEmbedding):
        text_encoder.set_input_embeddings(current.base)


def find_subsequence(seq: list[int], sub: list[int], start: int = 0) -> int:
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return -1
