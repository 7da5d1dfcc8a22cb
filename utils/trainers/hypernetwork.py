"""What makes a training run a hypernetwork run: A1111 hypernetwork modules inside the UNet's attention, trained
against a frozen UNet, with text-encoder outputs computed once per distinct prompt; and the files it writes.

The loop in utils/training.py sees only the Trainable interface implemented here, and the Outputs callbacks of
HypernetworkOutputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from utils.errors import UserError
from utils.hypernetwork import (
    Hypernetwork,
    HypernetworkTrainingModule,
    attention_context_widths,
    install_hypernetworks,
    save_hypernetwork,
    save_hypernetwork_safetensors,
    save_optimizer_sidecar,
)
from utils.models import LoadedModel
from utils.outputs import RunOutputs, write_settings


class HypernetworkModel(HypernetworkTrainingModule):
    """The module DDP wraps: the frozen UNet (with hypernetwork attention processors) plus the trained modules."""

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, text_embeds=None, add_time_ids=None):
        dtype = next(self.unet.parameters()).dtype  # diffusers' .dtype walks every submodule, ~1 ms per call
        added = None
        if add_time_ids is not None:
            added = {"text_embeds": text_embeds.to(dtype), "time_ids": add_time_ids.to(dtype)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype),
                         added_cond_kwargs=added).sample


class ConditioningCache:
    """Text-encoder outputs by prompt. The text encoder is not trained, so each distinct prompt is encoded once;
    with ``offload`` the encoder lives on the CPU (float32) and only the cached tensors reach the device."""

    def __init__(self, pipeline, device, offload: bool, max_bytes: int = 1 << 30, embeddings_dirs=()):
        from utils.prompts import EmbeddingDatabase, PromptEncoder

        self.device = device
        self.encoder = PromptEncoder(pipeline, EmbeddingDatabase(list(embeddings_dirs)))
        self.encoder.refresh()
        # Bounded by bytes: with --shuffle_tags / --tag_dropout nearly every prompt is new, and an SDXL entry is
        # ~300 KB; past the bound, new prompts are encoded every time instead of stored.
        self.max_bytes = max_bytes
        self.bytes = 0
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if offload:
            for module in self.encoder.encoders.modules:
                # float32 on the CPU: fp16/bf16 matmuls there are several times slower. The weights were loaded
                # in the weight dtype, so previews cast them back to it exactly (utils/previews.py).
                module.to("cpu", dtype=torch.float32)

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = self.encoder.encode([prompt])
        return cond.embeds[0].cpu(), None if cond.pooled is None else cond.pooled[0].cpu()

    def get(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pairs = []
        for p in prompts:
            hit = self.cache.get(p)
            if hit is None:
                hit = self._encode(p)
                size = sum(t.numel() * t.element_size() for t in hit if t is not None)
                if self.bytes + size <= self.max_bytes:
                    self.cache[p] = hit
                    self.bytes += size
            pairs.append(hit)
        lengths = {h.shape[0] for h, _ in pairs}
        if len(lengths) > 1:  # prompts of different chunk counts: encode this batch together (padded chunks)
            with torch.no_grad():
                cond = self.encoder.encode(list(prompts))
            hidden, pooled = cond.embeds, cond.pooled
        else:
            hidden = torch.stack([h for h, _ in pairs])
            pooled = None if pairs[0][1] is None else torch.stack([p for _, p in pairs])
        return hidden.to(self.device), None if pooled is None else pooled.to(self.device)


@dataclass
class HypernetworkTrainable:
    hypernetwork: Hypernetwork
    model: HypernetworkModel
    conditioning: ConditioningCache
    sdxl: bool
    method = "hypernetwork"
    initial_step: int = 0
    _params: list = field(default_factory=list)

    @classmethod
    def build(cls, loaded: LoadedModel, hn: Hypernetwork, device, offload_text_encoder: bool,
              embeddings_dirs=()) -> "HypernetworkTrainable":
        unet = loaded.pipeline.unet
        widths = attention_context_widths(unet)
        usable = [d for d in hn.layers if d in widths]
        if not usable:
            raise UserError(f"hypernetwork '{hn.name}' has modules for widths {sorted(hn.layers)}, but this model's "
                            f"attention layers have widths {sorted(widths)}: nothing would be trained")
        hn.to(device=device)  # float32 whatever the UNet's dtype; the attention processor casts
        hn.train()
        install_hypernetworks(unet, [(hn, 1.0)])
        model = HypernetworkModel(unet, [hn])
        cache = ConditioningCache(loaded.pipeline, device, offload_text_encoder, embeddings_dirs=embeddings_dirs)
        params = [p for m in model.hypernetwork_modules for p in m.parameters()]
        return cls(hn, model, cache, loaded.family == "sdxl", initial_step=int(hn.step or 0), _params=params)

    @property
    def name(self) -> str:
        return self.hypernetwork.name

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def train(self, mode: bool = True) -> None:
        self.hypernetwork.train(mode)  # dropout on only in training, as A1111

    def model_inputs(self, batch: dict, device) -> dict:
        hidden, pooled = self.conditioning.get(batch["prompts"])
        inputs = {"encoder_hidden_states": hidden}
        if self.sdxl:
            inputs.update(text_embeds=pooled, add_time_ids=batch["add_time_ids"].to(device))
        return inputs

    def state_dict(self) -> dict:
        return {f"{dim}.{i}": m.state_dict() for dim, pair in self.hypernetwork.layers.items()
                for i, m in enumerate(pair)}

    def load_state_dict(self, state: dict) -> None:
        for dim, pair in self.hypernetwork.layers.items():
            for i, m in enumerate(pair):
                m.load_state_dict(state[f"{dim}.{i}"])

    def current(self, step: int) -> Hypernetwork:
        """A CPU copy of the hypernetwork as trained so far (for saving while training continues)."""
        hn = copy.deepcopy(self.hypernetwork)
        hn.to(device="cpu")
        hn.step = step
        hn.filename = None
        return hn


class HypernetworkOutputs(RunOutputs):
    """``hypernetworks/<name>-<step>.pt``, previews in ``images/``, and at the end ``<name>.pt`` (A1111),
    ``<name>.safetensors``, the optional ``.pt.optim`` sidecar and ``training_settings.json``."""

    def _current(self, step: int) -> Hypernetwork:
        hn = self.trainable.current(step)
        hn.sd_checkpoint = self.loaded.identity.shorthash
        hn.sd_checkpoint_name = self.loaded.identity.name
        return hn

    def save(self, step: int) -> list[Path]:
        # A1111 stores the base name in periodic copies too; only the file name carries the step.
        return [save_hypernetwork(self._current(step), self.out_dir / "hypernetworks" /
                                  f"{self.trainable.name}-{step}.pt")]

    def save_best(self, step: int) -> list[Path]:
        """``<name>-best.pt`` / ``.safetensors``: the step --select_best chose (the base name inside, as in periodic
        copies)."""
        hn, stem = self._current(step), self.out_dir / f"{self.trainable.name}-best"
        return [save_hypernetwork(hn, stem.with_suffix(".pt")),
                save_hypernetwork_safetensors(hn, stem.with_suffix(".safetensors"))]

    def final(self, step: int, optimizer=None) -> list[Path]:
        hn = self._current(step)
        pt = save_hypernetwork(hn, self.out_dir / f"{self.trainable.name}.pt")
        files = [pt, save_hypernetwork_safetensors(hn, self.out_dir / f"{self.trainable.name}.safetensors")]
        if self.save_optimizer_state and optimizer is not None:
            files.append(save_optimizer_sidecar(pt, optimizer))
        files.append(write_settings(self.out_dir, self.settings, step))
        return files

    def preview(self, step: int) -> list:
        """The hypernetwork is already in the UNet's attention; render with it in eval mode (multiplier 1)."""
        return self.previewer.render(step, "a photo of an object",
                           extra_info=f", Hypernet: {self.trainable.name}, Hypernet step: {step}")
