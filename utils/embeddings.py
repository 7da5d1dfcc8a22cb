"""The Embedding type and every embedding file format in use (a1111-compat §1).

(Skeleton: the loaders and writers are filled in by the embeddings work.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Embedding:
    name: str
    # [n, dim] float32 on CPU, or for SDXL {"clip_l": [n, 768], "clip_g": [n, 1280]}
    vectors: torch.Tensor | dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    filename: str | None = None
    sha256: str | None = None  # of the file it was loaded from
    extra: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.vectors, dict)

    @property
    def num_vectors(self) -> int:
        v = self.vectors["clip_g"] if self.is_sdxl else self.vectors
        return int(v.shape[0])

    @property
    def width(self) -> int:
        """A1111's ``shape``: 768 (SD-1), 1024 (SD-2), 768 + 1280 = 2048 (SDXL)."""
        if self.is_sdxl:
            return int(sum(v.shape[-1] for v in self.vectors.values()))
        return int(self.vectors.shape[-1])

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:12] if self.sha256 else None
