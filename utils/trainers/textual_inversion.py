"""What makes a training run textual inversion: new vectors spliced into the frozen text encoder(s), and the files
it writes (the embedding in A1111, diffusers and kohya layouts, periodic copies, PNG cards, previews).

The loop in utils/training.py sees only the small Trainable interface implemented here, and the Outputs callbacks
of TextualInversionOutputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from utils.embeddings import (
    Embedding,
    create_embedding,
    create_embedding_sdxl,
    diffusers_prompt_token,
    save_a1111_pt,
    save_diffusers,
    save_diffusers_sdxl,
    save_embedding,
    save_kohya,
    save_png_card,
)
from utils.errors import UserError
from utils.models import LoadedModel
from utils.outputs import RunOutputs, write_settings
from utils.previews import PreviewOptions
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

    def forward(self, noisy_latents, timesteps, input_ids: list[torch.Tensor], add_time_ids=None, weights=None,
                **encode_args):
        # encode_args: what a subclass's encode() needs beyond the ids (utils/trainers/many_embeddings.py).
        hidden, pooled = self.encode(input_ids, weights, **encode_args)
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
    method = "textual_inversion"

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

    def train(self, mode: bool = True) -> None:
        pass  # frozen models stay in eval mode (no dropout in what we do not train)

    def model_inputs(self, batch: dict, device) -> dict:
        tokens = self.prompt_tokens(batch["prompts"])
        inputs = {"input_ids": [t.ids.to(device) for t in tokens]}
        if any(t.weights is not None for t in tokens):  # A1111's (emphasis:1.2) in a caption
            inputs["weights"] = [None if t.weights is None else t.weights.to(device) for t in tokens]
        if self.model.sdxl:
            inputs["add_time_ids"] = batch["add_time_ids"].to(device)
        return inputs

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
        return vectors_state(self.model)

    def load_state_dict(self, state: dict) -> None:
        load_vectors_state(self.model, state)


def vectors_state(model: TextualInversionModel) -> dict:
    """A checkpoint's ``trainable.pt`` for vector tables: ``vectors.<i>`` on the CPU (also the many-embeddings
    trainer's, whose tables are one ParameterList in the same order)."""
    return {f"vectors.{i}": v.detach().cpu().clone() for i, v in enumerate(model.vectors)}


