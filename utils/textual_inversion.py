"""What makes a training run textual inversion: new vectors spliced into the frozen text encoder(s).

The loop in utils/training.py sees only the small Trainable interface implemented here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from utils.embeddings import Embedding
from utils.token_splice import find_subsequence, splice_into, unsplice

SDXL_ENCODER_KEYS = ("clip_l", "clip_g")


class TextualInversionModel(nn.Module):
    """Everything the gradient flows through, as one module (so DDP wraps it and all-reduces only the vectors).

    The text encoder(s), UNet and their weights are frozen; the only parameters with ``requires_grad`` are the
    new vectors, one table per text encoder, kept in float32 whatever the models' dtype.
    """

    def __init__(self, text_encoders: list[nn.Module], unet: nn.Module, vectors: list[torch.Tensor], sdxl: bool):
        super().__init__()
        self.text_encoders = nn.ModuleList(text_encoders)
        self.unet = unet
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in vectors])
        self.sdxl = sdxl
        # Read once: diffusers' .dtype walks every submodule (about 1 ms per call on a small UNet).
        self.unet_dtype = next(unet.parameters()).dtype
        self._splice()

    def _splice(self) -> None:
        # The encoders get a view of each vector Parameter, never the Parameter itself: registered inside an encoder
        # it would make transformers report that encoder's dtype as float32 under bf16/fp16, and the pipelines used
        # for previews then cast the conditioning to float32 and fail in the bf16/fp16 UNet. A fresh view per
        # forward keeps the gradient flowing to the Parameter this module owns (and DDP syncs).
        for te, vec in zip(self.text_encoders, self.vectors):
            splice_into(te, vec.view_as(vec))

    def encode(self, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._splice()
        if not self.sdxl:
            return self.text_encoders[0](input_ids[0]).last_hidden_state, None
        # SDXL: penultimate hidden states of both encoders side by side; pooled output of the second.
        states, pooled = [], None
        for te, ids in zip(self.text_encoders, input_ids):
            out = te(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled

    def forward(self, noisy_latents, timesteps, input_ids: list[torch.Tensor], add_time_ids=None):
        hidden, pooled = self.encode(input_ids)
        hidden = hidden.to(self.unet_dtype)
        added = None
        if self.sdxl:
            added = {"text_embeds": pooled.to(self.unet_dtype), "time_ids": add_time_ids.to(self.unet_dtype)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def tokenize_with_placeholder(tokenizer, prompts: list[str], name: str, num_vectors: int) -> torch.Tensor:
    """Token ids [B, 77] where every occurrence of ``name`` becomes ``num_vectors`` spliced slots (ids -1 .. -n).

    The name is matched as a token sequence, as A1111 does, so the prompt word and the embedding name cannot drift
    apart (diffusers#3097). Prompts are cut at 75 tokens, never in the middle of the placeholder.
    """
    name_ids = tokenizer(name, add_special_tokens=False).input_ids
    slots = [-(k + 1) for k in range(num_vectors)]
    limit = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
        out: list[int] = []
        i = 0
        while i < len(ids):
            j = find_subsequence(ids, name_ids, i) if name_ids else -1
            if j < 0:
                out += ids[i:]
                break
            out += ids[i:j]
            if len(out) + num_vectors > limit:
                break
            out += slots
            i = j + len(name_ids)
        out = out[:limit]
        row = [tokenizer.bos_token_id] + out + [tokenizer.eos_token_id]
        rows.append(row + [pad] * (limit + 2 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class TextualInversion:
    """The Trainable for embeddings: the module, its parameters, how a batch becomes model inputs, the outputs."""

    embedding: Embedding  # name, starting vectors, step counter, checkpoint identity
    tokenizers: list
    model: TextualInversionModel
    csv_name: str = "textual_inversion_loss.csv"
    kind: str = "textual inversion"
    _ids_cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, pipeline, embedding: Embedding) -> "TextualInversion":
        sdxl = embedding.is_sdxl
        if sdxl:
            encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
            tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
            vectors = [embedding.vectors[k] for k in SDXL_ENCODER_KEYS]
        else:
            encoders, tokenizers, vectors = [pipeline.text_encoder], [pipeline.tokenizer], [embedding.vectors]
        for module in (*encoders, pipeline.unet):
            module.requires_grad_(False)
            module.eval()
        return cls(embedding, tokenizers, TextualInversionModel(encoders, pipeline.unet, vectors, sdxl))

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

    def _token_ids(self, k: int, prompt: str) -> torch.Tensor:
        # Templates give a bounded set of prompts; tokenizing each once saves ~0.4 ms per step.
        key = (k, prompt)
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = tokenize_with_placeholder(self.tokenizers[k], [prompt], self.name, self.embedding.num_vectors)[0]
            if len(self._ids_cache) < 100_000:
                self._ids_cache[key] = ids
        return ids

    def model_inputs(self, batch: dict, device) -> dict:
        ids = [torch.stack([self._token_ids(k, p) for p in batch["prompts"]]).to(device)
               for k in range(len(self.tokenizers))]
        inputs = {"input_ids": ids}
        if self.model.sdxl:
            inputs["add_time_ids"] = batch["add_time_ids"].to(device)
        return inputs

    def vector_norm(self) -> float:
        return float(sum(v.detach().float().norm() ** 2 for v in self.model.vectors) ** 0.5)

    def current(self, step: int) -> Embedding:
        """A detached CPU float32 copy of the embedding as trained so far."""
        emb = copy.copy(self.embedding)
        vecs = [v.detach().float().cpu().clone() for v in self.model.vectors]
        emb.vectors = dict(zip(SDXL_ENCODER_KEYS, vecs)) if self.model.sdxl else vecs[0]
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

    def detach_from_models(self) -> None:
        """Give the text encoders their plain token embeddings back (after training)."""
        for te in self.model.text_encoders:
            unsplice(te)