def load_vectors_state(model: TextualInversionModel, state: dict) -> None:
    with torch.no_grad():
        for i, v in enumerate(model.vectors):
            v.copy_(state[f"vectors.{i}"].to(v.device, v.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The files a run writes


def new_embedding(loaded: LoadedModel, name: str, init_text: str, num_vectors: int) -> Embedding:
    tables = TextEncoders.of(loaded.pipeline).token_tables()
    if loaded.family == "sdxl":
        return create_embedding_sdxl(name, init_text, num_vectors, tables)
    ((tokenizer, table),) = tables
    return create_embedding(name, init_text, num_vectors, tokenizer, table)


def model_text_width(loaded: LoadedModel) -> int:
    return TextEncoders.of(loaded.pipeline).width


def check_width(embedding: Embedding, loaded: LoadedModel) -> None:
    """An embedding made for another model family cannot be continued on this one."""
    if embedding.is_sdxl != (loaded.family == "sdxl") or embedding.width != model_text_width(loaded):
        raise UserError(f"embedding '{embedding.name}' is {embedding.width} wide ({'SDXL' if embedding.is_sdxl else 'SD'}"
                        f"), but the model's text encoder(s) are {model_text_width(loaded)} wide ({loaded.family})")


def is_vocabulary_word(tokenizer, name: str) -> bool:
    """True when ``name`` is one token the tokenizer already has (``tiger``): prompts already use it as a word."""
    return len(tokenizer(name, add_special_tokens=False)["input_ids"]) == 1


def prompt_word_lines(name: str, tokenizers) -> list[str]:
    """What to write in each tool's prompts, and a note when the name is already a word of the model's vocabulary."""
    token = diffusers_prompt_token(name)
    lines = [f"Prompt word: '{name}' in A1111, kohya and inference.py, 'embedding:{name}' in ComfyUI, '{token}' in "
             f"diffusers (pipe.load_textual_inversion(\"learned_embeds.safetensors\"))."]
    if any(is_vocabulary_word(t, name) for t in tokenizers):
        lines.append(f"Note: '{name}' is already a word of the model's vocabulary. A1111 and ComfyUI match embeddings "
                     f"by name, so there every '{name}' in a prompt becomes the embedding; diffusers needs a new "
                     f"token, so its files carry '{token}' (README: Compatibility).")
    return lines


def save_optimizer_sidecar(pt_path: Path, emb: Embedding, optimizer) -> Path:
    """A1111's ``<file>.pt.optim``: the optimizer state, tagged with the embedding's value checksum
    (docs/a1111-rules.md, "Optimizer sidecar")."""
    from utils.embeddings import checksum
    from utils.pt_file import save_pt

    # save_pt, not torch.save: A1111 checks the sidecar like any .pt before loading it (see utils/pt_file.py).
    return save_pt({"hash": checksum(emb), "optimizer_state_dict": optimizer.state_dict()}, f"{pt_path}.optim")


class TextualInversionOutputs(RunOutputs):
    """File layout (A1111 names): ``embeddings/<name>-<step>.pt|.safetensors``, ``image_embeddings/<name>-<step>.png``,
    ``images/<name>-<step>-<k>.png``, and at the end ``<name>.pt``, ``learned_embeds.safetensors``,
    ``training_settings.json``. Every file is written to a temp name and renamed."""

    def __init__(self, accelerator, trainable, loaded: LoadedModel, out_dir: Path, preview: PreviewOptions, *,
                 save_image_embeddings: bool, also_bin: bool, settings: dict, save_optimizer_state: bool = False):
        super().__init__(accelerator, trainable, loaded, out_dir, preview, settings=settings,
                         save_optimizer_state=save_optimizer_state)
        self.save_image_embeddings = save_image_embeddings
        self.also_bin = also_bin
        self.last_preview = None  # (step, picture) of the newest preview: a PNG card of that step shows it
        for line in prompt_word_lines(trainable.name, TextEncoders.of(loaded.pipeline).tokenizers):
            accelerator.print(line)

    def _current(self, step: int, name: str | None = None) -> Embedding:
        emb = self.trainable.current(step)
        return replace(emb, name=name or emb.name, sd_checkpoint=self.loaded.identity.shorthash,
                       sd_checkpoint_name=self.loaded.identity.name)

    def _write(self, emb: Embedding, stem: Path) -> list[Path]:
        # Names may hold dots ("v1.5-x"): the suffix is appended, never swapped in (with_suffix would cut ".5-x").
        def named(suffix: str) -> Path:
            return stem.with_name(stem.name + suffix)

        if emb.is_sdxl:  # the one-file clip_l/clip_g layout A1111, ComfyUI and kohya read
            return [save_kohya(emb, named(".safetensors"))]
        return [save_a1111_pt(emb, named(".pt")),
                save_diffusers(emb, named(".safetensors"), token=diffusers_prompt_token(emb.name))]

    def save(self, step: int) -> list[Path]:
        # Periodic copies store "<name>-<step>" as their name, as A1111's do (it is what a PNG card loads as).
        emb = self._current(step, f"{self.trainable.name}-{step}")
        files = self._write(emb, self.out_dir / "embeddings" / f"{self.trainable.name}-{step}")
        if self.save_image_embeddings and not emb.is_sdxl:
            # This step's preview, else a picture drawn from the vectors (an older preview would misrepresent it).
            image = self.last_preview[1] if self.last_preview and self.last_preview[0] == step else None
            files.append(save_png_card(emb, self.out_dir / "image_embeddings" / f"{self.trainable.name}-{step}.png",
                                       image))
        return files

    def save_best(self, step: int) -> list[Path]:
        """``<name>-best``: the step --select_best chose, in the same formats as ``<name>`` (named like the file, as
        periodic copies are)."""
        stem = f"{self.trainable.name}-best"
        return self._write(self._current(step, stem), self.out_dir / stem)

    def final(self, step: int, optimizer=None) -> list[Path]:
        emb = self._current(step)
        files = self._write(emb, self.out_dir / self.trainable.name)
        if self.save_optimizer_state and optimizer is not None and not emb.is_sdxl:
            files.append(save_optimizer_sidecar(files[0], emb, optimizer))
        token = diffusers_prompt_token(emb.name)  # the same token as <name>.safetensors
        if emb.is_sdxl:  # diffusers' two files, learned_embeds(_2).safetensors: both belong in the run's file list
            files += save_diffusers_sdxl(emb, self.out_dir / "learned_embeds.safetensors", token=token)
        else:
            files.append(save_embedding(emb, self.out_dir / "learned_embeds.safetensors", "diffusers", token=token))
        if self.also_bin and not emb.is_sdxl:
            files.append(save_embedding(emb, self.out_dir / "learned_embeds.bin", "diffusers", token=token))
        files.append(write_settings(self.out_dir, self.settings, step))
        return files

    def preview(self, step: int) -> list:
        """Render preview images with the vectors as trained so far (main process; own generators only)."""
        self.previewer.encoder.db.register(self._current(step))
        out = self.previewer.render(step, f"a photo of {self.trainable.name}")
        if out:
            self.last_preview = (step, out[0][0])
        return out
